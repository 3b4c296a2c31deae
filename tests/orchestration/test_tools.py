"""The tool registry, the ToolBox that records calls, and the built-in tools' real work."""

from __future__ import annotations

import json
import uuid

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from orchestration.errors import RetryableError, ToolError
from orchestration.runtime import toolkit
from orchestration.runtime.tools import ToolBox, registry, tool, tool_schemas

# --- calculator -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "variables", "expected"),
    [
        ("2 + 3 * 4", None, 14),
        ("(2 + 3) * 4", None, 20),
        ("2 ** 10 - 24", None, 1000),
        ("7 // 2 + 7 % 2", None, 4),
        ("ans * 10", {"ans": 5}, 50),
        ("round(sqrt(2), 4)", None, 1.4142),
        ("max(1, 5, 3) - min(4, 2)", None, 3),
        ("round(1234.5678, -2)", None, 1200),
        ("2 ** 0.5 * 2 ** 0.5", None, 2),
    ],
)
def test_calculator_evaluates_arithmetic(expression, variables, expected):
    assert toolkit.evaluate(expression, variables) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("__import__('os').system('true')", "Call is not allowed"),
        ("exec('1')", "unknown function 'exec'"),
        ("(1).__class__", "Attribute is not allowed"),
        ("1 / 0", "division by zero"),
        ("2 ** 100000", "exponent 100000 is larger than 1000"),
        ("10.0 ** 400", "too large"),
        ("x + 1", "unknown name 'x'"),
        ("sqrt(-1)", "sqrt\\(\\): math domain error"),
        ("2 +", "cannot parse"),
        ("'a' * 3", "Constant is not allowed"),
        ("-pi < 0", "Compare is not allowed"),
        # every step is bounded, so nothing can take long or use much memory
        ("round(7, -(1000 ** 3))", "ndigits must be an integer within ±300"),
        ("round(1, 0.5)", "ndigits must be an integer"),
        ("(10 ** 300) ** 1000", "too large"),
        ("9 ** 1000 * 9 ** 1000", "too large"),
        ("10 ** 300 * 10", "too large"),
        ("1e999", "not a finite number"),
        ("1e999 - 1e999", "not a finite number"),
        ("exp(1000)", "exp\\(\\): math range error"),
        ("(-8) ** (1 / 3)", "not a real number"),
        ("-" * 999 + "1", "nested too deeply"),
    ],
)
def test_calculator_refuses_what_is_not_arithmetic(expression, message):
    with pytest.raises(ToolError, match=message):
        toolkit.evaluate(expression)


def test_calculator_refuses_non_finite_variables():
    with pytest.raises(ToolError, match="variable 'x' is not a finite number"):
        toolkit.evaluate("x + 1", {"x": float("nan")})


# --- text -------------------------------------------------------------------------------

TEXT = (
    "Workflow engines record every task attempt. Every attempt has a cost. "
    "Training data comes from the attempt record.\n\n"
    "A second paragraph talks about cost accounting and training data export."
)


def test_text_stats_counts_and_scores():
    stats = toolkit.text_stats(TEXT)
    assert (stats["words"], stats["sentences"], stats["paragraphs"]) == (29, 4, 2)
    assert stats["characters"] == len(TEXT)
    assert stats["unique_words"] == 21  # "Every"/"every", "Training"/"training" once
    assert stats["average_sentence_words"] == 7.25
    assert 0 < stats["flesch_reading_ease"] < 100
    assert stats["reading_time_minutes"] == round(29 / 238, 2)


def test_text_stats_of_empty_text_has_no_ratios():
    assert toolkit.text_stats("") == {
        "characters": 0,
        "words": 0,
        "sentences": 0,
        "paragraphs": 0,
        "unique_words": 0,
        "reading_time_minutes": 0.0,
    }


def test_syllable_estimate():
    assert [toolkit.syllables(w) for w in ("cost", "attempt", "training", "table", "make", "record")] == [
        1,
        2,
        2,
        2,
        1,
        2,
    ]


def test_keywords_rank_phrases_by_word_degree_over_frequency():
    found = toolkit.keywords(TEXT, top_n=5)["keywords"]
    # training, data: in two 3-word phrases (degree 6, frequency 2) -> 3 each; a word seen
    # once in a 3-word phrase -> 3; "record": degree 3 + 2 over frequency 2 -> 2.5.
    assert found == [
        {"phrase": "second paragraph talks", "score": 9.0, "count": 1},
        {"phrase": "training data comes", "score": 9.0, "count": 1},
        {"phrase": "training data export", "score": 9.0, "count": 1},
        {"phrase": "workflow engines record", "score": 8.5, "count": 1},
        {"phrase": "attempt record", "score": round(5 / 3 + 2.5, 3), "count": 1},
    ]


def test_keywords_split_on_stop_words_and_punctuation():
    phrases = [k["phrase"] for k in toolkit.keywords(TEXT, top_n=20)["keywords"]]
    assert "attempt" in phrases and "cost" in phrases  # "Every attempt has a cost."
    assert all(word not in toolkit.STOP_WORDS for phrase in phrases for word in phrase.split())


def test_summarize_keeps_original_order_and_honours_must_include():
    result = toolkit.summarize(TEXT, max_sentences=2)
    assert result["sentences"] == 2
    sentences = toolkit.sentences_of(TEXT)
    chosen = toolkit.sentences_of(result["summary"])
    assert chosen == sorted(chosen, key=sentences.index)
    boosted = toolkit.summarize(TEXT, max_sentences=1, must_include=["paragraph"])
    assert boosted["summary"].startswith("A second paragraph")


# --- code -------------------------------------------------------------------------------

SOURCE = '''"""Module."""
import os
from collections import OrderedDict


def simple(a, b):
    """Add."""
    return a + b


def branchy(items, *, limit=3):
    # counts the big ones
    total = 0
    for item in items:
        if item > limit and item % 2 == 0:
            total += 1
        elif item < 0 or item is None:
            continue
    return [i for i in items if i] if total else None


class Box:
    def get(self):
        while True:
            try:
                return 1
            except ValueError:
                pass
'''


def test_code_metrics_measures_complexity_nesting_and_lines():
    metrics = toolkit.code_metrics(SOURCE)
    by_name = {f["name"]: f for f in metrics["functions"]}
    assert by_name["simple"]["complexity"] == 1
    # for, if, and, elif, or, comprehension (+1 for its if), conditional expression
    assert by_name["branchy"]["complexity"] == 1 + 1 + 1 + 1 + 1 + 1 + 2 + 1
    assert by_name["branchy"]["arguments"] == 2
    assert by_name["branchy"]["nesting"] == 2  # for > if; the elif is at the if's level
    assert by_name["get"]["complexity"] == 3 and by_name["get"]["nesting"] == 2
    assert metrics["classes"] == [{"name": "Box", "line": 22, "methods": 1}]
    assert metrics["imports"] == ["collections", "os"]
    assert metrics["comment_lines"] == 1
    assert metrics["lines"] == len(SOURCE.splitlines())
    assert metrics["blank_lines"] == 6
    assert metrics["docstring_coverage"] == round(1 / 4, 3)
    assert metrics["max_complexity"] == 9


def test_code_metrics_names_the_syntax_error_line():
    with pytest.raises(ToolError, match="line 2: "):
        toolkit.code_metrics("x = 1\ndef broken(:\n")


def test_code_metrics_refuses_source_nested_beyond_analysis():
    with pytest.raises(ToolError, match="nested too deeply"):
        toolkit.code_metrics("x = " + "+".join(["1"] * 100_000))


# --- JSON schema --------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {"retries": {"type": "integer", "minimum": 0}, "queue": {"enum": ["high", "low"]}},
    "required": ["queue"],
    "additionalProperties": False,
}


def test_json_validate_lists_every_error_with_its_path():
    verdict = toolkit.json_validate({"retries": -1, "extra": True}, SCHEMA)
    assert verdict["valid"] is False
    assert [(e["path"], e["keyword"]) for e in verdict["errors"]] == [
        ("/", "additionalProperties"),
        ("/", "required"),
        ("/retries", "minimum"),
    ]
    assert toolkit.json_validate({"queue": "high", "retries": 2}, SCHEMA) == {"valid": True, "errors": []}


def test_json_validate_stops_a_pattern_that_backtracks_for_ever():
    with pytest.raises(ToolError, match=r"the pattern '\^\(a\|aa\)\+\$' took over 0\.5 s to match"):
        toolkit.json_validate("a" * 60 + "!", {"pattern": "^(a|aa)+$"})


def test_json_validate_pattern_keywords_still_validate():
    schema = {
        "type": "object",
        "properties": {"id": {"type": "string", "pattern": "^[a-z]+-[0-9]+$"}},
        "patternProperties": {"^x-": {"type": "integer"}},
        "additionalProperties": False,
    }
    verdict = toolkit.json_validate({"id": "Bad-1", "x-a": "no", "x-b": 2, "other": 1, "more": 2}, schema)
    assert [(e["path"], e["keyword"], e["message"]) for e in verdict["errors"]] == [
        ("/", "additionalProperties", "Additional properties are not allowed ('more', 'other' unexpected)"),
        ("/id", "pattern", "'Bad-1' does not match '^[a-z]+-[0-9]+$'"),
        ("/x-a", "type", "'no' is not of type 'integer'"),
    ]
    with pytest.raises(ToolError, match=r"the schema is invalid at pattern: .* is not a .regex."):
        toolkit.json_validate("x", {"pattern": "(unclosed"})


def test_json_validate_refuses_an_invalid_schema():
    with pytest.raises(ToolError, match="the schema is invalid at properties/x/type"):
        toolkit.json_validate({}, {"properties": {"x": {"type": "number-ish"}}})


def test_json_validate_resolves_references_within_the_schema_only():
    schema = {"$defs": {"n": {"type": "integer"}}, "properties": {"n": {"$ref": "#/$defs/n"}}}
    assert toolkit.json_validate({"n": "x"}, schema)["errors"][0]["message"] == "'x' is not of type 'integer'"
    with pytest.raises(ToolError, match=r"the schema's \$ref 'file:///etc/hostname' is not in the schema"):
        toolkit.json_validate({}, {"$ref": "file:///etc/hostname"})


# --- registry and ToolBox -------------------------------------------------------------------


def test_registry_holds_the_builtin_tools_with_valid_openai_schemas():
    assert {"calculator", "text_stats", "keywords", "summarize", "code_metrics", "json_validate"} <= set(registry())
    [schema] = tool_schemas(["calculator"])
    assert schema["type"] == "function"
    assert schema["function"]["name"] == "calculator"
    assert schema["function"]["parameters"]["required"] == ["expression"]


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_a_tool_module_that_cannot_be_imported_is_named_with_its_setting(settings):
    settings.AGENT_TOOL_MODULES = ["orchestration.runtime.toolkit", "no_such_tools.module"]
    # An ImportError still (not retried when an attempt meets it), naming the setting.
    with pytest.raises(ImportError, match=r"AGENT_TOOL_MODULES: cannot import 'no_such_tools.module'"):
        registry()


def test_tool_registration_refuses_bad_names_schemas_and_duplicates():
    with pytest.raises(ValueError, match="tool name 'Bad Name'"):
        tool(name="Bad Name", description="", parameters={"type": "object"})
    with pytest.raises(ValueError, match="must be a JSON schema of type object"):
        tool(name="ok", description="", parameters={"type": "string"})
    with pytest.raises(ValueError, match="not a valid JSON schema"):
        tool(name="ok", description="", parameters={"type": "object", "properties": {"a": {"type": 5}}})
    with pytest.raises(ValueError, match="registered twice"):
        tool(name="calculator", description="", parameters={"type": "object"})(lambda: None)


def test_toolbox_runs_an_allowed_tool_and_records_the_call():
    seen = []
    box = ToolBox(agent_id="a1", allowed=["calculator"], recorder=seen.append)
    assert box.call("calculator", {"expression": "6 * 7"}) == {"expression": "6 * 7", "result": 42}
    [call] = seen
    assert (call.tool_name, call.input_params, call.output_result, call.error) == (
        "calculator",
        {"expression": "6 * 7"},
        {"expression": "6 * 7", "result": 42},
        None,
    )
    assert call.execution_time_ms >= 0 and call.call_id.startswith("call_")


@pytest.mark.parametrize(
    ("name", "arguments", "message"),
    [
        ("keywords", {"text": "x"}, "agent 'a1' may not call tool 'keywords' \\(its definition allows: calculator\\)"),
        ("calculator", {}, "invalid arguments: \\(arguments\\): 'expression' is a required property"),
        ("calculator", {"expression": 5}, "invalid arguments: expression: 5 is not of type 'string'"),
        ("calculator", "2+2", "arguments must be an object, got str"),
        ("calculator", {"expression": "1/0"}, "division by zero"),
    ],
)
def test_toolbox_refusals_and_failures_are_recorded_and_raised(name, arguments, message):
    seen = []
    box = ToolBox(agent_id="a1", allowed=["calculator"], recorder=seen.append)
    with pytest.raises(ToolError, match=message):
        box.call(name, arguments)
    [call] = seen
    assert call.output_result is None and call.error is not None


def test_a_tool_crash_is_reported_with_its_cause_and_a_transient_failure_passes_through():
    crash_name, transient_name, slow_name, nan_name = (_unique(p) for p in ("crash", "transient", "slow", "nan"))

    @tool(name=crash_name, description="", parameters={"type": "object"})
    def crash() -> None:
        raise KeyError("boom")

    @tool(name=transient_name, description="", parameters={"type": "object"})
    def transient() -> None:
        raise RetryableError("try later")

    @tool(name=slow_name, description="", parameters={"type": "object"})
    def slow() -> None:
        raise SoftTimeLimitExceeded()

    @tool(name=nan_name, description="", parameters={"type": "object"})
    def not_a_number() -> float:
        return float("nan")

    box = ToolBox(agent_id="a1", allowed=[crash_name, transient_name, slow_name, nan_name])
    with pytest.raises(ToolError, match=f"tool '{crash_name}' failed: KeyError: 'boom'"):
        box.call(crash_name)
    with pytest.raises(RetryableError, match="try later"):
        box.call(transient_name)
    with pytest.raises(SoftTimeLimitExceeded):
        box.call(slow_name)  # the attempt must end as timed out, not as a tool error
    with pytest.raises(ToolError, match="returned a value that is not JSON: Out of range float values"):
        box.call(nan_name)
    assert [c.error is not None for c in box.calls] == [True] * 4
    assert box.calls[1].error == "try later"


def test_explicit_null_arguments_are_refused_not_taken_as_none_given():
    box = ToolBox(agent_id="a1", allowed=["calculator"])
    with pytest.raises(ToolError, match="arguments must be an object, got NoneType"):
        box.call("calculator", None)


def test_toolbox_in_a_conversation_writes_the_call_and_its_reply_to_the_transcript():
    transcript: list[dict] = []
    box = ToolBox(agent_id="a1", allowed=["calculator"], transcript=transcript)
    box.call("calculator", {"expression": "1+1"}, call_id="call_1")
    assert transcript == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "calculator", "arguments": json.dumps({"expression": "1+1"})},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"expression": "1+1", "result": 2})},
    ]


def test_a_stop_that_interrupted_a_tools_commit_stops_the_agent_not_reported_as_a_tool_failure():
    """A cancel's SIGTERM raises SystemExit in the pool process; landing in the COMMIT of a tool's
    own database write, Django replaces it with a database error ("can't change 'autocommit'
    now", the SystemExit its context). That is no failure of the tool to hand back to the agent,
    which would run on: the exit goes on."""
    import signal

    from billiard import common as billiard_common
    from django.db import ProgrammingError

    name = _unique("committing")

    @tool(name=name, description="", parameters={"type": "object"})
    def committing() -> None:
        try:
            signal.raise_signal(signal.SIGTERM)  # billiard's SIGTERM handler, as the COMMIT is sent
        finally:
            raise ProgrammingError("can't change 'autocommit' now")  # as Django's atomic() does

    box = ToolBox(agent_id="a1", allowed=[name])
    previous = signal.signal(signal.SIGTERM, billiard_common._shutdown_cleanup)
    try:
        with pytest.raises(SystemExit):
            box.call(name)
    finally:
        signal.signal(signal.SIGTERM, previous)
        billiard_common.clear_terminate_handler_fired()


def test_a_tools_asyncio_timeout_is_its_failure_not_a_stop():
    """asyncio.wait_for (and aiohttp's timeouts) raise TimeoutError while handling the
    CancelledError they cancelled the call with, a BaseException in its context: no stop. Taken
    for one, it was raised out of the tool to end the agent and the attempt was left running."""
    import asyncio

    name = _unique("slow-async")

    @tool(name=name, description="", parameters={"type": "object"})
    def slow_async() -> None:
        async def call() -> None:
            await asyncio.sleep(5)

        asyncio.run(asyncio.wait_for(call(), 0.01))

    box = ToolBox(agent_id="a1", allowed=[name])
    with pytest.raises(ToolError, match="TimeoutError"):
        box.call(name)


def test_a_tools_error_raised_on_catching_a_parsers_exit_is_its_failure_not_a_stop():
    """A tool that runs a command-line parser and turns its exit (SystemExit) into an error
    reports that error; the pool process is not told to exit."""
    import argparse

    name = _unique("cli")

    @tool(name=name, description="", parameters={"type": "object"})
    def cli() -> None:
        parser = argparse.ArgumentParser(prog="cli")
        parser.add_argument("--n", type=int, required=True)
        try:
            parser.parse_args([])
        except SystemExit:
            raise ValueError("bad arguments") from None

    box = ToolBox(agent_id="a1", allowed=[name])
    with pytest.raises(ToolError, match="bad arguments"):
        box.call(name)
