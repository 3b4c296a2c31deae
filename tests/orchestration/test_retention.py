"""Retention: per-table days, and events pruned only through the privileged function."""

from __future__ import annotations

import datetime as dt
import logging
import re
import uuid
from collections.abc import Iterable
from pathlib import Path

import pytest
import redis
from django.contrib.sessions.models import Session
from django.db import DatabaseError, connection, transaction
from django.db.models import deletion
from django.test import Client
from django.utils import timezone

from orchestration.db import database_now
from orchestration.models import AgentMetric, AgentPlaygroundMessage, Event, TaskExecution, Workflow
from orchestration.services import retention
from orchestration.services.retention import events_prune, retention_apply
from tests.factories import (
    AgentFactory,
    EventFactory,
    ExportRunFactory,
    InteractionFactory,
    MessageFactory,
    MetricFactory,
    TaskAttemptFactory,
    TaskExecutionFactory,
    UserFactory,
    WorkflowFactory,
)
from training_export.models import ExportRun

NOW = dt.datetime(2024, 6, 1, 12, 0, tzinfo=dt.UTC)
OLD = NOW - dt.timedelta(days=40)
RECENT = NOW - dt.timedelta(days=5)


@pytest.fixture
def stream(settings):
    settings.SYNAPSE_STREAM = f"synapse-retention-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(settings.REDIS_URL)
    yield client
    client.delete(settings.SYNAPSE_STREAM)
    client.close()


@pytest.fixture
def other_role(db):
    """A role that may DELETE from events but is not prune_events' owner."""
    name = f"retention_test_{uuid.uuid4().hex[:8]}"
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE ROLE {name}")
        cursor.execute(f"GRANT SELECT, DELETE ON events TO {name}")
    yield name
    with connection.cursor() as cursor:
        cursor.execute(f"REVOKE ALL ON events FROM {name}")
        cursor.execute(f"DROP ROLE {name}")


def test_a_plain_delete_of_events_is_still_refused(db):
    EventFactory(created_at=OLD)
    with pytest.raises(DatabaseError, match="append-only: DELETE is not allowed"), transaction.atomic():
        Event.objects.all().delete()


def test_setting_the_prune_flag_by_hand_under_another_role_is_refused(other_role):
    EventFactory(created_at=OLD)
    with (
        pytest.raises(DatabaseError, match="append-only: DELETE"),
        transaction.atomic(),
        connection.cursor() as cursor,
    ):
        cursor.execute(f"SET LOCAL ROLE {other_role}")
        cursor.execute("SELECT set_config('agentledger.prune_events', 'on', true)")
        cursor.execute("DELETE FROM events")


def test_a_role_without_execute_cannot_call_prune_events(other_role):
    with (
        pytest.raises(DatabaseError, match="permission denied for function prune_events"),
        transaction.atomic(),
        connection.cursor() as cursor,
    ):
        cursor.execute(f"SET LOCAL ROLE {other_role}")
        cursor.execute("SELECT prune_events(now(), 1, 10)")


def test_prune_events_deletes_only_old_relayed_events(db):
    old = [EventFactory(created_at=OLD) for _ in range(5)]
    recent = EventFactory(created_at=RECENT)
    deleted = events_prune(before=NOW - dt.timedelta(days=30), max_sequence=old[2].sequence, batch=2)
    assert deleted == 3
    remaining = set(Event.objects.values_list("sequence", flat=True))
    assert {e.sequence for e in old[3:]} | {recent.sequence} <= remaining
    assert not remaining & {e.sequence for e in old[:3]}
    # Still append-only afterwards, in the same session.
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        Event.objects.filter(sequence=recent.sequence).delete()


def test_retention_applies_each_tables_days(db, settings, stream):
    settings.RETENTION_DAYS_EVENTS = 30
    settings.RETENTION_DAYS_MESSAGES = 30
    settings.RETENTION_DAYS_AGENT_METRICS = 30
    settings.RETENTION_DAYS_WORKFLOWS = 30
    settings.RETENTION_DAYS_EXPORT_RUNS = 30
    old_events = [EventFactory(created_at=OLD) for _ in range(3)]
    unrelayed_old = EventFactory(created_at=OLD)
    EventFactory(created_at=RECENT)
    # The relay has published up to the third old event only.
    stream.xadd(settings.SYNAPSE_STREAM, {"x": "1"}, id=f"{old_events[-1].sequence}-1")

    agent = AgentFactory()
    MessageFactory(agent=agent, created_at=OLD)
    kept_message = MessageFactory(agent=agent, created_at=RECENT)
    MetricFactory(agent=agent, period="day", period_start=OLD, recorded_at=OLD)
    MetricFactory(agent=agent, period="day", period_start=RECENT, recorded_at=RECENT)
    old_workflow = WorkflowFactory(status=Workflow.Status.COMPLETED, started_at=OLD, completed_at=OLD)
    TaskExecutionFactory(workflow=old_workflow, agent=agent, status="completed", completed_at=OLD)
    running_old = WorkflowFactory(status=Workflow.Status.RUNNING, started_at=OLD)
    ExportRunFactory(status=ExportRun.Status.FAILED, created_at=OLD)
    ExportRunFactory(status=ExportRun.Status.SUCCEEDED, created_at=OLD)

    result = retention_apply(now=NOW)

    assert result.deleted == {
        "events": 3,
        "agent_playground_messages": 1,
        "agent_metrics": 1,
        "workflows": 1,
        "task_executions": 1,  # the old workflow's task went with it
        "export_runs": 1,
        "agent_interactions": 0,  # conversation replies' hand-offs: none
    }
    assert Event.objects.filter(sequence=unrelayed_old.sequence).exists()
    assert list(AgentPlaygroundMessage.objects.all()) == [kept_message]
    assert AgentMetric.objects.get().period_start == RECENT
    assert list(Workflow.objects.all()) == [running_old]
    assert not TaskExecution.objects.exists()
    assert ExportRun.objects.get().status == ExportRun.Status.SUCCEEDED


def test_events_a_consumer_group_has_not_acknowledged_are_kept(db, settings, stream):
    """The relay published them, but the consumer (stopped, or behind) has not written them to
    the training files. Redis keeps the stream in memory only: once it restarts empty the relay
    publishes again from PostgreSQL, and an event pruned from there was in no file for good."""
    settings.RETENTION_DAYS_EVENTS = 30
    old = [EventFactory(created_at=OLD) for _ in range(4)]
    for event in old:
        stream.xadd(settings.SYNAPSE_STREAM, {"x": "1"}, id=f"{event.sequence}-1")
    stream.xgroup_create(settings.SYNAPSE_STREAM, "training", id="0")
    (_, delivered), *_ = stream.xreadgroup("training", "c1", {settings.SYNAPSE_STREAM: ">"}, count=2)
    stream.xack(settings.SYNAPSE_STREAM, "training", delivered[0][0])  # the second is pending

    assert retention_apply(now=NOW).deleted["events"] == 1
    assert set(Event.objects.values_list("sequence", flat=True)) == {e.sequence for e in old[1:]}

    stream.xack(settings.SYNAPSE_STREAM, "training", delivered[1][0])  # written: none pending
    assert retention_apply(now=NOW).deleted["events"] == 1
    assert set(Event.objects.values_list("sequence", flat=True)) == {e.sequence for e in old[2:]}


def test_a_stream_lost_between_the_retention_reads_of_it_keeps_the_events(db, settings, stream, monkeypatch):
    """Redis restarts empty (or the stream is deleted) between retention's read of the stream's
    last id and its read of the consumer groups. The groups, gone with the stream, no longer
    held the unacknowledged events back: they were pruned up to the last id read before, while
    no stream held them any more and the relay, publishing again from what PostgreSQL holds,
    could not bring them back."""
    settings.RETENTION_DAYS_EVENTS = 30
    old = [EventFactory(created_at=OLD) for _ in range(3)]
    for event in old:
        stream.xadd(settings.SYNAPSE_STREAM, {"x": "1"}, id=f"{event.sequence}-1")
    stream.xgroup_create(settings.SYNAPSE_STREAM, "training", id="0")  # nothing acknowledged
    name = settings.SYNAPSE_STREAM

    class LosesTheStream(redis.Redis):
        reads = 0

        def execute_command(self, *args, **options):
            reply = super().execute_command(*args, **options)
            if str(args[0]).upper().startswith("XINFO"):
                LosesTheStream.reads += 1
                if LosesTheStream.reads == 1:
                    stream.delete(name)  # after the first read of the stream, whichever it is
            return reply

    monkeypatch.setattr(retention, "synapse_client", lambda: LosesTheStream.from_url(settings.REDIS_URL))
    assert retention_apply(now=NOW).deleted.get("events", 0) == 0
    assert Event.objects.count() == len(old)


def test_zero_days_keeps_everything(db, settings):
    for name in ("EVENTS", "MESSAGES", "AGENT_METRICS", "WORKFLOWS", "EXPORT_RUNS"):
        setattr(settings, f"RETENTION_DAYS_{name}", 0)
    EventFactory(created_at=OLD)
    MessageFactory(created_at=OLD)
    assert retention_apply(now=timezone.now()).deleted == {}
    assert Event.objects.count() == 1 and AgentPlaygroundMessage.objects.count() == 1


def test_expired_console_sessions_are_deleted_whatever_the_days(db, settings):
    """Django deletes a session only at its sign-out: one left to expire stayed in
    django_session for good, a row per console sign-in."""
    for name in ("EVENTS", "MESSAGES", "AGENT_METRICS", "WORKFLOWS", "EXPORT_RUNS"):
        setattr(settings, f"RETENTION_DAYS_{name}", 0)
    left, signed_in = Client(), Client()
    left.force_login(UserFactory(role="admin"))
    signed_in.force_login(UserFactory(role="viewer"))
    now = database_now()
    Session.objects.filter(session_key=left.session.session_key).update(expire_date=now - dt.timedelta(seconds=1))

    assert retention_apply(now=now).deleted == {"django_session": 1}

    assert list(Session.objects.values_list("session_key", flat=True)) == [signed_in.session.session_key]
    assert signed_in.get("/admin/").status_code == 200  # the live session still signs its user in
    assert retention_apply(now=now).deleted == {}  # listed only when rows went


def test_retention_removes_temp_files_of_killed_exports_but_not_those_of_a_running_one(db, settings, tmp_path):
    """An export stages each file (written, fsynced, closed) and renames them all at the end: a
    file staged two hours into a long export is still waiting for its rename. Only a file older
    than any export may run (its hard time limit and the grace before it is called lost) was
    left by a killed one."""
    import os
    import time

    from training_export.services.export import EXPORT_LOST_GRACE_SECONDS, EXPORT_TIME_LIMIT_SECONDS

    settings.TRAINING_EXPORT_DIR = tmp_path
    (tmp_path / "events" / "w").mkdir(parents=True)
    stale = tmp_path / "events" / "w" / ".tmp-events-train.jsonl"
    staged = tmp_path / "events" / "w" / ".tmp-events-valid.jsonl"
    fresh = tmp_path / "events" / "w" / ".tmp-other.jsonl"
    final = tmp_path / "events" / "w" / "events-train.jsonl"
    for path in (stale, staged, fresh, final):
        path.write_text("{}\n")
    oldest_live = EXPORT_TIME_LIMIT_SECONDS + EXPORT_LOST_GRACE_SECONDS
    for path, age in ((stale, oldest_live + 60), (staged, 7200), (final, oldest_live + 60)):
        os.utime(path, (time.time() - age, time.time() - age))
    assert retention_apply(now=timezone.now()).temp_files_removed == 1
    assert not stale.exists() and staged.exists() and fresh.exists() and final.exists()


def test_retention_removes_training_csv_partitions_older_than_their_days_and_nothing_else(db, settings, tmp_path):
    """A message or workflow deleted for retention would otherwise live on in the CSVs."""
    from training_export.services.store import TrainingDataStore

    settings.TRAINING_DATA_DIR = tmp_path
    settings.TRAINING_EXPORT_DIR = tmp_path / "exports"
    now = timezone.now()
    store = TrainingDataStore(tmp_path)
    today = now.date()
    old, kept = today - dt.timedelta(days=31), today - dt.timedelta(days=30)
    for data_type in ("events", "tasks", "tool_executions", "workflows"):
        for day in (old, kept):
            store.path(data_type, day).parent.mkdir(parents=True, exist_ok=True)
            store.path(data_type, day).write_text("header\n")
    others = [
        tmp_path / "exports" / "events" / f"events_{old.isoformat()}.csv",  # not a partition dir
        tmp_path / "events" / f"events_{old.isoformat()}.csv.bak",
        tmp_path / "events" / f"tasks_{old.isoformat()}.csv",  # not this directory's type
    ]
    for path in others:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")

    settings.RETENTION_DAYS_TRAINING_CSV = 0
    assert retention_apply(now=now).csv_partitions_removed == 0
    settings.RETENTION_DAYS_TRAINING_CSV = 30
    assert retention_apply(now=now).csv_partitions_removed == 4

    for data_type in ("events", "tasks", "tool_executions", "workflows"):
        assert not store.path(data_type, old).exists() and store.path(data_type, kept).exists()
    assert all(path.exists() for path in others)


TABLES = (
    "workflows",
    "task_executions",
    "task_attempts",
    "agent_interactions",
    "agent_playground_messages",
    "agent_metrics",
    "export_runs",
    "events",
)


def row_counts() -> dict[str, int]:
    with connection.cursor() as cursor:
        counts = {}
        for table in TABLES:
            cursor.execute(f"SELECT COUNT(*) FROM {table}")  # noqa: S608 - names from the tuple above
            counts[table] = cursor.fetchone()[0]
    return counts


def test_rows_deleted_are_reported_per_table_cascades_included_as_measured(db, settings, monkeypatch, caplog):
    for name in ("EVENTS", "MESSAGES", "AGENT_METRICS", "EXPORT_RUNS"):
        setattr(settings, f"RETENTION_DAYS_{name}", 0)
    settings.RETENTION_DAYS_WORKFLOWS = 30
    monkeypatch.setattr(retention, "WORKFLOW_BATCH", 2)  # several batches: the counts add up across them
    agent, other = AgentFactory(), AgentFactory()
    for n in range(5):
        workflow = WorkflowFactory(status=Workflow.Status.FAILED, started_at=OLD, completed_at=OLD)
        for _ in range(n):
            execution = TaskExecutionFactory(workflow=workflow, agent=agent, status="failed", completed_at=OLD)
            TaskAttemptFactory(execution=execution, attempt_number=1, failed=True, started_at=OLD)
            TaskAttemptFactory(execution=execution, attempt_number=2, failed=True, started_at=OLD)
            # A message of the task's conversation outlives it (its execution is set to NULL).
            MessageFactory(agent=agent, execution=execution, created_at=OLD)
        if n % 2:
            InteractionFactory(workflow=workflow, from_agent=agent, to_agent=other)
    kept = WorkflowFactory(status=Workflow.Status.COMPLETED, started_at=RECENT, completed_at=RECENT)
    TaskExecutionFactory(workflow=kept, agent=agent, status="completed", completed_at=RECENT)
    InteractionFactory(workflow=kept, from_agent=agent, to_agent=other)
    EventFactory(created_at=OLD)
    before = row_counts()

    with caplog.at_level(logging.INFO, logger="orchestration.services.retention"):
        result = retention_apply(now=NOW)

    after = row_counts()
    measured = {table: before[table] - after[table] for table in TABLES if before[table] != after[table]}
    assert (
        result.deleted
        == measured
        == {
            "workflows": 5,
            "task_executions": 10,  # 0 + 1 + 2 + 3 + 4
            "task_attempts": 20,
            "agent_interactions": 2,
        }
    )
    assert after["agent_playground_messages"] == before["agent_playground_messages"] == 10
    assert not AgentPlaygroundMessage.objects.filter(execution__isnull=False).exists()
    assert list(Workflow.objects.all()) == [kept]
    assert (
        "retention: rows deleted per table: agent_interactions=2, task_attempts=20, task_executions=10, workflows=5"
        in caplog.messages
    )


def test_a_workflow_batch_holds_a_bounded_number_of_tasks_not_only_of_workflows(db, settings, monkeypatch):
    """The ORM collects a batch's tasks and attempts in memory before deleting them, in one
    transaction: 500 workflows of 1,000 tasks each were a million rows and 1.5 GB at once. A
    batch stops at WORKFLOW_BATCH_TASKS tasks (a workflow bigger than that goes alone)."""
    for name in ("EVENTS", "MESSAGES", "AGENT_METRICS", "EXPORT_RUNS"):
        setattr(settings, f"RETENTION_DAYS_{name}", 0)
    settings.RETENTION_DAYS_WORKFLOWS = 30
    monkeypatch.setattr(retention, "WORKFLOW_BATCH_TASKS", 6, raising=False)
    agent = AgentFactory()
    for size in (3, 3, 3, 3, 7):
        workflow = WorkflowFactory(status=Workflow.Status.COMPLETED, total_steps=size, completed_at=OLD)
        for _ in range(size):
            execution = TaskExecutionFactory(workflow=workflow, agent=agent, status="completed", completed_at=OLD)
            TaskAttemptFactory(execution=execution, attempt_number=1, started_at=OLD)
    held: list[int] = []  # tasks the ORM collected for each DELETE
    collect = deletion.Collector.delete

    def counted(collector: deletion.Collector) -> tuple[int, dict[str, int]]:
        held.append(len(collector.data.get(TaskExecution, ())))
        return collect(collector)

    monkeypatch.setattr(deletion.Collector, "delete", counted)

    assert retention_apply(now=NOW).deleted == {"task_attempts": 19, "task_executions": 19, "workflows": 5}
    assert max(held) == 7 and sorted(held) == [6, 6, 7], held
    assert not Workflow.objects.exists()


def test_a_table_whose_rule_ran_is_reported_even_when_nothing_was_old_enough(db, settings, stream):
    for name in ("EVENTS", "MESSAGES", "AGENT_METRICS", "WORKFLOWS", "EXPORT_RUNS"):
        setattr(settings, f"RETENTION_DAYS_{name}", 30)
    stream.xadd(settings.SYNAPSE_STREAM, {"x": "1"}, id="1-1")
    WorkflowFactory(status=Workflow.Status.COMPLETED, started_at=RECENT, completed_at=RECENT)
    assert retention_apply(now=NOW).deleted == {
        "agent_metrics": 0,
        "agent_playground_messages": 0,
        "events": 0,
        "export_runs": 0,
        "task_executions": 0,  # the rules for conversation replies ran with the messages'
        "agent_interactions": 0,
        "workflows": 0,
    }


def test_conversation_reply_tasks_go_with_their_messages(db, settings):
    """A conversation reply is a task outside any workflow: its input holds the user's message
    and its output the reply. Message retention takes it (and its attempts) once none of its
    messages is left; a task whose messages are kept stays, so that no message loses the
    attempt that says whether it may be trained on."""
    for name in ("EVENTS", "AGENT_METRICS", "WORKFLOWS", "EXPORT_RUNS"):
        setattr(settings, f"RETENTION_DAYS_{name}", 0)
    settings.RETENTION_DAYS_MESSAGES = 30
    agent = AgentFactory()

    def reply(*, asked: dt.datetime, answered: dt.datetime, status: str = "completed") -> TaskExecution:
        task = TaskExecutionFactory(
            workflow=None,
            agent=agent,
            task_type="conversation",
            status=status,
            input_data={"message": "my card number is 4111 1111 1111 1111"},
            output_data={"content": "noted"},
            completed_at=answered if status != "running" else None,
        )
        attempt = TaskAttemptFactory(execution=task, attempt_number=1, failed=True, started_at=answered)
        MessageFactory(agent=agent, execution=task, created_at=asked)
        MessageFactory(
            agent=agent, execution=task, attempt=attempt, role="assistant", is_error=True, created_at=answered
        )
        return task

    old = reply(asked=OLD, answered=OLD)
    InteractionFactory(workflow=None, execution=old, from_agent=agent, to_agent=AgentFactory())
    straddling = reply(asked=OLD, answered=RECENT)  # its reply message is kept
    running = reply(asked=OLD, answered=OLD, status="running")
    recent = reply(asked=RECENT, answered=RECENT)

    result = retention_apply(now=NOW)

    assert result.deleted == {
        "agent_playground_messages": 5,
        "agent_interactions": 1,
        "task_executions": 1,
        "task_attempts": 1,
    }
    assert set(TaskExecution.objects.values_list("pk", flat=True)) == {straddling.pk, running.pk, recent.pk}
    # No kept message lost its attempt (a message without one counts as a good turn).
    assert not AgentPlaygroundMessage.objects.filter(role="assistant", attempt__isnull=True).exists()


def test_retention_on_a_host_whose_clock_runs_ahead_keeps_what_the_rollup_keeps(db, settings, monkeypatch):
    """Retention's cutoff is on the database's clock, as the rollup's (`periods_missed`, which
    writes again what has activity and no metrics, back to its own cutoff): a retention host a
    day ahead deleted a day of metrics the rollup then wrote again, after every retention run."""
    settings.RETENTION_DAYS_AGENT_METRICS = 30
    settings.RETENTION_DAYS_EXPORT_RUNS = 0
    kept = database_now() - dt.timedelta(days=30) + dt.timedelta(hours=2)
    MetricFactory(agent=AgentFactory(), period="hour", period_start=kept, recorded_at=kept)
    real_now = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: real_now() + dt.timedelta(days=1))
    assert retention_apply().deleted.get("agent_metrics", 0) == 0
    assert AgentMetric.objects.count() == 1


def workflows_exported(day: dt.datetime, offsets: Iterable[int]) -> None:
    """A succeeded export of workflows for each one-day window `day` + offset, as the beat's."""
    for n in offsets:
        start = day + dt.timedelta(days=n)
        ExportRunFactory(
            data_type=ExportRun.DataType.WORKFLOWS,
            format="jsonl",
            status=ExportRun.Status.SUCCEEDED,
            window_start=start,
            window_end=start + dt.timedelta(days=1),
        )


def test_a_batch_reads_the_old_rows_from_an_index_and_none_of_those_kept(db, settings, monkeypatch):
    """Each batch takes the oldest rows up to the cutoff from an index on the time column they
    are judged by. In the models' own order (workflows and metrics newest first, messages by
    thread) a batch read every row retention keeps before the first old one: 0.7 s a batch of
    500 of 2 M workflows, for the one day of 400 past the cutoff, and the whole table again at
    every batch of the run."""
    settings.RETENTION_DAYS_EVENTS = settings.RETENTION_DAYS_EXPORT_RUNS = 0
    settings.RETENTION_DAYS_WORKFLOWS = settings.RETENTION_DAYS_MESSAGES = settings.RETENTION_DAYS_AGENT_METRICS = 30
    agent = AgentFactory()
    for when, count, thread in ((RECENT, 20, "a-kept"), (OLD, 2, "z-old")):
        for _ in range(count):
            WorkflowFactory(status=Workflow.Status.COMPLETED, completed_at=when, total_steps=0)
            MessageFactory(agent=agent, instance_id=thread, created_at=when)
            MetricFactory(agent=agent, recorded_at=when)
    plans: dict[str, str] = {}

    def explained(execute, sql, params, many, context):
        table = re.search(r'FROM "(\w+)"', sql)
        if sql.startswith("SELECT") and "FOR UPDATE" in sql and table and table[1] not in plans:
            with context["connection"].cursor() as cursor:
                cursor.execute("SET LOCAL enable_seqscan = off")  # as on a big table
                cursor.execute("EXPLAIN (ANALYZE, COSTS OFF) " + sql, params)
                plans[table[1]] = "\n".join(row[0] for row in cursor.fetchall())
                cursor.execute("SET LOCAL enable_seqscan = on")
        return execute(sql, params, many, context)

    with connection.execute_wrapper(explained):
        deleted = retention_apply(now=NOW).deleted

    assert (deleted["workflows"], deleted["agent_playground_messages"], deleted["agent_metrics"]) == (2, 2, 2)
    # The index on the time they are judged by (migration 0040), its range up to the cutoff.
    indexes = {
        "workflows": "idx_workflows_ended",
        "agent_playground_messages": "idx_messages_created_at",
        "agent_metrics": "idx_metrics_age",
    }
    read_otherwise = [
        table
        for table, index in indexes.items()
        if index not in plans[table] or "Rows Removed by Filter" in plans[table]
    ]
    assert read_otherwise == [], plans


def test_days_the_daily_export_has_not_exported_yet_are_kept_until_it_has(db, settings, tmp_path, caplog):
    """The daily export of workflows gave up on the 7th and the 8th (a window held open past every
    retry; the next nights catch them up): retention with 2 days, at 03:00 on the 10th, must not
    delete the rows those days' exports still have to read, or the catch-up exports them empty and
    succeeds, and the training data is gone with no trace."""
    from training_export.services.export import export_previous_day

    settings.TRAINING_EXPORT_DIR = tmp_path / "exports"
    settings.TRAINING_EXPORT_SAFETY_LAG_SECONDS = 0
    settings.RETENTION_DAYS_WORKFLOWS = 2
    now = dt.datetime(2024, 6, 10, 3, 0, tzinfo=dt.UTC)
    day = dt.datetime(2024, 6, 1, tzinfo=dt.UTC)
    workflows_exported(day, range(6))  # the 1st..the 6th exported by the beat
    exported = WorkflowFactory(status=Workflow.Status.COMPLETED, completed_at=day + dt.timedelta(days=5, hours=9))
    pending = WorkflowFactory(status=Workflow.Status.COMPLETED, completed_at=day + dt.timedelta(days=6, hours=9))
    TaskExecutionFactory(workflow=pending, status="completed", completed_at=pending.completed_at)

    with caplog.at_level(logging.WARNING, logger="orchestration.services.retention"):
        result = retention_apply(now=now)

    assert result.deleted["workflows"] == 1  # the 6th's, exported
    assert not Workflow.objects.filter(pk=exported.pk).exists()
    assert Workflow.objects.filter(pk=pending.pk).exists()
    assert TaskExecution.objects.filter(workflow=pending).exists()
    assert result.kept == {
        "workflows": "rows of 2024-06-07 and later kept: the daily export of workflows has not exported them yet"
    }
    assert "retention: workflows: rows of 2024-06-07 and later kept" in caplog.text
    # The catch-up then exports the 7th with its workflow, and the next retention deletes it.
    runs = export_previous_day(now=now)
    exported_rows = {run.window_start.date(): run.rows for run in runs if run.data_type == "workflows"}
    assert exported_rows == {dt.date(2024, 6, 7): 1, dt.date(2024, 6, 8): 0, dt.date(2024, 6, 9): 0}
    assert retention_apply(now=now).deleted["workflows"] == 1
    assert not Workflow.objects.filter(pk=pending.pk).exists()


def test_a_day_a_catch_up_failed_to_export_before_later_days_is_kept_until_it_is_exported(db, settings):
    """A catch-up exported the 7th..the 9th but the 7th failed on its own (the later days
    succeeded): the next night's export tries the 7th again, so retention must keep its rows, or
    that export finds them gone and succeeds empty."""
    settings.RETENTION_DAYS_WORKFLOWS = 2
    now = dt.datetime(2024, 6, 10, 3, 0, tzinfo=dt.UTC)
    day = dt.datetime(2024, 6, 1, tzinfo=dt.UTC)
    workflows_exported(day, (*range(6), 7, 8))  # the 1st..the 6th, the 8th and the 9th; the 7th failed
    failed_day = WorkflowFactory(status=Workflow.Status.COMPLETED, completed_at=day + dt.timedelta(days=6, hours=9))

    result = retention_apply(now=now)

    assert Workflow.objects.filter(pk=failed_day.pk).exists()
    assert result.kept == {
        "workflows": "rows of 2024-06-07 and later kept: the daily export of workflows has not exported them yet"
    }


def test_a_daily_export_stopped_for_good_holds_rows_back_only_as_far_as_its_catch_up_reaches(db, settings):
    """The daily export of workflows last exported the 1st and then stopped (its beat entry
    disabled, say): its catch-up would export at most TRAINING_EXPORT_CATCHUP_DAYS back, so
    retention keeps what it could still export, not every row after the 1st for good."""
    settings.RETENTION_DAYS_WORKFLOWS = 2
    settings.TRAINING_EXPORT_CATCHUP_DAYS = 7
    now = dt.datetime(2024, 6, 30, 3, 0, tzinfo=dt.UTC)
    start = dt.datetime(2024, 6, 1, tzinfo=dt.UTC)
    ExportRunFactory(
        data_type=ExportRun.DataType.WORKFLOWS,
        format="jsonl",
        status=ExportRun.Status.SUCCEEDED,
        window_start=start,
        window_end=start + dt.timedelta(days=1),
    )
    # The next daily export (the 30th's at 00:30 has run; the 1st of July's) reaches back to the
    # 23rd at most; this pass keeps one day more, in case it runs before that night's export.
    unreachable = WorkflowFactory(
        status=Workflow.Status.COMPLETED, completed_at=dt.datetime(2024, 6, 21, 9, tzinfo=dt.UTC)
    )
    reachable = WorkflowFactory(
        status=Workflow.Status.COMPLETED, completed_at=dt.datetime(2024, 6, 22, 9, tzinfo=dt.UTC)
    )

    result = retention_apply(now=now)

    assert not Workflow.objects.filter(pk=unreachable.pk).exists()
    assert Workflow.objects.filter(pk=reachable.pk).exists()
    assert result.kept == {
        "workflows": "rows of 2024-06-22 and later kept: the daily export of workflows has not exported them yet"
    }


def test_a_thread_the_catch_up_exports_keeps_the_history_the_daily_export_would_have_read(db, settings, tmp_path):
    """The conversations export of a day writes each thread active that day with its history
    from before it (DAYS of it, as retention leaves it the night before the export): after a
    night the export gave up on, retention kept the day but not the question asked the evening
    before, and the catch-up wrote the answer alone (an on-time export writes both)."""
    from training_export.services.export import export_previous_day

    settings.TRAINING_EXPORT_DIR = tmp_path / "exports"
    settings.TRAINING_EXPORT_SAFETY_LAG_SECONDS = 0
    settings.RETENTION_DAYS_MESSAGES = 2
    day = dt.datetime(2024, 6, 1, tzinfo=dt.UTC)
    for n in range(6):  # the 1st..the 6th exported by the beat; it gave up on the 7th and the 8th
        start = day + dt.timedelta(days=n)
        ExportRunFactory(
            data_type=ExportRun.DataType.CONVERSATIONS,
            format=ExportRun.Format.CHAT_JSONL,
            status=ExportRun.Status.SUCCEEDED,
            window_start=start,
            window_end=start + dt.timedelta(days=1),
        )
    agent = AgentFactory()
    asked = MessageFactory(
        agent=agent, content="what is 2+2?", created_at=dt.datetime(2024, 6, 6, 23, 59, tzinfo=dt.UTC)
    )
    MessageFactory(agent=agent, role="assistant", content="4", created_at=dt.datetime(2024, 6, 7, 0, 1, tzinfo=dt.UTC))

    now = dt.datetime(2024, 6, 10, 3, 0, tzinfo=dt.UTC)

    retention_apply(now=now)

    assert AgentPlaygroundMessage.objects.filter(pk=asked.pk).exists()
    (run,) = [run for run in export_previous_day(now=now) if run.data_type == "conversations" and run.rows]
    assert (run.window_start.date(), run.rows) == (dt.date(2024, 6, 7), 1)
    assert "what is 2+2?" in Path(run.path).read_text()
    # Caught up, the thread is held no longer (nor is anything on a night the export is on time).
    assert retention_apply(now=now).kept == {}
    assert not AgentPlaygroundMessage.objects.exists()
