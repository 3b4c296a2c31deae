"""The keys that join the exported files: a tool call in the conversations export to its row in
the tool_executions export, and each example to its thread, messages, tasks and attempts."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from pathlib import Path

from django.core.management import call_command
from django.db import transaction
from django.utils import timezone

from orchestration.event_types import EventType
from orchestration.models import Agent, AgentPlaygroundMessage, TaskExecution
from orchestration.runtime.tools import ToolCall
from orchestration.services.conversations import conversation_message_post
from orchestration.services.interactions import tool_call_record
from tests.engine import wait_for
from tests.factories import AgentFactory, EventFactory, TaskAttemptFactory, TaskExecutionFactory
from tests.training_export.test_chat import call, thread
from tests.training_export.test_synapse_consumer import consume, synapse  # noqa: F401 (a fixture)
from training_export.services.chat import KEYS_FILE, ChatExporter, chat_example_validate
from training_export.services.export import export_run
from training_export.services.jsonl import EXPORTERS, TOOL_RECORD_COLUMNS
from training_export.services.manifest import manifest_read
from training_export.services.store import SCHEMAS, TrainingDataStore

DAY = dt.date(2024, 3, 5)
T0 = dt.datetime(2024, 3, 5, 10, 0, tzinfo=dt.UTC)


def reply_to(message: AgentPlaygroundMessage) -> TaskExecution:
    return wait_for(
        lambda: (t := TaskExecution.objects.get(pk=message.execution_id)).is_terminal and t,
        timeout=30,
        what="the reply",
    )


def test_each_tool_call_of_a_conversation_joins_its_tool_executions_row(worker):
    call_command("load_agents", stdout=io.StringIO())
    assistant = Agent.objects.get(pk="assistant")
    for content in ("2 + 3", "ans * 10"):
        reply_to(conversation_message_post(agent=assistant, instance_id="t-join", content=content))
    start = timezone.now().replace(hour=0, minute=0, second=0, microsecond=0)
    end = timezone.now() + dt.timedelta(seconds=1)
    chat = ChatExporter()
    with transaction.atomic():  # the exports' named cursors live in one
        examples = [json.loads(line) for line in chat.lines(start, end)]
        tools = [json.loads(line) for line in EXPORTERS["tool_executions"].lines(start, end)]
    keys = [json.loads(line) for line in chat.keys_lines]

    assert len(examples) == len(keys) == 1 and len(tools) == 2
    assert set(tools[0]) == set(TOOL_RECORD_COLUMNS)
    example, key = examples[0], keys[0]
    assert key["instance_id"] == "t-join" and len(key["messages"]) == len(example["messages"])
    rows = {(t["execution_id"], t["attempt_number"], t["tool_call_id"]): t for t in tools}
    assert len(rows) == 2, "the three keys name one tool_executions row each"
    replies = {m["tool_call_id"]: m["content"] for m in example["messages"] if m["role"] == "tool"}
    joined = 0
    for message, source in zip(example["messages"], key["messages"], strict=True):
        if source["message_id"] is not None:
            stored = AgentPlaygroundMessage.objects.get(pk=source["message_id"])
            assert (stored.role, stored.execution_id) == (message["role"], source["execution_id"])
        for tool_call in message.get("tool_calls", []):
            call_key = key["tool_calls"][tool_call["id"]]
            row = rows[(call_key["execution_id"], call_key["attempt_number"], call_key["tool_call_id"])]
            assert row["tool_name"] == tool_call["function"]["name"]
            assert row["input_params"] == json.loads(tool_call["function"]["arguments"])
            assert json.loads(replies[tool_call["id"]]) == row["output_result"]
            joined += 1
    assert joined == 2


def test_the_conversations_export_writes_a_keys_line_per_example_listed_in_its_manifest(db, out):
    agent = AgentFactory(config={"tools": ["calculator"]})
    execution = TaskExecutionFactory(agent=agent, workflow=None)
    failed = TaskAttemptFactory(execution=execution, attempt_number=1, failed=True, started_at=T0)
    retried = TaskAttemptFactory(execution=execution, attempt_number=2, succeeded=True, started_at=T0)
    turn = [{"role": "user", "content": "2+2?"}]
    for attempt in (failed, retried):  # a server that numbers each answer's calls from zero
        turn += [
            {"role": "assistant", "content": "", "tool_calls": [call("call_0", "calculator", {"x": "2+2"})]},
            {"role": "tool", "content": f'{{"result": {attempt.attempt_number}}}', "tool_call_id": "call_0"},
        ]
        turn[-2:] = [{**m, "attempt": attempt, "execution": execution} for m in turn[-2:]]
    turn.append({"role": "assistant", "content": "4", "attempt": retried, "execution": execution})
    thread("t-1", agent, turn)
    thread("t-2", agent, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}])

    run = export_run(data_type="conversations", start_date=DAY, end_date=DAY)
    directory = Path(run.path).parent
    examples = [json.loads(line) for line in Path(run.path).read_text("utf-8").splitlines()]
    keys = [json.loads(line) for line in (directory / KEYS_FILE).read_text("utf-8").splitlines()]
    assert [k["instance_id"] for k in keys] == ["t-1", "t-2"] and len(examples) == 2
    for example, key in zip(examples, keys, strict=True):
        chat_example_validate(example)
        assert len(key["messages"]) == len(example["messages"])
    ids = [c["id"] for m in examples[0]["messages"] for c in m.get("tool_calls", [])]
    assert ids == ["call_0", "call_0-1"]
    assert keys[0]["tool_calls"] == {
        "call_0": {"tool_call_id": "call_0", "execution_id": execution.pk, "attempt_number": 1},
        "call_0-1": {"tool_call_id": "call_0", "execution_id": execution.pk, "attempt_number": 2},
    }
    manifest = manifest_read(directory)
    assert manifest["files"][1] == {
        "path": KEYS_FILE,
        "keys_of": "conversations-train.jsonl",
        "rows": 2,
        "bytes": (directory / KEYS_FILE).stat().st_size,
        "sha256": manifest["files"][1]["sha256"],
    }
    again = export_run(data_type="conversations", start_date=DAY, end_date=DAY, force=True)
    assert manifest_read(directory) == manifest and again.checksum == run.checksum


def test_tool_executions_records_carry_the_call_id_and_attempt_and_the_manifest_lists_the_columns(db, out):
    EventFactory(
        event_type=EventType.TOOL_EXECUTED,
        entity_type="tool",
        entity_id="calculator",
        created_at=T0,
        payload={
            "execution_id": "ex-1",
            "attempt_number": 2,
            "agent_id": "calculator",
            "tool_name": "calculator",
            "tool_call_id": "call_0",
            "input_params": {"x": 1},
            "output_result": {"result": 1},
            "execution_time_ms": 1.5,
            "error": None,
        },
    )
    run = export_run(data_type="tool_executions", start_date=DAY, end_date=DAY)
    record = json.loads(Path(run.path).read_text("utf-8"))
    assert (record["execution_id"], record["attempt_number"], record["tool_call_id"]) == ("ex-1", 2, "call_0")
    assert (
        manifest_read(Path(run.path).parent)["columns"]
        == list(TOOL_RECORD_COLUMNS)
        == list(EXPORTERS["tool_executions"].record_columns)
    )
    assert sorted(record) == sorted(TOOL_RECORD_COLUMNS)


def test_a_tool_executions_partition_an_earlier_version_began_keeps_its_columns_to_the_days_end(tmp_path):
    """A day's file begun by the earlier release (before attempt_number and tool_call_id) is
    appended to in its own columns, in place: a rewrite with the new columns replaced the file,
    and a writer of that release waiting for its lock (a rolling deploy) appended to the
    replaced one, losing rows it acknowledged. The next day's file has the new columns."""
    old_header = (
        "execution_id,agent_id,tool_name,input_params,output_result,execution_time_ms,error,created_at,event_id\n"
    )
    old_row = 'ex-0,a,calculator,"{""x"":1}","{""result"":1}",1.5,,2024-03-05T09:00:00+00:00,ev-0\n'
    path = tmp_path / "tool_executions" / "tool_executions_2024-03-05.csv"
    path.parent.mkdir()
    path.write_text(old_header + old_row + "ex-torn,a,calc")  # a torn last row, never acknowledged
    inode = path.stat().st_ino

    def call_row(n: int, day: dt.date = DAY) -> dict:
        return {
            "event_id": f"ev-{n}",
            "execution_id": "ex-1",
            "attempt_number": n,
            "agent_id": "a",
            "tool_name": "calculator",
            "tool_call_id": f"call_{n}",
            "input_params": {"x": n, "note": 'a, "quoted"\nline'},
            "output_result": {"result": n},
            "created_at": dt.datetime.combine(day, dt.time(10), tzinfo=dt.UTC),
        }

    stores = [TrainingDataStore(tmp_path), TrainingDataStore(tmp_path)]  # two writers (consumers)
    for n, store in enumerate(stores, start=1):
        store.write_rows("tool_executions", DAY, [call_row(n)])
    stores[0].write_rows("tool_executions", DAY, [{"event_id": "ev-0", "execution_id": "ex-0", "created_at": T0}])
    with path.open("a") as earlier_release:  # its writer appends in the same columns, to the same file
        earlier_release.write('ex-9,a,calculator,"{}","{}",1.5,,2024-03-05T11:00:00+00:00,ev-9\n')
    stores[1].write_rows("tool_executions", DAY, [call_row(3)])
    assert path.stat().st_ino == inode
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(old_header.strip().split(","))
    assert [(r["event_id"], r["input_params"]) for r in rows] == [
        ("ev-0", '{"x":1}'),  # written once
        ("ev-1", '{"note":"a, \\"quoted\\"\\nline","x":1}'),
        ("ev-2", '{"note":"a, \\"quoted\\"\\nline","x":2}'),
        ("ev-9", "{}"),
        ("ev-3", '{"note":"a, \\"quoted\\"\\nline","x":3}'),
    ]
    next_day = DAY + dt.timedelta(days=1)
    stores[0].write_rows("tool_executions", next_day, [call_row(4, next_day)])
    with stores[0].path("tool_executions", next_day).open(newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert list(row) == list(SCHEMAS["tool_executions"].columns)
    assert (row["attempt_number"], row["tool_call_id"]) == ("4", "call_4")


def test_the_consumer_writes_the_call_id_and_attempt_of_each_tool_call(synapse):  # noqa: F811
    tool_call_record(
        call=ToolCall(
            call_id="call_7",
            tool_name="calculator",
            input_params={"expression": "1+1"},
            output_result={"result": 2},
            execution_time_ms=1.0,
            error=None,
        ),
        execution_id="ex-7",
        agent_id="calculator",
        workflow_id=None,
        attempt_number=3,
    )
    synapse.relay()
    consume()
    (row,) = synapse.rows("tool_executions", timezone.now().astimezone(dt.UTC).date())
    assert (row["execution_id"], row["attempt_number"], row["tool_call_id"]) == ("ex-7", "3", "call_7")


def test_a_workflows_partition_an_earlier_version_began_keeps_its_columns_to_the_days_end(tmp_path):
    """As a tool_executions one: a day's workflows file begun before cancelled_steps and
    wasted_cost_usd is appended to in its own columns, in place; the next day's has them."""
    old_columns = [c for c in SCHEMAS["workflows"].columns if c not in ("cancelled_steps", "wasted_cost_usd")]
    path = tmp_path / "workflows" / "workflows_2024-03-05.csv"
    path.parent.mkdir()
    path.write_text(",".join(old_columns) + "\nwf-0,first,,completed,1,1,0,,10,5,0.001000,,,,ev-0\n")
    inode = path.stat().st_ino

    def workflow_row(n: int) -> dict:
        return {
            "event_id": f"ev-{n}",
            "workflow_id": f"wf-{n}",
            "name": "w",
            "status": "failed",
            "total_steps": 3,
            "completed_steps": 1,
            "failed_steps": 1,
            "cancelled_steps": 1,
            "total_cost_usd": "0.004000",
            "wasted_cost_usd": "0.002000",
        }

    store = TrainingDataStore(tmp_path)
    store.write_rows("workflows", DAY, [workflow_row(1)])
    assert path.stat().st_ino == inode
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == old_columns
    assert [(r["event_id"], r["failed_steps"], r["total_cost_usd"]) for r in rows] == [
        ("ev-0", "0", "0.001000"),
        ("ev-1", "1", "0.004000"),
    ]
    next_day = DAY + dt.timedelta(days=1)
    store.write_rows("workflows", next_day, [workflow_row(2)])
    with store.path("workflows", next_day).open(newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert list(row) == list(SCHEMAS["workflows"].columns)
    assert (row["cancelled_steps"], row["wasted_cost_usd"]) == ("1", "0.002000")
