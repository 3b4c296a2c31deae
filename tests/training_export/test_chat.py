"""Conversations as OpenAI chat fine-tuning JSONL, checked by the format validator."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from orchestration.models import AgentPlaygroundMessage, TaskAttempt
from orchestration.runtime.tools import tool_schemas
from tests.factories import AgentFactory, MessageFactory, TaskAttemptFactory, TaskExecutionFactory
from training_export.services.chat import ChatFormatError, chat_example_validate
from training_export.services.export import export_run

DAY = dt.date(2024, 3, 5)
T0 = dt.datetime(2024, 3, 5, 10, 0, tzinfo=dt.UTC)


def call(call_id: str, name: str, arguments: dict) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def thread(instance_id: str, agent, messages: list[dict], *, at: dt.datetime = T0) -> None:
    for i, fields in enumerate(messages):
        MessageFactory(instance_id=instance_id, agent=agent, created_at=at + dt.timedelta(seconds=i), **fields)


def exported(out: Path) -> list[dict]:
    path = out / "conversations" / "2024-03-05_2024-03-05" / "conversations-train.jsonl"
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def test_conversations_export_in_openai_chat_format(db, out):
    agent = AgentFactory(system_prompt="You are a careful calculator.", config={"tools": ["calculator"]})
    execution = TaskExecutionFactory(agent=agent)
    failed = TaskAttemptFactory(execution=execution, attempt_number=1, failed=True, started_at=T0)
    succeeded = TaskAttemptFactory(execution=execution, attempt_number=2, succeeded=True, started_at=T0)
    thread(
        "t-1",
        agent,
        [
            {"role": "user", "content": "What is 2+2?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [call("c1", "calculator", {"x": "2+2"})],
                "attempt": failed,
            },
            {"role": "tool", "content": "error: timeout", "tool_call_id": "c1", "attempt": failed},
            {"role": "assistant", "content": "I could not compute it.", "attempt": failed, "is_error": True},
            {"role": "user", "content": "Try again."},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [call("c2", "calculator", {"x": "2+2"})],
                "attempt": succeeded,
            },
            {"role": "tool", "content": "4", "tool_call_id": "c2", "attempt": succeeded},
            {"role": "assistant", "content": "2+2 = 4.", "attempt": succeeded},
            {"role": "user", "content": "thanks"},  # after the last answer: no training target
        ],
    )
    thread("t-2", agent, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}])
    # Only a failed attempt's answer: nothing to train on, skipped and counted.
    thread("t-3", agent, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "is_error": True}])
    # Before the window: not exported.
    thread(
        "t-0",
        agent,
        [{"role": "user", "content": "old"}, {"role": "assistant", "content": "old"}],
        at=T0 - dt.timedelta(days=2),
    )

    run = export_run(data_type="conversations", start_date=DAY, end_date=DAY)
    examples = exported(out)
    assert run.rows == len(examples) == 2
    for example in examples:
        chat_example_validate(example)
    first = examples[0]
    assert [m["role"] for m in first["messages"]] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
        "user",
        "assistant",
        "tool",
        "assistant",
    ]
    assert first["messages"][0]["content"] == "You are a careful calculator."
    assert [m["weight"] for m in first["messages"] if m["role"] == "assistant"] == [0, 0, 1, 1]
    assert first["messages"][2] == {
        "role": "assistant",
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": '{"x":"2+2"}'}}
        ],
        "weight": 0,
    }
    assert first["messages"][3] == {"role": "tool", "tool_call_id": "c1", "content": "error: timeout"}
    assert first["tools"] == tool_schemas(["calculator"])
    assert first["tools"][0]["function"]["parameters"]["type"] == "object"
    manifest = json.loads((Path(run.path).parent / "manifest.json").read_text())
    assert manifest["skipped"] == {"no assistant message with weight 1": 1}
    assert manifest["format"] == "chat_jsonl"


def test_dataset_card_lets_datasets_load_the_export(db, out, tmp_path, monkeypatch):
    import datasets  # a dev requirement: the export must load with the real library

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    agent = AgentFactory(system_prompt="Be brief.")
    thread("t-1", agent, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}])
    thread("t-2", agent, [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}])
    run = export_run(data_type="conversations", start_date=DAY, end_date=DAY)
    loaded = datasets.load_dataset(str(Path(run.path).parent), cache_dir=str(tmp_path / "hf-cache"))
    assert list(loaded) == ["train"] and loaded["train"].num_rows == 2
    rows = sorted(loaded["train"], key=lambda row: row["messages"][1]["content"])
    assert [(m["role"], m["content"]) for m in rows[1]["messages"]] == [
        ("system", "Be brief."),
        ("user", "hi"),
        ("assistant", "Hello!"),
    ]
    assert rows[0]["messages"][2]["weight"] == 1


def test_the_dataset_card_names_the_train_split(db, out):
    agent = AgentFactory()
    thread("t-1", agent, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}])
    run = export_run(data_type="conversations", start_date=DAY, end_date=DAY)
    card = (Path(run.path).parent / "README.md").read_text()
    front_matter = card.split("---\n")[1]
    assert "- split: train\n    path: conversations-train.jsonl\n" in front_matter


VALID = {
    "messages": [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "tool_calls": [call("a", "f", {})], "weight": 0},
        {"role": "tool", "tool_call_id": "a", "content": "r"},
        {"role": "assistant", "content": "done", "weight": 1},
    ],
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
}


def test_the_validator_accepts_a_valid_example():
    chat_example_validate(VALID)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda e: e["messages"].append({"role": "robot", "content": "x"}), "role 'robot'"),
        (
            lambda e: e["messages"].insert(1, {"role": "system", "content": "again"}),
            "system message may only come first",
        ),
        (lambda e: e["messages"].pop(3), "have no tool reply"),
        (lambda e: e["messages"][3].update(tool_call_id="zzz"), "tool reply to 'zzz'"),
        (lambda e: e["messages"][4].update(weight=0), "no assistant message with weight 1"),
        (lambda e: e["messages"][4].update(weight=2), "weight must be 0 or 1"),
        (lambda e: e["messages"][1].update(weight=1), "unexpected keys"),
        (lambda e: e["messages"][2]["tool_calls"][0]["function"].update(arguments="{not json"), "not valid JSON"),
        (lambda e: e["messages"][2]["tool_calls"][0]["function"].update(name="g"), "not among the example's tools"),
        (lambda e: e["messages"][4].pop("content"), "needs content or tool_calls"),
        (lambda e: e.update(extra=1), "unknown top-level keys"),
        (lambda e: e["messages"].clear(), "non-empty list"),
    ],
)
def test_the_validator_rejects_each_broken_rule(change, reason):
    example = json.loads(json.dumps(VALID))
    change(example)
    with pytest.raises(ChatFormatError, match=reason):
        chat_example_validate(example)


def test_duplicate_tool_call_ids_are_rejected():
    example = json.loads(json.dumps(VALID))
    example["messages"][4:4] = [
        {"role": "assistant", "tool_calls": [call("a", "f", {})]},
        {"role": "tool", "tool_call_id": "a", "content": "r"},
    ]
    with pytest.raises(ChatFormatError, match="used twice"):
        chat_example_validate(example)


def test_attempt_status_sets_the_weight(db, out):
    agent = AgentFactory()
    execution = TaskExecutionFactory(agent=agent)
    lost = TaskAttemptFactory(
        execution=execution, attempt_number=1, status=TaskAttempt.Status.LOST, started_at=T0, finished_at=T0
    )
    thread(
        "t-1",
        agent,
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "from a lost attempt", "attempt": lost},
            {"role": "user", "content": "b"},
            {"role": "assistant", "content": "plain"},
        ],
    )
    export_run(data_type="conversations", start_date=DAY, end_date=DAY)
    (example,) = exported(out)
    assert [m.get("weight") for m in example["messages"] if m["role"] == "assistant"] == [0, 1]
    assert AgentPlaygroundMessage.objects.count() == 4


def test_a_thread_spanning_days_is_exported_with_its_history_up_to_each_window_end(db, out):
    agent = AgentFactory()
    thread("t-1", agent, [{"role": "user", "content": "day one"}, {"role": "assistant", "content": "answer one"}])
    thread(
        "t-1",
        agent,
        [{"role": "user", "content": "day two"}, {"role": "assistant", "content": "answer two"}],
        at=T0 + dt.timedelta(days=1),
    )
    first = export_run(data_type="conversations", start_date=DAY, end_date=DAY)
    second = export_run(data_type="conversations", start_date="2024-03-06", end_date="2024-03-06")
    (one,) = [json.loads(line) for line in Path(first.path).read_text().splitlines()]
    (two,) = [json.loads(line) for line in Path(second.path).read_text().splitlines()]
    assert [m["content"] for m in one["messages"]] == ["day one", "answer one"]
    assert [m["content"] for m in two["messages"]] == ["day one", "answer one", "day two", "answer two"]
    # Each answer is trained in the file of its own day only: the day before is context.
    assert [m.get("weight") for m in one["messages"] if m["role"] == "assistant"] == [1]
    assert [m.get("weight") for m in two["messages"] if m["role"] == "assistant"] == [0, 1]
    # Both days in one window: both answers are the window's own.
    both = export_run(data_type="conversations", start_date=DAY, end_date="2024-03-06")
    (whole,) = [json.loads(line) for line in Path(both.path).read_text().splitlines()]
    assert [m.get("weight") for m in whole["messages"] if m["role"] == "assistant"] == [1, 1]


def test_a_tool_call_answered_after_midnight_is_trained_in_the_file_of_the_day_of_its_answer(db, out):
    # The day's file ends at the thread's last answer, so the tool call of 23:59:58 is not in
    # it; the next day's file had it as context (weight 0): it was trained in neither.
    agent = AgentFactory(config={"tools": ["calculator"]})
    thread(
        "t-1",
        agent,
        [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "", "tool_calls": [call("c1", "calculator", {"x": "2+2"})]},
            {"role": "tool", "content": "4", "tool_call_id": "c1"},
        ],
        at=dt.datetime(2024, 3, 5, 23, 59, 57, tzinfo=dt.UTC),
    )
    thread("t-1", agent, [{"role": "assistant", "content": "2+2 = 4."}], at=dt.datetime(2024, 3, 6, tzinfo=dt.UTC))
    first = export_run(data_type="conversations", start_date=DAY, end_date=DAY)
    second = export_run(data_type="conversations", start_date="2024-03-06", end_date="2024-03-06")
    assert first.rows == 0, "no answer on the first day: nothing of the thread to train yet"
    (example,) = [json.loads(line) for line in Path(second.path).read_text().splitlines()]
    chat_example_validate(example)
    assert [(m.get("content"), m.get("weight")) for m in example["messages"] if m["role"] == "assistant"] == [
        (None, 1),
        ("2+2 = 4.", 1),
    ]
    # A turn an answer of the day before closed stays context.
    thread("t-1", agent, [{"role": "user", "content": "and 3+3?"}], at=dt.datetime(2024, 3, 7, 9, tzinfo=dt.UTC))
    thread("t-1", agent, [{"role": "assistant", "content": "6."}], at=dt.datetime(2024, 3, 7, 9, 1, tzinfo=dt.UTC))
    third = export_run(data_type="conversations", start_date="2024-03-07", end_date="2024-03-07")
    (example,) = [json.loads(line) for line in Path(third.path).read_text().splitlines()]
    assert [m.get("weight") for m in example["messages"] if m["role"] == "assistant"] == [0, 0, 1]


def test_a_thread_with_no_answer_of_its_own_in_the_window_is_skipped(db, out):
    agent = AgentFactory()
    thread("t-1", agent, [{"role": "user", "content": "day one"}, {"role": "assistant", "content": "answer one"}])
    # The next day only a question, not answered yet: nothing of this window to train.
    thread("t-1", agent, [{"role": "user", "content": "and?"}], at=T0 + dt.timedelta(days=1))
    run = export_run(data_type="conversations", start_date="2024-03-06", end_date="2024-03-06")
    assert run.rows == 0 and Path(run.path).read_text() == ""
    manifest = json.loads((Path(run.path).parent / "manifest.json").read_text())
    assert sum(manifest["skipped"].values()) == 1, manifest


def test_a_called_tool_the_registry_does_not_know_gets_a_minimal_schema(db, out):
    agent = AgentFactory(config={"tools": ["calculator"]})
    thread(
        "t-1",
        agent,
        [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "tool_calls": [call("c1", "retired_tool", {"a": 1})]},
            {"role": "tool", "content": "ok", "tool_call_id": "c1"},
            {"role": "assistant", "content": "done"},
        ],
    )
    export_run(data_type="conversations", start_date=DAY, end_date=DAY)
    (example,) = exported(out)
    chat_example_validate(example)
    assert [tool["function"]["name"] for tool in example["tools"]] == ["calculator", "retired_tool"]
    assert example["tools"][1] == {
        "type": "function",
        "function": {"name": "retired_tool", "parameters": {"type": "object"}},
    }


def test_tool_call_ids_a_server_repeats_are_made_unique_with_their_replies(db, out):
    """Some OpenAI-compatible servers number each answer's calls from zero: the thread holds
    "call_0" in two turns, and twice in one. The example renames the repeats, each tool reply
    with its call, and stays valid; the thread was skipped before."""
    agent = AgentFactory(config={"tools": ["calculator"]})
    thread(
        "t-ids",
        agent,
        [
            {"role": "user", "content": "2+2 and 3+3?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [call("call_0", "calculator", {"x": "2+2"}), call("call_0", "calculator", {"x": "3+3"})],
            },
            {"role": "tool", "content": "4", "tool_call_id": "call_0"},
            {"role": "tool", "content": "6", "tool_call_id": "call_0"},
            {"role": "assistant", "content": "4 and 6."},
            {"role": "user", "content": "and 4+4?"},
            {"role": "assistant", "content": "", "tool_calls": [call("call_0", "calculator", {"x": "4+4"})]},
            {"role": "tool", "content": "8", "tool_call_id": "call_0"},
            {"role": "assistant", "content": "8."},
        ],
    )
    run = export_run(data_type="conversations", start_date=DAY, end_date=DAY)
    [example] = exported(out)
    assert run.rows == 1
    chat_example_validate(example)
    pairs = [
        (m["tool_calls"][i]["id"], json.loads(m["tool_calls"][i]["function"]["arguments"])["x"])
        for m in example["messages"]
        if "tool_calls" in m
        for i in range(len(m["tool_calls"]))
    ]
    replies = [(m["tool_call_id"], m["content"]) for m in example["messages"] if m["role"] == "tool"]
    assert pairs == [("call_0", "2+2"), ("call_0-1", "3+3"), ("call_0-2", "4+4")]
    assert replies == [("call_0", "4"), ("call_0-1", "6"), ("call_0-2", "8")]


def test_consecutive_windows_train_each_assistant_turn_once(db, out):
    agent = AgentFactory(config={"tools": ["calculator"]})
    execution = TaskExecutionFactory(agent=agent)
    failed = TaskAttemptFactory(execution=execution, attempt_number=1, failed=True, started_at=T0)
    retried = TaskAttemptFactory(execution=execution, attempt_number=2, succeeded=True, started_at=T0)
    day = [dt.datetime(2024, 3, 5 + n, tzinfo=dt.UTC) for n in range(4)]
    second = dt.timedelta(seconds=1)

    def tool_turn(call_id: str, **fields) -> list[dict]:
        return [
            {"role": "assistant", "content": "", "tool_calls": [call(call_id, "calculator", {"x": "1"})], **fields},
            {"role": "tool", "content": "1", "tool_call_id": call_id, **fields},
        ]

    # Answered exactly at the second window's start.
    thread("t-start", agent, [{"role": "user", "content": "q"}, *tool_turn("s1")], at=day[1] - 3 * second)
    thread("t-start", agent, [{"role": "assistant", "content": "start answer"}], at=day[1])
    # Tool calls at the first window's end, a reply in the second, the answer two days later.
    thread("t-late", agent, [{"role": "user", "content": "q"}, *tool_turn("l1")[:1]], at=day[1] - 2 * second)
    thread("t-late", agent, [tool_turn("l1")[1], *tool_turn("l2")], at=day[1] + 3600 * second)
    thread("t-late", agent, [{"role": "assistant", "content": "late answer"}], at=day[3] - 60 * second)
    # Several answers in one window, then one more the next day.
    thread(
        "t-many",
        agent,
        [
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "many 1"},
            {"role": "user", "content": "q2"},
            *tool_turn("m1"),
            {"role": "assistant", "content": "many 2"},
        ],
        at=day[0] + 3600 * second,
    )
    thread("t-many", agent, [{"role": "user", "content": "q3"}, *tool_turn("m2")], at=day[0] + 7200 * second)
    thread("t-many", agent, [{"role": "assistant", "content": "many 3"}], at=day[1] + 7200 * second)
    # A failed attempt answered at the first window's end, retried in the second.
    thread(
        "t-retry",
        agent,
        [
            {"role": "user", "content": "q"},
            *tool_turn("r1", attempt=failed),
            {"role": "assistant", "content": "failed answer", "attempt": failed, "is_error": True},
        ],
        at=day[1] - 5 * second,
    )
    thread("t-retry", agent, [*tool_turn("r2", attempt=retried)], at=day[1] + second)
    thread("t-retry", agent, [{"role": "assistant", "content": "retried answer", "attempt": retried}], at=day[2])
    # Imported out of order: the later rows were written first.
    thread("t-import", agent, [{"role": "assistant", "content": "import 2"}], at=day[1] + 60 * second)
    thread("t-import", agent, [{"role": "user", "content": "q2"}], at=day[1] + 30 * second)
    thread("t-import", agent, [{"role": "user", "content": "q1"}, *tool_turn("i1")], at=day[0] + 60 * second)
    thread("t-import", agent, [{"role": "assistant", "content": "import 1"}], at=day[1] - second)

    trained: dict[str, int] = {}
    for start in day:
        run = export_run(data_type="conversations", start_date=start.date(), end_date=start.date())
        lines = Path(run.path).read_text("utf-8").splitlines() if run.path else []
        for example in map(json.loads, lines):
            chat_example_validate(example)
            for message in example["messages"]:
                if message["role"] == "assistant":
                    name = message.get("content") or message["tool_calls"][0]["id"]
                    trained[name] = trained.get(name, 0) + message["weight"]
    assert trained == {
        "s1": 1,
        "start answer": 1,
        "l1": 1,
        "l2": 1,
        "late answer": 1,
        "many 1": 1,
        "m1": 1,
        "many 2": 1,
        "m2": 1,
        "many 3": 1,
        "r1": 0,
        "failed answer": 0,
        "r2": 1,
        "retried answer": 1,
        "i1": 1,
        "import 1": 1,
        "import 2": 1,
    }


def test_a_lone_surrogate_escaped_in_json_text_is_written_escaped_not_failing_the_export(db, out):
    """A model's tool call arguments (JSON text, stored as a string) may escape half of a
    surrogate pair, as may a user's message holding JSON; Python's parser reads it as a lone
    surrogate, which no UTF-8 line can hold."""
    agent = AgentFactory(system_prompt="calc", config={"tools": ["calculator"]})
    cut_emoji = '{"expression": "\\ud83d"}'
    thread(
        "t-1",
        agent,
        [
            {"role": "user", "content": "What is 2+2?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": cut_emoji}}
                ],
            },
            {"role": "tool", "content": "4", "tool_call_id": "c1"},
            {"role": "assistant", "content": "4."},
        ],
    )
    # Redaction rewrites this content (a password under its key), with the lone surrogate in it.
    thread(
        "t-2",
        agent,
        [
            {"role": "user", "content": '{"password": "hunter2", "q": "\\udc00"}'},
            {"role": "assistant", "content": "ok"},
        ],
    )

    run = export_run(data_type="conversations", start_date=DAY, end_date=DAY)

    assert run.status == "succeeded" and run.rows == 2
    first, second = exported(out)
    assert json.loads(first["messages"][2]["tool_calls"][0]["function"]["arguments"]) == {"expression": "\ud83d"}
    assert first["messages"][2]["tool_calls"][0]["function"]["arguments"] == '{"expression":"\\ud83d"}'
    assert json.loads(second["messages"][1]["content"]) == {"password": "[REDACTED]", "q": "\udc00"}


def test_a_long_threads_example_holds_the_history_its_trained_turn_was_sent_not_the_whole_thread(db, out, settings):
    """The agent is sent the last CONVERSATION_HISTORY_MESSAGES of its thread; the example
    training its answer must hold that context, not every message the thread ever had (which
    the model never saw, and which every later day's file would repeat, growing without end)."""
    from orchestration.services.conversations import conversation_history

    settings.CONVERSATION_HISTORY_MESSAGES = 4
    agent = AgentFactory(system_prompt="")
    earlier = []
    for n in range(1, 6):
        earlier += [{"role": "user", "content": f"q{n}"}, {"role": "assistant", "content": f"a{n}"}]
    thread("t-long", agent, earlier, at=T0 - dt.timedelta(days=1))
    thread("t-long", agent, [{"role": "user", "content": "q6"}, {"role": "assistant", "content": "a6"}])

    export_run(data_type="conversations", start_date=DAY, end_date=DAY)
    (example,) = exported(out)
    question = AgentPlaygroundMessage.objects.get(instance_id="t-long", content="q6")
    sent = conversation_history(instance_id="t-long", up_to=question)
    assert [m["content"] for m in sent] == ["q5", "a5", "q6"]
    assert [m["content"] for m in example["messages"]] == ["q5", "a5", "q6", "a6"]
    assert [m.get("weight") for m in example["messages"] if m["role"] == "assistant"] == [0, 1]
