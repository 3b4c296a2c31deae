"""A reply stored with no text and no tool calls (a model that answered "") in a thread's
chat export."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from tests.factories import AgentFactory
from tests.training_export.test_chat import DAY, T0, thread
from training_export.services.chat import chat_example_validate
from training_export.services.export import export_run


def examples(run) -> list[dict]:
    return [json.loads(line) for line in Path(run.path).read_text("utf-8").splitlines()]


def test_an_empty_reply_is_left_out_and_the_rest_of_the_thread_is_exported(db, out):
    agent = AgentFactory(system_prompt="Be brief.")
    thread(
        "t-empty",
        agent,
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "hello?"},
            {"role": "assistant", "content": "Hello!"},
        ],
    )
    run = export_run(data_type="conversations", start_date=DAY, end_date=DAY)
    assert run.rows == 1, json.loads((Path(run.path).parent / "manifest.json").read_text())["skipped"]
    (example,) = examples(run)
    chat_example_validate(example)
    assert [(m["role"], m["content"], m.get("weight")) for m in example["messages"]] == [
        ("system", "Be brief.", None),
        ("user", "hi", None),
        ("user", "hello?", None),
        ("assistant", "Hello!", 1),
    ]
    manifest = json.loads((Path(run.path).parent / "manifest.json").read_text())
    assert manifest["skipped"] == {}
    assert manifest["left_out"] == {"empty assistant message": 1}


def test_an_empty_reply_of_an_earlier_day_does_not_drop_the_thread_from_later_days(db, out):
    agent = AgentFactory()
    thread("t-empty", agent, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}])
    thread(
        "t-empty",
        agent,
        [{"role": "user", "content": "still there?"}, {"role": "assistant", "content": "Yes."}],
        at=T0 + dt.timedelta(days=1),
    )
    first = export_run(data_type="conversations", start_date=DAY, end_date=DAY)
    second = export_run(data_type="conversations", start_date="2024-03-06", end_date="2024-03-06")
    # The first day has nothing to train (its only answer is empty): skipped and counted.
    assert first.rows == 0
    assert second.rows == 1
    (example,) = examples(second)
    chat_example_validate(example)
    assert [m["content"] for m in example["messages"]] == ["hi", "still there?", "Yes."]
