"""JSONL exports from PostgreSQL: closed windows, counts, determinism, atomic files, manifests."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import signal
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.utils import timezone

from orchestration.event_types import EventType
from orchestration.models import Event, TaskExecution, Workflow
from tests.engine import ROOT, database_url, wait_for
from tests.factories import AgentFactory, EventFactory, MessageFactory, TaskExecutionFactory, WorkflowFactory
from training_export.models import ExportRun
from training_export.services.export import (
    ExportError,
    Window,
    WindowNotClosed,
    export_run,
    export_run_execute,
    export_runs_request,
    window_check_closed,
    window_for,
)
from training_export.services.manifest import manifest_read
from training_export.services.store import export_for_training

DAY = dt.date(2024, 3, 5)
T0 = dt.datetime(2024, 3, 5, 10, 0, tzinfo=dt.UTC)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text("utf-8").splitlines()]


def seed_events(count: int, *, at: dt.datetime = T0) -> list[Event]:
    return [
        EventFactory(
            event_type=EventType.AGENT_STARTED,
            entity_id=f"e{i}",
            created_at=at + dt.timedelta(seconds=i),
            payload={"i": i, "note": "ok"},
        )
        for i in range(count)
    ]


def finished_task(*, at: dt.datetime, status: str = TaskExecution.Status.COMPLETED, **kwargs) -> TaskExecution:
    return TaskExecutionFactory(
        status=status,
        created_at=at - dt.timedelta(seconds=2),
        started_at=at - dt.timedelta(seconds=1),
        completed_at=at,
        tokens_used=10,
        cost_usd=Decimal("0.0015"),
        **kwargs,
    )


def test_exported_rows_equal_the_sql_counts_per_type(db, out):
    seed_events(5)
    EventFactory(event_type=EventType.AGENT_STARTED, created_at=T0 + dt.timedelta(days=1))  # next day
    EventFactory(event_type=EventType.AGENT_STARTED, created_at=T0 - dt.timedelta(days=1))  # day before
    for i in range(3):
        EventFactory(
            event_type=EventType.TOOL_EXECUTED,
            entity_type="tool",
            entity_id=f"call-{i}",
            created_at=T0 + dt.timedelta(minutes=i),
            payload={"tool_name": "calculate", "input_params": {"expression": "2+2"}, "output_result": {"result": 4}},
        )
    for i in range(4):
        finished_task(at=T0 + dt.timedelta(minutes=i))
    TaskExecutionFactory(status=TaskExecution.Status.RUNNING)  # unfinished: not exported
    WorkflowFactory(status=Workflow.Status.COMPLETED, started_at=T0, completed_at=T0 + dt.timedelta(hours=1))

    window = window_for(DAY, DAY)
    expected = {
        "events": Event.objects.filter(created_at__gte=window.start, created_at__lt=window.end).count(),
        "tool_executions": Event.objects.filter(
            created_at__gte=window.start, created_at__lt=window.end, event_type="tool_executed"
        ).count(),
        "tasks": TaskExecution.objects.filter(completed_at__gte=window.start, completed_at__lt=window.end).count(),
        "workflows": Workflow.objects.filter(completed_at__gte=window.start, completed_at__lt=window.end).count(),
    }
    assert expected == {"events": 8, "tool_executions": 3, "tasks": 4, "workflows": 1}
    for data_type, count in expected.items():
        run = export_run(data_type=data_type, start_date="2024-03-05", end_date="2024-03-05")
        records = lines(run.path)
        assert len(records) == count == run.rows
        assert run.status == ExportRun.Status.SUCCEEDED
        manifest = manifest_read(Path(run.path).parent)
        assert manifest["rows"] == {data_type: count}
        assert manifest["files"][0]["sha256"] == run.checksum
        assert manifest["schema_version"] == run.schema_version == "3"

    events = lines(out / "events" / "2024-03-05_2024-03-05" / "events-train.jsonl")
    assert [e["sequence"] for e in events] == sorted(e["sequence"] for e in events)
    tools = lines(out / "tool_executions" / "2024-03-05_2024-03-05" / "tool_executions-train.jsonl")
    assert tools[0]["tool_name"] == "calculate" and tools[0]["execution_id"] == "call-0"
    tasks = lines(out / "tasks" / "2024-03-05_2024-03-05" / "tasks-train.jsonl")
    assert tasks[0]["cost_usd"] == 0.0015 and tasks[0]["completed_at"] == T0.isoformat()


def test_a_workflows_record_has_its_cancelled_steps_and_wasted_spend(db, out):
    """A workflow that went on past a failure (continue_on_failure) cancelled what depended on
    it, and paid for a try that failed: its record says both, as the API does, so that its
    steps add up to total_steps and its spend splits into what produced results and what was
    wasted. (Schema 3: the records of schema 2 had neither.)"""
    WorkflowFactory(
        status=Workflow.Status.FAILED,
        total_steps=4,
        completed_steps=1,
        failed_steps=1,
        cancelled_steps=2,
        total_cost_usd=Decimal("0.0420"),
        wasted_cost_usd=Decimal("0.0125"),
        started_at=T0,
        completed_at=T0 + dt.timedelta(minutes=1),
    )
    run = export_run(data_type="workflows", start_date=DAY, end_date=DAY)
    (record,) = lines(run.path)
    assert (record["completed_steps"], record["failed_steps"], record["cancelled_steps"]) == (1, 1, 2)
    assert (record["total_cost_usd"], record["wasted_cost_usd"]) == (0.042, 0.0125)
    assert sorted(manifest_read(Path(run.path).parent)["columns"]) == sorted(record)
    assert {"cancelled_steps", "wasted_cost_usd"} <= set(record)


def test_rerunning_a_window_gives_byte_identical_files(db, out):
    seed_events(20)
    first = export_run(data_type="events", start_date=DAY, end_date=DAY)
    directory = Path(first.path).parent
    before = {p.name: p.read_bytes() for p in directory.iterdir()}

    again = export_run(data_type="events", start_date=DAY, end_date=DAY)
    assert again.pk == first.pk  # intact files: nothing written again

    forced = export_run(data_type="events", start_date=DAY, end_date=DAY, force=True)
    assert forced.pk != first.pk and forced.checksum == first.checksum
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    first.refresh_from_db()
    assert first.status == ExportRun.Status.SUPERSEDED

    Path(forced.path).unlink()  # a lost file is exported again, identically
    restored = export_run(data_type="events", start_date=DAY, end_date=DAY)
    assert restored.pk != forced.pk and restored.checksum == first.checksum


@pytest.mark.parametrize("data_type", ["tasks", "events", "conversations"])
def test_a_value_holding_a_unicode_line_break_keeps_its_record_on_one_line(db, out, data_type):
    # JSON lets these stand unescaped in a string; str.splitlines() ends a line at each.
    text = "one\u2028two\u2029three\x85four"
    # A task whose output holds an integer beyond 64 bits is written by the exact encoder.
    finished_task(at=T0, output_data={"text": text})
    finished_task(at=T0 + dt.timedelta(seconds=1), output_data={"text": text, "id": 10**25})
    EventFactory(event_type=EventType.AGENT_STARTED, created_at=T0, payload={"text": text})
    agent = AgentFactory()
    MessageFactory(instance_id="t-1", agent=agent, role="user", content=text, created_at=T0)
    MessageFactory(
        instance_id="t-1", agent=agent, role="assistant", content=text, created_at=T0 + dt.timedelta(seconds=1)
    )

    run = export_run(data_type=data_type, start_date=DAY, end_date=DAY)
    read = Path(run.path).read_text("utf-8").splitlines()
    assert run.rows and len(read) == run.rows
    assert text in json.dumps([json.loads(line) for line in read], ensure_ascii=False)


def test_export_for_training_returns_the_jsonl_path(db, out):
    seed_events(2)
    path = export_for_training("events", "2024-03-05", "2024-03-05")
    assert path == out / "events" / "2024-03-05_2024-03-05" / "events-train.jsonl"
    assert len(lines(path)) == 2


def test_bad_input_is_refused_and_nothing_is_written(db, out):
    with pytest.raises(ExportError, match="unknown data type 'evnts'"):
        export_run(data_type="evnts", start_date=DAY, end_date=DAY)
    with pytest.raises(ExportError, match="start_date='2024-13-01' is not a date"):
        export_run(data_type="events", start_date="2024-13-01", end_date=DAY)
    with pytest.raises(ExportError, match="before start_date"):
        export_run(data_type="events", start_date="2024-03-06", end_date="2024-03-05")
    today = timezone.now().date()
    with pytest.raises(WindowNotClosed, match="not closed yet"):
        export_run(data_type="events", start_date=today, end_date=today)
    assert not out.exists()
    assert not ExportRun.objects.exists()


def test_command_errors_name_the_problem(db, out):
    with pytest.raises(CommandError, match="is not a date"):
        call_command("export_training_data", "--type", "events", "--start", "05/03/2024", "--end", "2024-03-05")
    today = timezone.now().date().isoformat()
    with pytest.raises(CommandError, match="not closed yet"):
        call_command("export_training_data", "--type", "all", "--start", today, "--end", today)
    with pytest.raises(CommandError, match="invalid choice"):
        call_command("export_training_data", "--type", "nope", "--start", today, "--end", today)


def test_a_window_not_closed_is_refused_before_any_progress_bar(db, out, capsys):
    """An empty bar (`0rows ...`, drawn at its start and again at its close) came before the
    refusal."""
    today = timezone.now().date().isoformat()
    with pytest.raises(CommandError, match="not closed yet"):
        call_command("export_training_data", "--type", "all", "--start", today, "--end", today)
    assert capsys.readouterr().err == ""


def test_command_errors_name_its_options_not_the_services_arguments(db, out):
    """They said start_date and end_date, names the command does not have."""
    with pytest.raises(CommandError, match=r"^--start='2024-13-01' is not a date; expected YYYY-MM-DD$"):
        call_command("export_training_data", "--type", "events", "--start", "2024-13-01", "--end", "2024-03-05")
    with pytest.raises(CommandError, match=r"^--end='x' is not a date; expected YYYY-MM-DD$"):
        call_command("export_training_data", "--type", "events", "--start", "2024-03-05", "--end", "x")
    with pytest.raises(CommandError, match=r"^--end 2024-03-01 is before --start 2024-03-05$"):
        call_command("export_training_data", "--type", "events", "--start", "2024-03-05", "--end", "2024-03-01")
    assert not ExportRun.objects.exists()


@pytest.mark.parametrize("day", ["2024-W10-2", "20240305", "2024-3-5"])
def test_command_reads_a_day_only_as_yyyy_mm_dd(db, out, day):
    """date.fromisoformat read the week date 2024-W10-2 and 20240305 as 5 March 2024."""
    with pytest.raises(CommandError, match=rf"^--start='{day}' is not a date; expected YYYY-MM-DD$"):
        call_command("export_training_data", "--type", "events", "--start", day, "--end", "2024-03-05")
    assert not ExportRun.objects.exists()


def test_command_names_an_output_directory_it_cannot_write_to(db, out, tmp_path):
    seed_events(1)
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    with pytest.raises(CommandError, match=r"cannot write the export: .*Not a directory"):
        call_command(
            "export_training_data",
            *("--type", "events", "--start", "2024-03-05", "--end", "2024-03-05"),
            *("--output", str(not_a_directory), "--no-progress"),
            stdout=io.StringIO(),
        )
    [run] = ExportRun.objects.all()
    assert run.status == ExportRun.Status.FAILED and "Not a directory" in run.error


def test_command_exports_all_types(db, out):
    seed_events(3)
    finished_task(at=T0)
    stdout = io.StringIO()
    call_command(
        "export_training_data",
        "--type",
        "all",
        "--start",
        "2024-03-05",
        "--end",
        "2024-03-05",
        "--no-progress",
        stdout=stdout,
    )
    text = stdout.getvalue()
    for data_type in ("events", "tasks", "tool_executions", "workflows", "conversations"):
        assert f"{data_type}: " in text
        assert (out / data_type / "2024-03-05_2024-03-05" / "manifest.json").is_file()
    assert ExportRun.objects.filter(status="succeeded").count() == 5


def test_command_says_when_it_kept_a_window_already_exported(db, out):
    """A second run printed the same line as the first, as if it had exported the window
    again; --force was the way to do that, and nothing said so."""
    seed_events(2)
    arguments = ("export_training_data", "--type", "events", "--start", "2024-03-05", "--end", "2024-03-05")
    first, second, forced = io.StringIO(), io.StringIO(), io.StringIO()
    call_command(*arguments, "--no-progress", stdout=first)
    call_command(*arguments, "--no-progress", stdout=second)
    call_command(*arguments, "--no-progress", "--force", stdout=forced)
    run = ExportRun.objects.order_by("pk").first()
    assert "already" not in first.getvalue()
    assert second.getvalue().startswith("events: 2 rows, sha256 ")
    assert second.getvalue().rstrip().endswith(f"(already exported by run {run.pk}; --force exports it again)")
    assert "already" not in forced.getvalue()
    assert ExportRun.objects.count() == 2


def test_a_transaction_open_since_before_the_window_end_keeps_the_window_open(db, out, settings):
    """A writer that began before the end may still commit rows into the window: refuse."""
    window = window_for(DAY, DAY)
    dsn = connection.get_connection_params()
    with psycopg.connect(
        dbname=dsn["dbname"], host=dsn.get("host"), port=dsn.get("port"), user=dsn.get("user")
    ) as other:
        other.execute("BEGIN")
        other.execute("SELECT 1")
        # The open transaction began now, after this old window ended: not a threat.
        window_check_closed(window)
        # Seen from a moment before it began, the window's end is after the transaction's start.
        late = window_for(timezone.now().date() - dt.timedelta(days=1), timezone.now().date() + dt.timedelta(days=1))
        with pytest.raises(WindowNotClosed, match=r"transaction\(s\) that began before its end"):
            window_check_closed(late, now=late.end + dt.timedelta(hours=1))
        other.execute("ROLLBACK")
    window_check_closed(late, now=late.end + dt.timedelta(hours=1))


def test_another_exports_read_only_snapshot_does_not_keep_a_window_open(db, out, monkeypatch):
    """An export's own transaction (read only, named EXPORT_SESSION_NAME) adds no row to any
    window: a long backfill must not hold off the daily export. Any other open transaction does."""
    from training_export.services import export as export_module

    late = window_for(timezone.now().date() - dt.timedelta(days=1), timezone.now().date() + dt.timedelta(days=1))
    dsn = connection.get_connection_params()
    with psycopg.connect(
        dbname=dsn["dbname"], host=dsn.get("host"), port=dsn.get("port"), user=dsn.get("user")
    ) as other:
        other.execute("BEGIN READ ONLY ISOLATION LEVEL REPEATABLE READ")
        other.execute("SELECT set_config('application_name', %s, true)", [export_module.EXPORT_SESSION_NAME])
        other.execute("SELECT 1")
        window_check_closed(late, now=late.end + dt.timedelta(hours=1))
        other.execute("ROLLBACK")
        other.execute("BEGIN")
        other.execute("SELECT 1")
        with pytest.raises(WindowNotClosed):
            window_check_closed(late, now=late.end + dt.timedelta(hours=1))
        other.execute("ROLLBACK")


@pytest.mark.django_db(transaction=True)
def test_an_export_names_its_snapshot_transaction_and_only_it(out):
    from training_export.services.export import EXPORT_SESSION_NAME

    EventFactory(created_at=dt.datetime.combine(DAY, dt.time(12), tzinfo=dt.UTC))
    names = []

    def look(rows):
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_setting('application_name')")
            names.append(cursor.fetchone()[0])

    with connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('application_name')")
        (before,) = cursor.fetchone()
    export_run(data_type="events", start_date=DAY, end_date=DAY, progress=look)
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('application_name')")
        (after,) = cursor.fetchone()
    assert names == [EXPORT_SESSION_NAME] and after == before != EXPORT_SESSION_NAME


def test_a_window_is_not_closed_before_the_stamp_margin_has_passed_whatever_the_lag(db, settings):
    """A transaction that may still stamp rows into the window can begin up to STAMP_MARGIN
    after its end: before that it cannot be seen open, so the window cannot be closed."""
    settings.TRAINING_EXPORT_SAFETY_LAG_SECONDS = 30
    end = timezone.now().replace(microsecond=0)
    window = Window(start=end - dt.timedelta(days=1), end=end, first_day=end.date(), last_day=end.date())
    with pytest.raises(WindowNotClosed, match="at least 60 s"):
        window_check_closed(window, now=end + dt.timedelta(seconds=40))
    window_check_closed(window, now=end + dt.timedelta(seconds=61))


def test_a_transaction_begun_just_after_the_window_end_keeps_the_window_open(db):
    """A completion's time is taken before its transaction's first statement (and kept through
    deadlock retries), on the application's clock: a transaction that began a little after the
    window's end may still stamp a row inside it."""
    dsn = connection.get_connection_params()
    with psycopg.connect(
        dbname=dsn["dbname"], host=dsn.get("host"), port=dsn.get("port"), user=dsn.get("user")
    ) as other:
        other.execute("BEGIN")
        (began,) = other.execute("SELECT now()").fetchone()
        just_before = Window(
            start=began - dt.timedelta(days=1, seconds=5),
            end=began - dt.timedelta(seconds=5),
            first_day=began.date(),
            last_day=began.date(),
        )
        long_before = Window(
            start=began - dt.timedelta(days=1, minutes=5),
            end=began - dt.timedelta(minutes=5),
            first_day=began.date(),
            last_day=began.date(),
        )
        later = began + dt.timedelta(hours=1)
        with pytest.raises(WindowNotClosed, match="up to 60 s after it"):
            window_check_closed(just_before, now=later)
        window_check_closed(long_before, now=later)  # beyond STAMP_MARGIN: not a threat
        other.execute("ROLLBACK")
    window_check_closed(just_before, now=later)


@pytest.mark.django_db(transaction=True)
def test_an_export_killed_mid_write_leaves_no_file_at_its_final_path(out, tmp_path):
    agent = AgentFactory()
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO events (event_id, event_type, entity_type, entity_id, agent_id, source, payload, severity, "
            "created_at) SELECT 'ev-' || i, 'agent_started', 'agent', %s, %s, 'platform', "
            "jsonb_build_object('i', i, 'text', repeat('x', 200)), 'info', %s + i * interval '1 millisecond' "
            "FROM generate_series(1, 60000) AS i",
            [agent.id, agent.id, T0],
        )
    final = out / "events" / "2024-03-05_2024-03-05" / "events-train.jsonl"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": database_url(),
        "TRAINING_EXPORT_DIR": str(out),
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "manage.py",
            "export_training_data",
            "--type",
            "events",
            "--start",
            "2024-03-05",
            "--end",
            "2024-03-05",
            "--no-progress",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(
            lambda: any(p.stat().st_size > 0 for p in final.parent.glob(".tmp-*")) if final.parent.exists() else False,
            timeout=60,
            interval=0.005,
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not final.exists()
    assert not (final.parent / "manifest.json").exists()
    run = ExportRun.objects.get()
    assert run.status == ExportRun.Status.RUNNING  # killed: the row tells so until it is retried

    completed = export_run(data_type="events", start_date=DAY, end_date=DAY)
    assert completed.rows == 60000 == len(final.read_text().splitlines())
    run.refresh_from_db()
    assert run.status == ExportRun.Status.FAILED
    assert f"export run {completed.pk} completed this window" in run.error
    failed = Event.objects.get(event_type=EventType.EXPORT_FAILED)
    assert (failed.entity_id, failed.severity) == (str(run.pk), "error")
    assert failed.payload["error"] == run.error
    assert Event.objects.get(event_type=EventType.EXPORT_COMPLETED).entity_id == str(completed.pk)


def export_events(event_type: str) -> list[Event]:
    return list(Event.objects.filter(event_type=event_type, entity_type="export").order_by("sequence"))


def test_a_succeeded_export_records_export_completed_with_its_manifest_facts(db, out):
    seed_events(4)
    run = export_run(data_type="events", start_date=DAY, end_date=DAY)
    [event] = export_events(EventType.EXPORT_COMPLETED)
    assert event.entity_id == str(run.pk) and event.severity == "info"
    assert event.payload == {
        "data_type": "events",
        "format": "jsonl",
        "window": {"start": "2024-03-05T00:00:00+00:00", "end": "2024-03-06T00:00:00+00:00"},
        "rows": 4,
        "bytes": run.bytes,
        "sha256": run.checksum,
        "path": "events/2024-03-05_2024-03-05/events-train.jsonl",
    }
    assert export_run(data_type="events", start_date=DAY, end_date=DAY).pk == run.pk  # intact: no second event
    assert len(export_events(EventType.EXPORT_COMPLETED)) == 1


def test_a_failed_export_records_export_failed_with_the_error(db, out, tmp_path):
    seed_events(2)
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the export directory would go")
    with pytest.raises(OSError):
        export_run(data_type="events", start_date=DAY, end_date=DAY, output_dir=blocked)
    run = ExportRun.objects.get()
    assert run.status == ExportRun.Status.FAILED and run.finished_at is not None
    [event] = export_events(EventType.EXPORT_FAILED)
    assert (event.entity_id, event.severity) == (str(run.pk), "error")
    assert event.payload["error"] == run.error and run.error.startswith(("NotADirectoryError", "FileExistsError"))
    assert event.payload["data_type"] == "events" and event.payload["window"]["start"] == "2024-03-05T00:00:00+00:00"
    assert not export_events(EventType.EXPORT_COMPLETED)


def test_a_requested_export_takes_over_its_pending_row_once(db, out, django_capture_on_commit_callbacks):
    seed_events(3)
    with django_capture_on_commit_callbacks() as callbacks:
        request = export_runs_request(data_types=["events", "tasks"], start_date=DAY, end_date=DAY)
    assert [run.status for run in request.queued] == ["pending", "pending"] and not request.already_exported
    assert len(callbacks) == 1
    pending = request.queued[0]
    done = export_run_execute(run_id=pending.pk)
    assert done.pk == pending.pk and done.status == ExportRun.Status.SUCCEEDED and done.rows == 3
    assert ExportRun.objects.filter(data_type="events").count() == 1
    # A second delivery of the same message finds the row taken and exports nothing again.
    assert export_run_execute(run_id=pending.pk).finished_at == done.finished_at
    assert len(export_events(EventType.EXPORT_COMPLETED)) == 1

    again = export_runs_request(data_types=["events", "tasks"], start_date=DAY, end_date=DAY)
    assert [run.pk for run in again.already_exported] == [done.pk]
    assert [run.data_type for run in again.queued] == ["tasks"]
    forced = export_runs_request(data_types=["events"], start_date=DAY, end_date=DAY, force=True)
    assert forced.queued and not forced.already_exported


def test_a_pending_export_of_a_window_held_open_waits_then_fails_on_the_last_try(db, out, settings):
    run = ExportRun.objects.create(
        data_type="events", window_start=window_for(DAY, DAY).start, window_end=window_for(DAY, DAY).end
    )
    settings.TRAINING_EXPORT_SAFETY_LAG_SECONDS = 10**9  # the window counts as still open
    with pytest.raises(WindowNotClosed):
        export_run_execute(run_id=run.pk)
    run.refresh_from_db()
    assert run.status == ExportRun.Status.PENDING and not export_events(EventType.EXPORT_FAILED)
    with pytest.raises(WindowNotClosed):
        export_run_execute(run_id=run.pk, final_try=True)
    run.refresh_from_db()
    assert run.status == ExportRun.Status.FAILED and "not closed yet" in run.error
    assert export_events(EventType.EXPORT_FAILED)[0].entity_id == str(run.pk)


def test_a_run_recorded_interrupted_by_a_later_run_keeps_that_record_when_it_finishes(db, out):
    """Two runs of one window: the later one finishes first and records the earlier one,
    still running, as interrupted. When the earlier one's writer then finishes too, it does
    not turn itself succeeded (which would give the window two successes) nor emit a second
    completion."""
    from training_export.services.export import _execute, _export_dir, exporter_for

    seed_events(2)
    window = window_for(DAY, DAY)
    earlier = ExportRun.objects.create(
        data_type="events",
        window_start=window.start,
        window_end=window.end,
        status=ExportRun.Status.RUNNING,
        started_at=timezone.now() - dt.timedelta(hours=1),
    )
    later = export_run(data_type="events", start_date=DAY, end_date=DAY)
    earlier.refresh_from_db()
    assert earlier.status == ExportRun.Status.FAILED

    earlier.status = ExportRun.Status.RUNNING  # as its own process still sees it
    finished = _execute(
        earlier,
        exporter=exporter_for("events"),
        window=window,
        directory=_export_dir(None, "events", window),
        progress=None,
    )
    assert finished.status == ExportRun.Status.FAILED
    later.refresh_from_db()
    assert later.status == ExportRun.Status.SUCCEEDED
    assert [e.entity_id for e in export_events(EventType.EXPORT_COMPLETED)] == [str(later.pk)]
    assert [e.entity_id for e in export_events(EventType.EXPORT_FAILED)] == [str(earlier.pk)]
