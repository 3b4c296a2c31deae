"""OpenAI's rules the chat export keeps beyond the shape: no empty `tools` array (its API refuses
"Invalid 'tools': empty array. Expected an array with minimum length 1"; an agent without tools
gets no `tools` key) and function names of 1-64 letters, digits, `_` or `-`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.factories import AgentFactory
from tests.training_export.test_chat import DAY, call, thread
from training_export.services.chat import ChatFormatError, chat_example_validate
from training_export.services.export import export_run


def test_an_agent_without_tools_gets_no_tools_key(db, out):
    agent = AgentFactory(system_prompt="You review code.", config={})
    thread("t-1", agent, [{"role": "user", "content": "Review #42"}, {"role": "assistant", "content": "LGTM"}])
    run = export_run(data_type="conversations", start_date=DAY, end_date=DAY)
    [example] = [json.loads(line) for line in Path(run.path).read_text("utf-8").splitlines()]
    assert "tools" not in example  # was "tools": []
    assert [m["role"] for m in example["messages"]] == ["system", "user", "assistant"]


def test_an_agent_with_tools_keeps_them(db, out):
    agent = AgentFactory(config={"tools": ["calculator"]})
    thread(
        "t-1",
        agent,
        [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "", "tool_calls": [call("c1", "calculator", {"expression": "2+2"})]},
            {"role": "tool", "content": '{"result": 4}', "tool_call_id": "c1"},
            {"role": "assistant", "content": "4"},
        ],
    )
    run = export_run(data_type="conversations", start_date=DAY, end_date=DAY)
    [example] = [json.loads(line) for line in Path(run.path).read_text("utf-8").splitlines()]
    assert [tool["function"]["name"] for tool in example["tools"]] == ["calculator"]


def test_the_validator_refuses_an_empty_tools_array():
    example = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]}
    chat_example_validate(example)
    with pytest.raises(ChatFormatError, match="tools must not be empty"):
        chat_example_validate({**example, "tools": []})


@pytest.mark.parametrize("name", ["functions.calculator", "get weather", "x" * 65, "[REDACTED]"])
def test_the_validator_refuses_a_function_name_openai_refuses(name):
    example = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "tool_calls": [call("c1", name, {})], "weight": 1},
            {"role": "tool", "tool_call_id": "c1", "content": "r"},
            {"role": "assistant", "content": "done"},
        ],
        "tools": [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}],
    }
    with pytest.raises(ChatFormatError, match="a function name is 1-64 letters, digits, _ or -"):
        chat_example_validate(example)


def test_a_thread_calling_a_function_name_openai_refuses_is_skipped_and_counted(db, out):
    """A model may call a name no tool has ("functions.calculator"); the runtime answers it with
    an error and stores the call, and the export gave it a minimal schema under that name: a
    line the fine-tuning API refuses, and with it the whole file."""
    agent = AgentFactory(config={"tools": ["calculator"]})
    thread(
        "t-1",
        agent,
        [
            {"role": "user", "content": "6*7?"},
            {"role": "assistant", "content": "", "tool_calls": [call("c1", "functions.calculator", {})]},
            {"role": "tool", "content": '{"error": "unknown tool"}', "tool_call_id": "c1"},
            {"role": "assistant", "content": "42"},
        ],
    )
    run = export_run(data_type="conversations", start_date=DAY, end_date=DAY)
    assert run.rows == 0
    manifest = json.loads((Path(run.path).parent / "manifest.json").read_text())
    [(reason, count)] = manifest["skipped"].items()
    assert "'functions.calculator'" in reason and count == 1
