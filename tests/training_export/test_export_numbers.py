"""JSON numbers in the exports: written as PostgreSQL stores them, never through a float (which
rounds a long one, makes a huge one Infinity, written `null`, and a tiny one 0)."""

from __future__ import annotations

import csv
import datetime as dt
import json
from decimal import Decimal
from pathlib import Path

from django.db import connection

from orchestration.event_types import EventType
from orchestration.models import Event, TaskExecution
from orchestration.services.events import event_record, task_event
from tests.factories import AgentFactory, TaskExecutionFactory, WorkflowFactory
from tests.training_export.test_chat import thread
from tests.training_export.test_synapse_consumer import consume, synapse  # noqa: F401 (a fixture)
from training_export.services import store as store_module
from training_export.services.export import export_run
from training_export.services.jsonl import json_line, json_load
from training_export.services.manifest import manifest_read
from training_export.services.store import TrainingDataStore

DAY = dt.date(2024, 3, 5)
T0 = dt.datetime(2024, 3, 5, 10, 0, tzinfo=dt.UTC)
# As jsonb text: PostgreSQL writes every number with its digits, never an exponent.
HUGE_FRACTION = "1" + "0" * 400 + ".5"  # beyond a float's range: Infinity, which orjson writes null
TINY = "0." + "0" * 400 + "15"  # below a float's: 0.0
LONG = "12345678901234567890.5"  # more digits than a float holds
BIG_INT = "123456789012345678901234567890"
NUMBERS = f'{{"huge": {HUGE_FRACTION}, "tiny": {TINY}, "long": {LONG}, "int": {BIG_INT}, "plain": 1.5}}'


def exact(text: str):
    return json.loads(text, parse_float=Decimal)


def set_output(execution_id: str) -> None:
    """The task's output_data as the jsonb of NUMBERS (the ORM would pass it through floats)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE task_executions SET output_data = %s::jsonb WHERE execution_id = %s", [NUMBERS, execution_id]
        )


def test_jsonl_exports_write_every_jsonb_number_as_stored(db, out):
    task = TaskExecutionFactory(status=TaskExecution.Status.COMPLETED, started_at=T0, completed_at=T0)
    set_output(task.pk)
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO events (event_id, event_type, entity_type, entity_id, source, payload, severity, created_at) "
            "VALUES ('ev-1', 'tool_executed', 'tool', 'calculator', 'platform', "
            "jsonb_build_object('tool_name', 'calculator', 'input_params', %s::jsonb), 'info', %s)",
            [NUMBERS, T0],
        )
    expected = exact(NUMBERS)
    tasks = export_run(data_type="tasks", start_date=DAY, end_date=DAY)
    assert exact(Path(tasks.path).read_text("utf-8"))["output_data"] == expected
    assert f'"huge":{HUGE_FRACTION},' in Path(tasks.path).read_text("utf-8"), "digit for digit"
    tools = export_run(data_type="tool_executions", start_date=DAY, end_date=DAY)
    assert exact(Path(tools.path).read_text("utf-8"))["input_params"] == expected
    events = export_run(data_type="events", start_date=DAY, end_date=DAY)
    assert exact(Path(events.path).read_text("utf-8"))["payload"]["input_params"] == expected


def test_chat_tool_call_arguments_keep_their_numbers_and_non_json_ones_are_skipped(db, out):
    agent = AgentFactory(config={"tools": ["calculator"]})
    arguments = '{"x": 1e400, "n": 123456789012345678901234567890, "y": 0.1}'
    thread(
        "t-big",
        agent,
        [
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": arguments}}
                ],
            },
            {"role": "tool", "content": '{"result": 1}', "tool_call_id": "c1"},
            {"role": "assistant", "content": "done"},
        ],
    )
    thread(
        "t-nan",
        agent,
        [
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"id": "c2", "type": "function", "function": {"name": "calculator", "arguments": '{"x": NaN}'}}
                ],
            },
            {"role": "tool", "content": "{}", "tool_call_id": "c2"},
            {"role": "assistant", "content": "done"},
        ],
    )
    thread("t-ok", agent, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "tool_calls": None}])
    run = export_run(data_type="conversations", start_date=DAY, end_date=DAY)
    examples = [json.loads(line) for line in Path(run.path).read_text("utf-8").splitlines()]
    written = examples[0]["messages"][1]["tool_calls"][0]["function"]["arguments"]
    assert written == '{"n":123456789012345678901234567890,"x":1' + "0" * 400 + ',"y":0.1}'
    assert len(examples) == 2  # t-nan: not valid JSON for the fine-tuning API
    assert manifest_read(Path(run.path).parent)["skipped"] == {"the arguments of tool call 'c2' are not valid JSON": 1}


def test_csv_partitions_write_every_jsonb_number_as_stored(synapse):  # noqa: F811
    workflow = WorkflowFactory(status="completed", started_at=T0, completed_at=T0)
    task = TaskExecutionFactory(workflow=workflow, status="completed", started_at=T0, completed_at=T0)
    set_output(task.pk)
    event = event_record(
        event_type=EventType.AGENT_STARTED, entity_type="agent", entity_id="a", payload={"note": "placeholder"}
    )
    with connection.cursor() as cursor:  # an event whose payload holds the numbers (events are append-only)
        cursor.execute(
            "INSERT INTO events (event_id, event_type, entity_type, entity_id, agent_id, source, payload, severity) "
            "VALUES ('ev-n', 'tool_executed', 'tool', 'calculator', 'calculator', 'platform', "
            "jsonb_build_object('tool_name', 'calculator', 'output_result', %s::jsonb), 'info')",
            [NUMBERS],
        )
    task_event(TaskExecution.objects.get(pk=task.pk), EventType.TASK_COMPLETED)
    synapse.relay()
    consume()
    day = Event.objects.get(pk=event.pk).created_at.astimezone(dt.UTC).date()
    expected = exact(NUMBERS)
    events = {row["event_id"]: row for row in synapse.rows("events", day)}
    assert exact(events["ev-n"]["payload"])["output_result"] == expected
    tool_rows = synapse.rows("tool_executions", day)
    assert [exact(row["output_result"]) for row in tool_rows] == [expected]
    (task_row,) = synapse.rows("tasks", day)
    assert exact(task_row["output_data"]) == expected
    assert f'"huge":{HUGE_FRACTION},' in task_row["output_data"]


def test_the_store_writes_a_float_that_is_not_finite_as_no_value(tmp_path, settings):
    store = TrainingDataStore(tmp_path)
    store.write_rows(
        "tool_executions",
        DAY,
        [
            {
                "event_id": "e1",
                "execution_id": "x",
                "agent_id": "a",
                "tool_name": "t",
                "input_params": {"a": float("inf"), "b": [float("nan"), 10**30]},
                "execution_time_ms": float("nan"),
                "created_at": T0,
            }
        ],
    )
    with store.path("tool_executions", DAY).open(newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["execution_time_ms"] == ""
    assert json.loads(row["input_params"]) == {"a": None, "b": [None, 10**30]}


def test_a_number_a_float_holds_is_read_as_one_beside_a_long_integer():
    """A record with an id of 19 digits is parsed by the standard library, but its other numbers
    are the floats orjson reads: written as in any other record (they were Decimals, written
    `1.50` here and `1.5` elsewhere, and every such record took the slow encoder: an export
    of 50 000 tasks each with a 19-digit id took 15 s instead of 5)."""
    plain = json_load('{"a": 1.50, "b": 0.0000001, "c": 0.1}')
    beside_long = json_load('{"a": 1.50, "b": 0.0000001, "c": 0.1, "id": 1234567890123456789}')
    assert [type(beside_long[k]) for k in "abc"] == [float, float, float]
    assert json_line(beside_long) == json_line({**plain, "id": 1234567890123456789})
    # Those a float does not hold stay exact.
    small = "0.000000000000000000015"  # below 1e-18
    exact_ones = json_load(f'{{"huge": {HUGE_FRACTION}, "tiny": {TINY}, "long": {LONG}, "small": {small}}}')
    assert all(isinstance(value, Decimal) for value in exact_ones.values())
    assert json_line(exact_ones) == (
        f'{{"huge":{HUGE_FRACTION},"long":{LONG},"small":{small},"tiny":{TINY}}}\n'.encode()
    )


def test_a_string_holding_the_placeholder_of_an_exact_number_is_written_as_it_is(monkeypatch):
    """json_dumps_exact writes each Decimal as a string placeholder (a NUL, a random token, an
    index), then puts the digits in its place: a string of the value holding the same text
    (its NUL is escaped alike) takes a new token instead of being made a number."""
    tokens = iter(["abcd", "ef01"])
    monkeypatch.setattr(store_module.secrets, "token_hex", lambda n: next(tokens))
    value = {"n": Decimal("1" + "0" * 30), "s": "\x00abcd0\x00", "t": '"\x00abcd0\x00"'}
    assert json.loads(store_module.json_dumps_exact(value)) == {"n": 10**30, "s": value["s"], "t": value["t"]}
