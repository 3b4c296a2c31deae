"""The Synapse consumer: relay -> Redis Stream -> consumer group -> daily CSV partitions."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
import redis
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db.models import Max, Min
from django.utils import timezone

from orchestration.event_types import EventType
from orchestration.models import Event, TaskExecution, Workflow
from orchestration.runtime.context import Usage
from orchestration.services.events import event_record, task_event, workflow_event
from orchestration.services.relay import event_to_entry, events_relay
from orchestration.services.workflows import task_retry
from tests.engine import ROOT, PrivateRedis, output_of, wait_for
from tests.factories import AgentFactory, EventFactory, TaskExecutionFactory, WorkflowFactory
from tests.orchestration.test_accounting_edges import _run_attempt
from training_export.services.store import TrainingDataStore
from training_export.services.synapse import MalformedEntry, SynapseConsumer, parse_entry

T0 = dt.datetime(2024, 3, 5, 10, 0, tzinfo=dt.UTC)
GROUP = "training"


class Synapse:
    """A private stream for one test, and the helpers to feed and read it."""

    def __init__(self, client: redis.Redis, data_dir: Path, baseline: int) -> None:
        self.client = client
        self.data_dir = data_dir
        self.stream = settings.SYNAPSE_STREAM
        self.baseline = baseline

    def relay(self) -> None:
        """Publish this test's events. The stream starts just below the test's first event:
        rolled-back tests leave holes in the sequence, and the relay rightly waits on holes."""
        if not self.client.exists(self.stream):
            first = Event.objects.filter(sequence__gt=self.baseline).aggregate(first=Min("sequence"))["first"]
            self.client.xadd(self.stream, {"placeholder": "1"}, id=f"{first - 1}-1")
            self.client.xdel(self.stream, f"{first - 1}-1")
        result = events_relay(client=self.client)
        assert result.waiting_on_gap is None

    def consumer(self, name: str) -> SynapseConsumer:
        return SynapseConsumer(
            client=self.client,
            store=TrainingDataStore(self.data_dir),
            stream=self.stream,
            group=GROUP,
            consumer=name,
        )

    def pending(self, group: str = GROUP) -> int:
        return self.client.xpending(self.stream, group)["pending"]

    def path(self, data_type: str, day: dt.date) -> Path:
        return self.data_dir / data_type / f"{data_type}_{day.isoformat()}.csv"

    def rows(self, data_type: str, day: dt.date) -> list[dict[str, str]]:
        with self.path(data_type, day).open(newline="") as fh:
            return list(csv.DictReader(fh))

    def event_ids(self, data_type: str, day: dt.date) -> list[str]:
        return [row["event_id"] for row in self.rows(data_type, day)]


@pytest.fixture
def synapse(db, settings, tmp_path: Path) -> Iterator[Synapse]:
    stream = f"synapse-test-{uuid.uuid4().hex[:8]}"
    settings.SYNAPSE_STREAM = stream
    settings.TRAINING_DATA_DIR = tmp_path / "training"
    client = redis.Redis.from_url(settings.REDIS_URL)
    baseline = Event.objects.aggregate(last=Max("sequence"))["last"] or 0
    yield Synapse(client, settings.TRAINING_DATA_DIR, baseline)
    client.delete(stream, f"{stream}:dead", f"{stream}:relay:gaps")
    client.close()


def consume(*args: str) -> str:
    out = io.StringIO()
    call_command("consume_events", "--once", *args, stdout=out)
    return out.getvalue()


def utc(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat()


def compact(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def finished_workflow() -> tuple[Workflow, TaskExecution, TaskExecution]:
    agent = AgentFactory()
    workflow = WorkflowFactory(
        name="research",
        status=Workflow.Status.FAILED,
        total_steps=2,
        completed_steps=1,
        failed_steps=1,
        error="task review failed",
        total_tokens_used=42,
        total_cost_usd=Decimal("0.0125"),
        wasted_cost_usd=Decimal("0.0025"),
        created_at=T0,
        started_at=T0,
        completed_at=T0 + dt.timedelta(seconds=5, milliseconds=250),
    )
    done = TaskExecutionFactory(
        workflow=workflow,
        agent=agent,
        task_name="summarize",
        task_type="llm",
        status=TaskExecution.Status.COMPLETED,
        input_data={"text": "hello", "b": 1},
        output_data={"summary": "hi"},
        retry_count=1,
        max_retries=3,
        timeout_seconds=60,
        execution_time_ms=250.5,
        input_tokens=30,
        output_tokens=12,
        tokens_used=42,
        cost_usd=Decimal("0.0125"),
        created_at=T0,
        started_at=T0 + dt.timedelta(seconds=1),
        completed_at=T0 + dt.timedelta(seconds=2, milliseconds=500),
    )
    failed = TaskExecutionFactory(
        workflow=workflow,
        agent=agent,
        task_name="review",
        status=TaskExecution.Status.FAILED,
        error='boom, "quoted"\nsecond line',
        max_retries=0,
        created_at=T0,
    )
    return workflow, done, failed


def test_every_event_and_each_finished_task_workflow_and_tool_call_is_written_exactly(
    synapse, django_assert_num_queries
):
    workflow, done, failed = finished_workflow()
    events = [
        task_event(done, EventType.TASK_STARTED),
        task_event(done, EventType.TASK_TIMED_OUT),  # followed by task_retrying: not a tasks row
        task_event(done, EventType.TASK_RETRYING),
        task_event(done, EventType.TASK_COMPLETED),
        event_record(
            event_type=EventType.TOOL_EXECUTED,
            entity_type="tool",
            entity_id="tool-exec-1",
            workflow_id=workflow.workflow_id,
            agent_id=done.agent_id,
            payload={"tool_name": "calculate", "input_params": {"expression": "2+2"}, "output_result": {"result": 4}},
        ),
        task_event(failed, EventType.TASK_FAILED, payload={"error": "boom"}),
        workflow_event(workflow, EventType.WORKFLOW_FAILED, payload={"failed_steps": 1}),
    ]
    synapse.relay()
    # The group there, having read up to this test's events, as a deployment's is (made by the
    # consumer on a stream whose first entry was deleted, it would first read the events below
    # it from PostgreSQL: one query more, whenever earlier tests used up sequence numbers).
    first = min(event.sequence for event in events)
    synapse.client.xgroup_create(synapse.stream, GROUP, id=f"{first - 1}-1")

    with django_assert_num_queries(2):  # the batch's task rows in one query, its workflow rows in another
        consume()

    events = [Event.objects.get(pk=event.pk) for event in events]
    day = events[0].created_at.astimezone(dt.UTC).date()
    assert (
        synapse.path("events", day)
        .read_text()
        .startswith(
            "event_id,sequence,event_type,entity_type,entity_id,workflow_id,agent_id,session_id,source,severity,"
            "created_at,payload\n"
        )
    )
    assert synapse.rows("events", day) == [
        {
            "event_id": event.event_id,
            "sequence": str(event.sequence),
            "event_type": event.event_type,
            "entity_type": event.entity_type,
            "entity_id": event.entity_id,
            "workflow_id": event.workflow_id,
            "agent_id": event.agent_id or "",
            "session_id": "",
            "source": "platform",
            "severity": event.severity,
            "created_at": utc(event.created_at),
            "payload": compact(event.payload),
        }
        for event in events
    ]
    completed_event, tool_event, failed_event, workflow_failed_event = events[3], events[4], events[5], events[6]
    assert synapse.rows("tasks", day) == [
        {
            "execution_id": done.execution_id,
            "workflow_id": workflow.workflow_id,
            "agent_id": done.agent_id,
            "task_name": "summarize",
            "task_type": "llm",
            "status": "completed",
            "input_data": '{"b":1,"text":"hello"}',
            "output_data": '{"summary":"hi"}',
            "error": "",
            "retry_count": "1",
            "max_retries": "3",
            "timeout_seconds": "60",
            "execution_time_ms": "250.5",
            "input_tokens": "30",
            "output_tokens": "12",
            "tokens_used": "42",
            "cost_usd": "0.012500",
            "created_at": "2024-03-05T10:00:00+00:00",
            "started_at": "2024-03-05T10:00:01+00:00",
            "completed_at": "2024-03-05T10:00:02.500000+00:00",
            "event_id": completed_event.event_id,
        },
        {
            "execution_id": failed.execution_id,
            "workflow_id": workflow.workflow_id,
            "agent_id": failed.agent_id,
            "task_name": "review",
            "task_type": "",
            "status": "failed",
            "input_data": '{"text":"hello"}',
            "output_data": "",
            "error": 'boom, "quoted"\nsecond line',
            "retry_count": "0",
            "max_retries": "0",
            "timeout_seconds": "300",
            "execution_time_ms": "",
            "input_tokens": "0",
            "output_tokens": "0",
            "tokens_used": "0",
            "cost_usd": "0.000000",
            "created_at": "2024-03-05T10:00:00+00:00",
            "started_at": "",
            "completed_at": "",
            "event_id": failed_event.event_id,
        },
    ]
    assert synapse.rows("workflows", day) == [
        {
            "workflow_id": workflow.workflow_id,
            "name": "research",
            "workflow_type": "test",
            "status": "failed",
            "total_steps": "2",
            "completed_steps": "1",
            "failed_steps": "1",
            "cancelled_steps": "0",
            "error": "task review failed",
            "duration_ms": "5250",
            "total_tokens_used": "42",
            "total_cost_usd": "0.012500",
            "wasted_cost_usd": "0.002500",
            "created_at": "2024-03-05T10:00:00+00:00",
            "started_at": "2024-03-05T10:00:00+00:00",
            "completed_at": "2024-03-05T10:00:05.250000+00:00",
            "event_id": workflow_failed_event.event_id,
        }
    ]
    assert synapse.rows("tool_executions", day) == [
        {
            "execution_id": "tool-exec-1",
            "attempt_number": "",
            "agent_id": done.agent_id,
            "tool_name": "calculate",
            "tool_call_id": "",
            "input_params": '{"expression":"2+2"}',
            "output_result": '{"result":4}',
            "execution_time_ms": "",
            "error": "",
            "created_at": utc(tool_event.created_at),
            "event_id": tool_event.event_id,
        }
    ]
    assert synapse.pending() == 0


def test_a_terminal_event_whose_row_is_gone_still_writes_the_event(synapse):
    agent = AgentFactory()
    event = event_record(
        event_type=EventType.TASK_COMPLETED, entity_type="task", entity_id="no-such-task", agent_id=agent.id
    )
    synapse.relay()

    output = consume()

    day = event.created_at.astimezone(dt.UTC).date()
    assert synapse.event_ids("events", day) == [event.event_id]
    assert not synapse.path("tasks", day).exists()
    assert "rows missing from the database: 1" in output
    assert synapse.pending() == 0


def _queued_task() -> TaskExecution:
    """A running workflow's one task, queued at T0, with no retries."""
    return TaskExecution.objects.create(
        workflow=WorkflowFactory(status=Workflow.Status.RUNNING, started_at=T0, total_steps=1),
        agent=AgentFactory(),
        task_name="t",
        status=TaskExecution.Status.QUEUED,
        celery_task_id=str(uuid.uuid4()),
        queued_at=T0,
        max_retries=0,
    )


def test_the_rows_of_a_failure_are_as_it_ended_after_the_task_and_workflow_ran_again(synapse):
    """A failed task retried (the workflow resumed) and completed before the consumer reads
    the failure: the failure's rows still say how the first run ended, from their events'
    `state`, and the completion's rows how the second did."""
    task = _queued_task()
    _run_attempt(task, start=T0, usage=Usage(100, 50, Decimal("0.01")), fail=True)
    task_retry(execution_id=task.pk)  # resumes the workflow
    _run_attempt(task, start=T0 + dt.timedelta(hours=1), usage=Usage(10, 5, Decimal("0.002")), fail=False)
    ends = {
        event.event_type: event
        for event in Event.objects.filter(event_type__in=[*synapse_terminal_types()]).filter(
            sequence__gt=synapse.baseline
        )
    }
    synapse.relay()

    assert "rows run again since their event (no state recorded): 0" in consume()

    def row(data_type: str, event: Event) -> dict[str, str]:
        day = event.created_at.astimezone(dt.UTC).date()
        return next(r for r in synapse.rows(data_type, day) if r["event_id"] == event.event_id)

    failed, completed = row("tasks", ends["task_failed"]), row("tasks", ends["task_completed"])
    assert (failed["status"], failed["error"], failed["tokens_used"], failed["cost_usd"]) == (
        "failed",
        "PermanentError: bad",
        "150",
        "0.010000",
    )
    assert failed["completed_at"] == utc(T0 + dt.timedelta(minutes=5))
    assert failed["output_data"] == ""
    assert (completed["status"], completed["error"], completed["tokens_used"], completed["output_data"]) == (
        "completed",
        "",
        "165",
        '{"ok":1}',
    )
    assert completed["completed_at"] == utc(T0 + dt.timedelta(hours=1, minutes=5))
    assert row("workflows", ends["workflow_failed"])["status"] == "failed"
    assert row("workflows", ends["workflow_failed"])["completed_at"] == utc(T0 + dt.timedelta(minutes=5))
    assert row("workflows", ends["workflow_completed"])["status"] == "completed"
    # the failure's row, as its event recorded it, is what the row said then, column for column
    state = ends["task_failed"].payload["state"]
    assert failed["retry_count"] == str(state["retry_count"]) and failed["started_at"] == state["started_at"]


def test_a_workflow_failures_row_has_the_wasted_spend_it_ended_with_after_it_ran_again(synapse):
    """A workflow failed (a try paid $0.01 for nothing), was resumed and failed again (another
    $0.004) before the consumer read the first failure: that failure's row says what was
    wasted when it ended, as its total_cost_usd does, not the later run's wasted spend (more
    wasted than the row's total cost)."""
    task = _queued_task()
    _run_attempt(task, start=T0, usage=Usage(100, 50, Decimal("0.01")), fail=True)
    task_retry(execution_id=task.pk)  # resumes the workflow
    _run_attempt(task, start=T0 + dt.timedelta(hours=1), usage=Usage(10, 5, Decimal("0.004")), fail=True)
    failures = Event.objects.filter(event_type=EventType.WORKFLOW_FAILED, sequence__gt=synapse.baseline)
    first, second = failures.order_by("sequence")
    synapse.relay()
    consume()

    days = {event.created_at.astimezone(dt.UTC).date() for event in (first, second)}
    rows = {r["event_id"]: r for day in days for r in synapse.rows("workflows", day)}
    assert (rows[first.event_id]["total_cost_usd"], rows[first.event_id]["wasted_cost_usd"]) == (
        "0.010000",
        "0.010000",
    )
    assert (rows[second.event_id]["total_cost_usd"], rows[second.event_id]["wasted_cost_usd"]) == (
        "0.014000",
        "0.014000",
    )


def synapse_terminal_types() -> list[str]:
    return ["task_failed", "task_completed", "workflow_failed", "workflow_completed"]


def test_an_ending_without_state_whose_row_ran_again_gets_no_row(synapse):
    _workflow, done, failed = finished_workflow()
    old_style = task_event(failed, EventType.TASK_FAILED)  # as recorded before `state`
    failed.status = TaskExecution.Status.RUNNING  # retried since
    failed.save(update_fields=["status"])
    still = task_event(done, EventType.TASK_COMPLETED)
    synapse.relay()

    output = consume()

    day = old_style.created_at.astimezone(dt.UTC).date()
    assert [row["event_id"] for row in synapse.rows("tasks", day)] == [still.event_id]
    assert old_style.event_id in synapse.event_ids("events", day)
    assert "rows run again since their event (no state recorded): 1" in output


def test_consuming_again_writes_only_new_events_and_a_replaying_group_writes_nothing(synapse):
    first = EventFactory(created_at=T0)
    synapse.relay()
    consume()
    second = EventFactory(created_at=T0 + dt.timedelta(minutes=1))
    synapse.relay()

    consume()
    path = synapse.path("events", T0.date())
    content = path.read_text()
    # A new group is delivered the whole stream again: the file must absorb every entry.
    output = consume("--group", "replay", "-v", "2")

    assert synapse.event_ids("events", T0.date()) == [first.event_id, second.event_id]
    assert path.read_text() == content
    assert "duplicates skipped: 2" in output
    assert synapse.pending() == synapse.pending("replay") == 0
    assert synapse.client.xlen(synapse.stream) == 2  # the consumer never trims the stream


def test_a_crash_between_writing_and_acknowledging_loses_and_duplicates_nothing(synapse):
    workflow, done, failed = finished_workflow()
    events = [
        task_event(done, EventType.TASK_COMPLETED),
        task_event(failed, EventType.TASK_FAILED),
        workflow_event(workflow, EventType.WORKFLOW_FAILED),
    ]
    synapse.relay()
    crashed = synapse.consumer("worker-1")
    crashed.ensure_group()
    entries = crashed.read_new()
    crashed.write(entries)  # rows durable, then the process dies: no XACK
    day = Event.objects.get(pk=events[0].pk).created_at.astimezone(dt.UTC).date()
    tasks_file = synapse.path("tasks", day)
    # ...and it died between files: the events row of task_failed is there, its tasks row is not.
    header, first_row = tasks_file.read_text().splitlines(keepends=True)[:2]
    tasks_file.write_text(header + first_row)
    assert synapse.pending() == 3

    consume("--consumer", "worker-1")  # the same consumer restarts: its own pending entries first

    assert synapse.event_ids("events", day) == [event.event_id for event in events]
    assert synapse.event_ids("tasks", day) == [events[0].event_id, events[1].event_id]
    assert synapse.event_ids("workflows", day) == [events[2].event_id]
    assert synapse.pending() == 0


def test_entries_a_dead_consumer_left_pending_are_claimed_once_idle(synapse):
    events = [EventFactory(created_at=T0), EventFactory(created_at=T0), EventFactory(created_at=T0)]
    synapse.relay()
    dead = synapse.consumer("worker-dead")
    dead.ensure_group()
    entries = dead.read_new()
    dead.write(entries[:2])  # it wrote part of its batch, then died without acknowledging anything

    consume("--consumer", "worker-alive")  # the entries have not been idle for 60 s yet
    assert synapse.client.xpending(synapse.stream, GROUP)["consumers"] == [{"name": b"worker-dead", "pending": 3}]

    consume("--consumer", "worker-alive", "--claim-idle-ms", "0")

    assert synapse.event_ids("events", T0.date()) == [event.event_id for event in events]
    assert synapse.pending() == 0


@pytest.mark.parametrize("restart_as", ["worker-1", "worker-2"])
def test_a_pending_entry_trimmed_from_the_stream_is_dead_lettered_not_retried_forever(synapse, restart_as):
    events = [EventFactory(created_at=T0), EventFactory(created_at=T0)]
    synapse.relay()
    crashed = synapse.consumer("worker-1")
    crashed.ensure_group()
    trimmed_id, _ = crashed.read_new()[0]
    synapse.client.xdel(synapse.stream, trimmed_id)

    consume("--consumer", restart_as, "--claim-idle-ms", "0")  # own pending entry, or a claimed one

    assert synapse.event_ids("events", T0.date()) == [events[1].event_id]
    [(_, dead)] = synapse.client.xrange(f"{synapse.stream}:dead")
    assert dead[b"original_id"] == trimmed_id.encode()
    assert b"deleted from the stream" in dead[b"reason"]
    assert synapse.pending() == 0


def test_malformed_entries_are_dead_lettered_and_the_good_ones_around_them_written(synapse, caplog):
    before = EventFactory(created_at=T0, payload={"n": 1})
    synapse.relay()
    good = event_to_entry(Event.objects.get(pk=before.pk))
    bad_entries = {
        "missing event_id": {**good, "event_id": ""},
        "payload is not JSON": {**good, "event_id": "bad-json", "payload": "{not json"},
        "unparseable created_at": {**good, "event_id": "bad-date", "created_at": "yesterday"},
        "no UTC offset": {**good, "event_id": "naive", "created_at": "2024-03-05T10:00:00"},
    }
    bad_ids = {}
    for n, (reason, fields) in enumerate(bad_entries.items(), start=2):
        bad_ids[reason] = synapse.client.xadd(synapse.stream, fields, id=f"{before.sequence}-{n}").decode()
    after = EventFactory(created_at=T0, payload={"n": 2})
    synapse.relay()

    consume("--batch", "2")

    assert synapse.event_ids("events", T0.date()) == [before.event_id, after.event_id]
    dead = synapse.client.xrange(f"{synapse.stream}:dead")
    assert len(dead) == len(bad_entries)
    for (_, fields), (reason, original) in zip(dead, bad_entries.items(), strict=True):
        assert reason in fields.pop(b"reason").decode()
        assert fields.pop(b"original_id").decode() == bad_ids[reason]
        assert fields == {key.encode(): value.encode() for key, value in original.items()}
    assert synapse.pending() == 0
    assert "dead-lettering Synapse entry" in caplog.text


def test_an_entry_that_is_not_utf8_is_dead_lettered_with_its_bytes_by_the_decoding_consumer(synapse):
    before = EventFactory(created_at=T0, payload={"n": 1})
    synapse.relay()
    good = {key.encode(): value.encode() for key, value in event_to_entry(Event.objects.get(pk=before.pk)).items()}
    bad = {**good, b"event_id": b"bad-bytes", b"entity_id": b"task-\xff\xfe", b"reason": b"mine"}
    bad_id = synapse.client.xadd(synapse.stream, bad, id=f"{before.sequence}-2").decode()
    after = EventFactory(created_at=T0, payload={"n": 2})
    synapse.relay()

    assert "dead-lettered: 1" in consume()  # consume_events reads with a decoding client

    assert synapse.event_ids("events", T0.date()) == [before.event_id, after.event_id]
    [(_, dead)] = synapse.client.xrange(f"{synapse.stream}:dead")
    assert b"not UTF-8" in dead.pop(b"reason")  # the entry's own "reason" field is replaced
    assert dead.pop(b"original_id").decode() == bad_id
    assert dead == {key: value for key, value in bad.items() if key != b"reason"}  # the same bytes
    assert synapse.pending() == 0


def test_events_are_partitioned_by_utc_day_with_one_header_per_file(synapse):
    late = EventFactory(created_at=dt.datetime(2024, 1, 1, 23, 59, 59, tzinfo=dt.UTC))
    midnight = EventFactory(created_at=dt.datetime(2024, 1, 2, 0, 0, tzinfo=dt.UTC))
    eastern_evening = EventFactory(
        created_at=dt.datetime(2024, 1, 1, 20, 0, tzinfo=dt.timezone(dt.timedelta(hours=-5)))
    )
    synapse.relay()

    consume("--batch", "1")

    day_1, day_2 = dt.date(2024, 1, 1), dt.date(2024, 1, 2)
    assert sorted(path.name for path in (synapse.data_dir / "events").iterdir()) == [
        "events_2024-01-01.csv",
        "events_2024-01-02.csv",
    ]
    assert synapse.event_ids("events", day_1) == [late.event_id]
    assert synapse.event_ids("events", day_2) == [midnight.event_id, eastern_evening.event_id]
    assert synapse.path("events", day_2).read_text().count("event_id,sequence,") == 1


@pytest.mark.subprocess
def test_the_running_consumer_finishes_its_batch_and_leaves_the_group_on_sigterm(settings, tmp_path):
    stream = f"synapse-test-{uuid.uuid4().hex[:8]}"
    data_dir = tmp_path / "training"
    client = redis.Redis.from_url(settings.REDIS_URL)
    entry = {"event_type": "agent_started", "source": "platform", "severity": "info", "payload": "{}"}
    day_file = data_dir / "events" / "events_2024-03-05.csv"

    def lines() -> int:
        return len(day_file.read_text().splitlines()) if day_file.exists() else 0

    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.test", "REDIS_URL": settings.REDIS_URL}
    env.update(SYNAPSE_STREAM=stream, TRAINING_DATA_DIR=str(data_dir))
    try:
        client.xadd(stream, {**entry, "event_id": "ev-1", "created_at": "2024-03-05T10:00:00+00:00"}, id="1-1")
        process = subprocess.Popen(
            [sys.executable, "manage.py", "consume_events", "--consumer", "worker-1", "--block-ms", "200", "-v", "2"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            wait_for(lambda: lines() == 2, timeout=30, what="the first entry to be written")
            client.xadd(stream, {**entry, "event_id": "ev-2", "created_at": "2024-03-05T11:00:00+00:00"}, id="2-1")
            wait_for(lambda: lines() == 3, timeout=10, what="the second entry to be written")
            process.send_signal(signal.SIGTERM)
        finally:
            output = output_of(process, timeout=15)

        assert process.returncode == 0, output
        assert output.count("batch: 1 entries; rows written: events=1") == 2
        assert "done: 2 entries; rows written: events=2 tasks=0 tool_executions=0 workflows=0" in output
        assert client.xpending(stream, GROUP)["pending"] == 0
        assert client.xinfo_consumers(stream, GROUP) == []  # the per-process name does not linger
    finally:
        client.delete(stream, f"{stream}:dead")
        client.close()


def test_an_entry_reads_the_same_from_a_client_that_decodes_responses():
    fields = {
        "event_id": "ev-1",
        "sequence": "7",
        "event_type": "tool_executed",
        "created_at": "2024-03-05T12:00:00+02:00",
        "payload": '{"tool_name":"calculate","z":[1,{"a":"é"}]}',
    }
    from_bytes = parse_entry("7-1", {key.encode(): value.encode() for key, value in fields.items()})
    from_text = parse_entry("7-1", fields)

    assert from_bytes == from_text
    assert from_text.fields == fields
    assert from_text.payload == {"tool_name": "calculate", "z": [1, {"a": "é"}]}
    assert from_text.day == dt.date(2024, 3, 5)
    assert from_text.created_at == dt.datetime(2024, 3, 5, 10, 0, tzinfo=dt.UTC)
    with pytest.raises(MalformedEntry, match="not UTF-8"):
        parse_entry("7-1", {**fields, "entity_id": "\udcff"})  # what surrogateescape makes of a 0xff byte
    big = parse_entry("7-1", {**fields, "payload": '{"n":123456789012345678901234567890}'})
    assert big.payload == {"n": 123456789012345678901234567890}  # exact, not a float
    with pytest.raises(MalformedEntry, match="not UTF-8"):
        parse_entry("7-1", {b"event_id": b"\xff"})
    with pytest.raises(MalformedEntry, match="not a JSON object"):
        parse_entry("7-1", {**fields, "payload": "[1]"})


def test_a_field_name_that_is_not_utf8_is_refused_by_either_client():
    """A decoding client (surrogateescape) refuses the entry a bytes client refuses: a name
    with invalid UTF-8 too, not only a value."""
    fields = {"event_id": "ev-1", "event_type": "agent_started", "created_at": "2024-03-05T12:00:00+00:00"}
    with pytest.raises(MalformedEntry, match="not UTF-8"):
        parse_entry("7-1", {**{key.encode(): value.encode() for key, value in fields.items()}, b"x\xff": b"1"})
    with pytest.raises(MalformedEntry, match="not UTF-8"):
        parse_entry("7-1", {**fields, "x\udcff": "1"})
    assert parse_entry("7-1", {**fields, "note é": "1"}).fields["note é"] == "1"


def test_fields_mixing_bytes_and_text_are_decoded_or_refused_not_raised():
    fields = {"event_id": "ev-1", "event_type": "agent_started", "created_at": "2024-03-05T12:00:00+00:00"}
    assert parse_entry("7-1", {**fields, "payload": b'{"a":1}'}).payload == {"a": 1}
    assert parse_entry("7-1", {b"event_id": "ev-1", **fields}).event_id == "ev-1"
    with pytest.raises(MalformedEntry, match="not UTF-8"):
        parse_entry("7-1", {b"event_id": "ev-1", **fields, b"note": b"\xff"})
    with pytest.raises(MalformedEntry, match="not UTF-8"):
        parse_entry("7-1", {**fields, "note": b"\xff"})


def test_the_dead_letter_fields_of_any_entry_can_be_sent():
    """Text that no surrogateescape decoding made (a lone \\ud800) or a number: the XADD that
    acknowledges the batch must not fail, or the batch would be redelivered forever."""
    from training_export.services.synapse import _dead_letter_fields

    raw = {"a": "\ud800", "b": "\udcff", b"c": b"\xfe", "n": 5}
    fields = _dead_letter_fields(raw, reason="r\udcff", entry_id="1-1")
    assert fields == {
        b"a": "\ud800".encode("utf-8", "surrogatepass"),
        b"b": b"\xff",
        b"c": b"\xfe",
        b"n": 5,
        b"reason": b"r\\udcff",
        b"original_id": b"1-1",
    }


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--group", " "], "--group must not be blank"),
        (["--block-ms", str(10**20)], "--block-ms must be between 1"),
        (["--block-ms", "0"], "--block-ms must be between 1"),
        (["--claim-idle-ms", str(10**30)], "--claim-idle-ms must be between 0"),
    ],
)
def test_consume_command_refuses_options_it_cannot_honour(synapse, args, problem):
    """A blank group was created as such; a huge block or idle time was a traceback."""
    with pytest.raises(CommandError, match=problem):
        consume(*args)
    assert not synapse.client.exists(settings.SYNAPSE_STREAM)


def test_consume_command_names_an_unreachable_stream(synapse, settings):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    with pytest.raises(CommandError, match="cannot reach the Synapse stream: ConnectionError"):
        consume()


def test_a_stream_published_again_does_not_bring_back_the_days_retention_removed(synapse, settings):
    """Redis restarted empty: the relay publishes again every event PostgreSQL holds, however
    old. The days RETENTION_DAYS_TRAINING_CSV removed stay removed (their files were written
    again, the whole history back to the first event kept, until the next night's retention);
    the days it keeps absorb their entries as duplicates."""
    from orchestration.services.retention import retention_apply
    from training_export.services.store import SCHEMAS

    settings.TRAINING_EXPORT_DIR = synapse.data_dir.parent / "exports"
    now = timezone.now()
    old_day, recent = now - dt.timedelta(days=40), now - dt.timedelta(minutes=5)
    old_task = TaskExecutionFactory(status=TaskExecution.Status.COMPLETED)
    EventFactory(created_at=old_day)
    EventFactory(
        event_type=EventType.TASK_COMPLETED,
        entity_type="task",
        entity_id=old_task.pk,
        payload={"state": {"status": "completed"}},
        created_at=old_day,
    )
    kept = EventFactory(created_at=recent)
    synapse.relay()
    consume()  # the old day's files were written when it was live
    settings.RETENTION_DAYS_TRAINING_CSV = 30
    assert retention_apply().csv_partitions_removed == 2  # the old day's events and tasks files
    kept_text = synapse.path("events", recent.date()).read_text()

    synapse.client.delete(synapse.stream)  # the stream and its group, lost with Redis's data
    synapse.relay()
    output = consume("-v", "2")

    assert not any(synapse.path(data_type, old_day.date()).exists() for data_type in SCHEMAS), (
        "a day retention removed was written again"
    )
    assert synapse.path("events", recent.date()).read_text() == kept_text
    assert synapse.event_ids("events", recent.date()) == [kept.event_id]
    assert "entries of days retention removed: 2" in output
    assert synapse.pending() == 0


def test_a_group_created_again_after_redis_restarted_empty_gets_what_another_group_let_be_trimmed(
    synapse, settings, tmp_path
):
    """Redis keeps nothing on disk and restarts: the stream and both consumer groups are gone, and
    the relay publishes again every event PostgreSQL holds. The `replay` group comes back first,
    reads them all and the relay trims what it acknowledged, before `training` comes back: its
    group, made again at the start of the stream, began past the trimmed entries, and the events
    it had not yet written before the restart never reached its files, silently."""
    private = PrivateRedis(tmp_path)  # --save '': a restart comes back empty
    shared = synapse.client
    settings.REDIS_URL = private.url
    synapse.client = redis.Redis.from_url(private.url)
    training_dir, replay_dir = settings.TRAINING_DATA_DIR, tmp_path / "replay"

    def consume_as(group: str) -> str:
        settings.TRAINING_DATA_DIR = training_dir if group == GROUP else replay_dir
        return consume("--group", group, "-v", "2")

    try:
        written = [EventFactory(created_at=T0) for _ in range(3)]
        synapse.relay()
        consume_as(GROUP)
        consume_as("replay")
        unread = [EventFactory(created_at=T0) for _ in range(4)]  # neither group has read these
        synapse.relay()

        private.restart()
        synapse.relay()  # the whole table again, on a new stream without groups
        consume_as("replay")
        synapse.relay()  # trims what every group (replay alone) acknowledged
        assert synapse.client.xlen(synapse.stream) == 0
        output = consume_as(GROUP)

        assert synapse.event_ids("events", T0.date()) == [event.event_id for event in written + unread]
        assert "rows written: events=4 " in output
        assert synapse.pending() == 0
    finally:
        synapse.client.close()
        synapse.client = shared
        private.stop()
