"""The JSONL export path under concurrency, failures and odd input: exports of one window at
once, a failed write, the daily export held off by a long transaction, redaction of JSON
carried as text, the compose volumes the exports API needs."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import logging
import threading
import time
from pathlib import Path

import psycopg
import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.utils import timezone

from orchestration.db import database_now
from orchestration.event_types import EventType
from orchestration.models import Event
from orchestration.runtime.tools import tool_schemas
from tests.engine import database_url, wait_for
from tests.factories import AgentFactory, EventFactory
from tests.pg import other_connection
from tests.training_export.test_chat import call, thread
from training_export.management.commands import export_training_data as command_module
from training_export.models import ExportRun
from training_export.services import export as export_service
from training_export.services.export import (
    DATA_TYPES,
    export_previous_day,
    export_run,
    window_check_closed,
    window_for,
)
from training_export.services.files import commit, sha256_file, staged_writer
from training_export.tasks import export_previous_day_task, export_run_task

DAY = dt.date(2024, 3, 5)
T0 = dt.datetime(2024, 3, 5, 10, 0, tzinfo=dt.UTC)


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text("utf-8").splitlines()]


# --- Hugging Face datasets with the built-in agents' tools ---------------------------------


def test_datasets_loads_conversations_of_agents_with_different_tools(db, out, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # The built-in agents' tool sets (agents/definitions/assistant.yaml, schema-validator.yaml).
    assistant = AgentFactory(id="assistant", config={"tools": ["calculator", "text_stats", "keywords"]})
    validator = AgentFactory(id="schema-validator", config={"tools": ["json_validate"]})
    thread(
        "t-a",
        assistant,
        [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "", "tool_calls": [call("c1", "calculator", {"expression": "2+2"})]},
            {"role": "tool", "content": '{"result": 4}', "tool_call_id": "c1"},
            {"role": "assistant", "content": "4"},
        ],
    )
    thread("t-b", validator, [{"role": "user", "content": "validate"}, {"role": "assistant", "content": "ok"}])
    run = export_run(data_type="conversations", start_date=DAY, end_date=DAY)
    assert run.rows == 2
    loaded = datasets.load_dataset(str(Path(run.path).parent), cache_dir=str(tmp_path / "hf-cache"))
    assert loaded["train"].num_rows == 2


def test_datasets_loads_a_single_thread_of_the_schema_validator(db, out, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    validator = AgentFactory(id="schema-validator", config={"tools": ["json_validate"]})
    thread("t-b", validator, [{"role": "user", "content": "validate"}, {"role": "assistant", "content": "ok"}])
    run = export_run(data_type="conversations", start_date=DAY, end_date=DAY)
    loaded = datasets.load_dataset(str(Path(run.path).parent), cache_dir=str(tmp_path / "hf-cache"))
    assert loaded["train"].num_rows == 1
    # What a trainer reads back must be the tool schema that was written.
    assert loaded["train"][0]["tools"] == tool_schemas(["json_validate"])


# --- redaction -------------------------------------------------------------------------------


def test_a_secret_under_a_key_in_a_tool_reply_is_redacted_in_the_chat_export(db, out):
    agent = AgentFactory(config={"tools": ["calculator"]})
    secret = "hunter2-not-a-pattern"
    thread(
        "t-1",
        agent,
        [
            {"role": "user", "content": "log in"},
            {"role": "assistant", "content": "", "tool_calls": [call("c1", "calculator", {"password": secret})]},
            {"role": "tool", "content": json.dumps({"api_key": secret, "result": 4}), "tool_call_id": "c1"},
            {"role": "assistant", "content": "done"},
        ],
    )
    # The same call as a tool_executed event: the tool_executions export masks it by key.
    EventFactory(
        event_type=EventType.TOOL_EXECUTED,
        entity_type="tool",
        entity_id="c1",
        created_at=T0,
        payload={
            "tool_name": "calculator",
            "input_params": {"password": secret},
            "output_result": {"api_key": secret, "result": 4},
        },
    )
    tools_run = export_run(data_type="tool_executions", start_date=DAY, end_date=DAY)
    assert secret not in Path(tools_run.path).read_text()
    chat_run = export_run(data_type="conversations", start_date=DAY, end_date=DAY)
    text = Path(chat_run.path).read_text()
    assert secret not in text, text


def test_a_configured_pii_key_does_not_mask_the_fixed_columns_of_tool_executions(db, out, settings):
    # An operator adds `name` to mask people's names inside payloads (configured PII).
    settings.REDACT_KEYS = [*settings.REDACT_KEYS, "name"]
    EventFactory(
        event_type=EventType.TOOL_EXECUTED,
        entity_type="tool",
        entity_id="c1",
        created_at=T0,
        payload={"tool_name": "calculator", "input_params": {"name": "Alice"}, "output_result": {"result": 4}},
    )
    EventFactory(event_type=EventType.AGENT_STARTED, created_at=T0, payload={"name": "Alice"})
    tools = read_lines(export_run(data_type="tool_executions", start_date=DAY, end_date=DAY).path)
    assert tools[0]["input_params"] == {"name": "[REDACTED]"}
    # The column is the tool's name (a fixed column of the schema), not a person's.
    assert tools[0]["tool_name"] == "calculator", tools[0]


# --- concurrency -------------------------------------------------------------------------------


def seed_events(count: int) -> None:
    for i in range(count):
        EventFactory(event_type=EventType.AGENT_STARTED, created_at=T0 + dt.timedelta(seconds=i), payload={"i": i})


def test_a_run_overtaken_by_a_later_run_of_its_window_is_not_reported_as_a_success(
    transactional_db, out, tmp_path, monkeypatch, waiting_for_a_lock
):
    seed_events(1200)  # three chunks
    entered, gate = threading.Event(), threading.Event()

    class PausingBar:
        def __init__(self, *args, **kwargs):
            pass

        def update(self, n):
            entered.set()
            gate.wait(30)

        def close(self):
            pass

    monkeypatch.setattr(command_module, "tqdm", PausingBar)
    result: dict = {}

    def run_command():
        stdout = io.StringIO()
        try:
            call_command(
                "export_training_data",
                "--type",
                "events",
                "--start",
                str(DAY),
                "--end",
                str(DAY),
                "--output",
                str(tmp_path / "a"),
                stdout=stdout,
            )
        except BaseException as exc:
            result["error"] = exc
        finally:
            result["stdout"] = stdout.getvalue()
            connection.close()

    a = threading.Thread(target=run_command)
    a.start()
    assert entered.wait(30)
    # Meanwhile another export of the same window (e.g. an API request) into another directory:
    # it waits for A, then exports and supersedes it, instead of overtaking it.
    b_result: dict = {}
    b_thread = in_thread(
        b_result, "b", lambda: export_run(data_type="events", start_date=DAY, end_date=DAY, output_dir=tmp_path / "b")
    )
    assert waiting_for_a_lock(b_thread)
    gate.set()
    a.join(60)
    b_thread.join(60)
    b = b_result["b"]
    assert b.status == ExportRun.Status.SUCCEEDED
    run_a = ExportRun.objects.exclude(pk=b.pk).get()
    # A ran to its end and wrote complete files; it was never interrupted, and its command
    # reported the success it had when it ended.
    assert "interrupted" not in (run_a.error or "")
    assert "error" not in result, result["error"]
    assert f"sha256 {run_a.checksum}" in result["stdout"]
    assert run_a.status == ExportRun.Status.SUPERSEDED
    assert b.started_at >= run_a.finished_at


# --- CLI errors ----------------------------------------------------------------------------------


def test_the_command_rejects_the_last_representable_day_with_a_clear_error(db, out):
    with pytest.raises(CommandError):
        call_command("export_training_data", "--type", "events", "--start", "9999-12-31", "--end", "9999-12-31")


def test_a_relative_output_directory_is_recorded_as_an_absolute_path(db, out, tmp_path, monkeypatch):
    from training_export.services.export import export_file_open

    seed_events(3)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    call_command(
        "export_training_data",
        "--type",
        "events",
        "--start",
        str(DAY),
        "--end",
        str(DAY),
        "--output",
        "exports-rel",
        "--no-progress",
        stdout=io.StringIO(),
    )
    run = ExportRun.objects.get()
    monkeypatch.chdir(tmp_path)  # the web process / a worker runs elsewhere
    export_file_open(run=run).file.close()  # the API download of this succeeded run


# --- the daily export and a long transaction (e.g. a nightly pg_dump) ---------------------------


def test_a_day_the_daily_export_gave_up_on_is_recorded_failed_and_exported_the_next_night(
    transactional_db, out, monkeypatch
):
    real_now = database_now
    # The database's clock, as the export reads it, at noon two days ahead: "yesterday" ends after
    # real now, and is closed whatever the real time of day (at 00:04 UTC a plain two-day shift
    # left it inside the safety lag).
    start = real_now()
    noon = dt.datetime.combine(start.date() + dt.timedelta(days=2), dt.time(12), tzinfo=dt.UTC)
    shift = noon - start
    monkeypatch.setattr(export_service, "database_now", lambda: real_now() + shift)
    missed = (real_now() + shift).date() - dt.timedelta(days=1)
    # The day before was exported: the type has a last exported day to catch up from.
    before = missed - dt.timedelta(days=1)
    for data_type in DATA_TYPES:
        export_run(data_type=data_type, start_date=before, end_date=before)
    # A session that began before the window end (+60 s) and is still open: pg_dump's
    # REPEATABLE READ snapshot during a nightly backup, another long export, a report query.
    with psycopg.connect(database_url(), autocommit=False) as other:
        other.execute("SELECT 1")
        result = export_previous_day_task.apply(retries=export_previous_day_task.max_retries)
        other.rollback()
    assert result.state == "FAILURE"
    gave_up = ExportRun.objects.filter(window_start__date=missed)
    assert sorted(gave_up.values_list("data_type", flat=True)) == sorted(DATA_TYPES)
    assert {run.status for run in gave_up} == {ExportRun.Status.FAILED}
    assert all("gave up" in run.error and "open" in run.error for run in gave_up)
    assert Event.objects.filter(event_type=EventType.EXPORT_FAILED).count() == len(DATA_TYPES)
    # The next night the backup is over: both days are exported, the missed one first.
    monkeypatch.setattr(export_service, "database_now", lambda: real_now() + shift + dt.timedelta(days=1))
    runs = [ExportRun.objects.get(pk=pk) for pk in export_previous_day_task.apply().get()]
    assert [(run.window_start.date(), run.data_type) for run in runs] == [
        (day, data_type) for day in (missed, missed + dt.timedelta(days=1)) for data_type in DATA_TYPES
    ]
    assert {run.status for run in runs} == {ExportRun.Status.SUCCEEDED}
    # A third night finds nothing missed: only its own day is exported.
    monkeypatch.setattr(export_service, "database_now", lambda: real_now() + shift + dt.timedelta(days=2))
    runs = [ExportRun.objects.get(pk=pk) for pk in export_previous_day_task.apply().get()]
    assert {run.window_start.date() for run in runs} == {missed + dt.timedelta(days=2)}


def test_the_daily_export_catches_up_from_the_last_exported_day_at_most_the_configured_days(db, out, settings):
    settings.TRAINING_EXPORT_CATCHUP_DAYS = 3
    export_run(data_type="events", start_date=dt.date(2024, 3, 10), end_date=dt.date(2024, 3, 10))
    export_run(data_type="tasks", start_date=dt.date(2024, 3, 17), end_date=dt.date(2024, 3, 17))  # by hand
    export_run(data_type="workflows", start_date=dt.date(2024, 3, 1), end_date=dt.date(2024, 3, 18))  # not a day
    runs = export_previous_day(now=dt.datetime(2024, 3, 20, 0, 30, tzinfo=dt.UTC))

    def days(data_type: str) -> list[dt.date]:
        return [run.window_start.date() for run in runs if run.data_type == data_type]

    # Three days back from the previous day (the 19th), oldest first.
    assert days("events") == [dt.date(2024, 3, 16), dt.date(2024, 3, 17), dt.date(2024, 3, 18), dt.date(2024, 3, 19)]
    assert days("tasks") == [dt.date(2024, 3, 18), dt.date(2024, 3, 19)]  # after its last exported day
    # Types never exported day by day (a new deployment) export the previous day only.
    assert days("workflows") == days("conversations") == [dt.date(2024, 3, 19)]
    # The next night, nothing is missing any more.
    runs = export_previous_day(now=dt.datetime(2024, 3, 21, 0, 30, tzinfo=dt.UTC))
    assert {run.window_start.date() for run in runs} == {dt.date(2024, 3, 20)}
    settings.TRAINING_EXPORT_CATCHUP_DAYS = 0
    runs = export_previous_day(now=dt.datetime(2024, 3, 25, 0, 30, tzinfo=dt.UTC))
    assert {run.window_start.date() for run in runs} == {dt.date(2024, 3, 24)}


def test_a_day_that_failed_in_a_catch_up_is_exported_the_next_night_though_later_days_succeeded(db, out):
    """Beat was away three nights; its catch-up exports the 17th, 18th and 19th. The 17th's events
    fail on their own (here their directory cannot be made: a file is in its place), the later days
    succeed. The next night must export the 17th again: counted from the last exported day (the
    19th), it was never tried again, a day of events missing from the training data for good."""
    for data_type in DATA_TYPES:
        export_run(data_type=data_type, start_date=dt.date(2024, 3, 16), end_date=dt.date(2024, 3, 16))
    blocker = out / "events" / "2024-03-17_2024-03-17"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a directory")
    with pytest.raises(OSError):
        export_previous_day(now=dt.datetime(2024, 3, 20, 0, 30, tzinfo=dt.UTC))
    failed = ExportRun.objects.get(status=ExportRun.Status.FAILED)
    assert (failed.data_type, failed.window_start.date()) == ("events", dt.date(2024, 3, 17))
    blocker.unlink()  # the operator clears it
    runs = export_previous_day(now=dt.datetime(2024, 3, 21, 0, 30, tzinfo=dt.UTC))
    exported = {(run.window_start.date(), run.data_type) for run in runs if run.status == ExportRun.Status.SUCCEEDED}
    assert exported == {(dt.date(2024, 3, 17), "events")} | {(dt.date(2024, 3, 20), t) for t in DATA_TYPES}
    assert (out / "events" / "2024-03-17_2024-03-17" / "events-train.jsonl").is_file()
    # Once exported, the day is not exported again.
    runs = export_previous_day(now=dt.datetime(2024, 3, 22, 0, 30, tzinfo=dt.UTC))
    assert {run.window_start.date() for run in runs} == {dt.date(2024, 3, 21)}


# --- temporary names of concurrent writers ---------------------------------------------------------


def test_two_writers_of_one_path_in_one_process_do_not_share_a_temporary_file(tmp_path):
    """Two exports of one window in workers with the same PID (prefork children of two worker
    containers on the shared training-data volume, or a threads pool): A writes its file; B, which
    started meanwhile, dies before it has rewritten what A had written already."""
    path = tmp_path / "events-train.jsonl"
    block = b'{"k":"' + b"x" * 1000 + b'"}\n'
    a = staged_writer(path)
    writer_a, staged_a = a.__enter__()
    for _ in range(2048):  # 2 MiB: past the 1 MiB buffer, on disk
        writer_a.write(block)
    b = staged_writer(path)
    b.__enter__()  # B opens "its" temporary file: were it A's name, A's bytes would be truncated
    for _ in range(1024):
        writer_a.write(block)
    a.__exit__(None, None, None)
    commit(staged_a)  # A renames into place and would record its sha256
    # B's worker is killed here (hard time limit, OOM, container stop): no cleanup runs.
    assert sha256_file(path) == writer_a.sha256, "the published file is not the one A hashed"


def in_thread(result: dict, name: str, export) -> threading.Thread:
    """`export()` in a thread of its own, with its own database connection: its run (or
    error) in result[name]."""

    def target():
        try:
            result[name] = export()
        except BaseException as exc:
            result[f"{name} error"] = exc
        finally:
            connection.close()

    thread = threading.Thread(target=target)
    thread.start()
    return thread


def paused_export(result: dict, name: str) -> tuple[threading.Thread, threading.Event]:
    """An export of DAY in a thread of its own (`in_thread`), paused at its first chunk until the
    gate returned is set."""
    entered, gate = threading.Event(), threading.Event()

    def pause(n):
        entered.set()
        gate.wait(30)

    thread = in_thread(
        result, name, lambda: export_run(data_type="events", start_date=DAY, end_date=DAY, progress=pause)
    )
    assert entered.wait(30)
    return thread, gate


@pytest.fixture
def waiting_for_a_lock(caplog):
    """Whether, within the timeout, `thread` says it waits for its window's other export to
    finish while it is still running (False once it has ended without waiting)."""
    caplog.set_level(logging.INFO, logger=export_service.__name__)

    def waiting(thread: threading.Thread, *, timeout: float = 30) -> bool:
        deadline = time.monotonic() + timeout
        while thread.is_alive() and time.monotonic() < deadline:
            if any(
                record.thread == thread.ident and "waits for the one already running" in record.getMessage()
                for record in list(caplog.records)
            ):
                return True
            time.sleep(0.05)
        return False

    return waiting


def test_two_exports_of_one_window_in_one_process_both_succeed_or_one_is_told_why(
    transactional_db, out, waiting_for_a_lock
):
    seed_events(1200)
    result: dict = {}
    a, gate = paused_export(result, "a")
    # A second request, same worker pid: it waits for A, then finds A's files.
    b = in_thread(result, "b", lambda: export_run(data_type="events", start_date=DAY, end_date=DAY))
    assert waiting_for_a_lock(b)
    gate.set()
    a.join(60)
    b.join(60)
    assert "a error" not in result, result["a error"]
    assert "b error" not in result, result["b error"]
    assert result["b"].pk == result["a"].pk
    assert result["a"].status == ExportRun.Status.SUCCEEDED


def test_a_hand_export_and_the_nightly_export_of_one_day_at_once_record_one_run(
    transactional_db, out, waiting_for_a_lock
):
    """manage.py export_training_data (or a worker's API export) of a day, and the beat's export
    of that day starting while it runs: the beat waits for it and takes its run, so the day's
    files are written once and one export_completed is recorded (both were, and the hand run,
    reported a success, ended superseded)."""
    seed_events(1200)  # three chunks
    result: dict = {}
    by_hand, gate = paused_export(result, "hand")
    nightly = in_thread(result, "beat", lambda: export_previous_day(now=T0 + dt.timedelta(days=1)))
    assert waiting_for_a_lock(nightly)
    gate.set()
    by_hand.join(60)
    nightly.join(60)
    assert "hand error" not in result, result["hand error"]
    assert "beat error" not in result, result["beat error"]
    runs = ExportRun.objects.filter(data_type="events").order_by("pk")
    assert [(run.pk, run.status) for run in runs] == [(result["hand"].pk, ExportRun.Status.SUCCEEDED)]
    beat_events = [run for run in result["beat"] if run.data_type == "events"]
    assert [run.pk for run in beat_events] == [result["hand"].pk]
    completed = Event.objects.filter(event_type=EventType.EXPORT_COMPLETED, payload__data_type="events")
    assert completed.count() == 1


def window_lock(window) -> str:
    return export_service._window_lock_key("events", ExportRun.Format.JSONL, window)


def test_an_export_waiting_for_its_window_holds_no_later_window_open(transactional_db, out, waiting_for_a_lock):
    """An export that waits for its window's other export (a month re-exported by hand, still
    writing at midnight) waited in one statement, open since it began: window_check_closed took
    it for a transaction that may still commit rows, and held off the export of every window
    ending after that (the nightly one: retried, then given up) until the wait ended."""
    seed_events(1200)  # three chunks
    result: dict = {}
    first, gate = paused_export(result, "first")
    second = in_thread(result, "second", lambda: export_run(data_type="events", start_date=DAY, end_date=DAY))
    try:
        assert waiting_for_a_lock(second)
        time.sleep(0.3)  # well into its wait
        today = database_now().astimezone(dt.UTC).date()
        tonight = window_for(today, today)
        window_check_closed(tonight, now=tonight.end + dt.timedelta(days=1))
    finally:
        gate.set()
        first.join(60)
        second.join(60)
    assert "second error" not in result, result["second error"]
    assert result["second"].pk == result["first"].pk


def test_an_api_export_stopped_while_it_waits_for_its_window_is_recorded_failed_by_its_worker(worker, out):
    """A worker's export of a requested run waits for the window's other export (here a session
    holding the window's lock, as a hand export does) and meets its soft time limit meanwhile.
    The wait was outside the part of the run that records its end: the run was left running,
    without its export_failed event, its lock held by the worker's session (which a requeued
    request, or the sweep, takes for a live export), the exception cutting a query in flight."""
    window = window_for(DAY, DAY)
    run = ExportRun.objects.create(
        data_type="events",
        format=ExportRun.Format.JSONL,
        window_start=window.start,
        window_end=window.end,
        status=ExportRun.Status.PENDING,
    )
    with other_connection() as other_export:
        other_export.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", [window_lock(window)])
        export_run_task.apply_async(args=[run.pk], queue="low", routing_key="low", soft_time_limit=3, time_limit=60)
        wait_for(
            lambda: ExportRun.objects.get(pk=run.pk).status == ExportRun.Status.FAILED,
            timeout=30,
            what=f"the waiting run recorded failed ({worker.log_path})",
        )
        run.refresh_from_db()
        assert "SoftTimeLimitExceeded" in run.error, run.error
        assert Event.objects.filter(event_type=EventType.EXPORT_FAILED, entity_id=str(run.pk)).count() == 1
        # The worker's session holds no lock: neither the run's nor, once free, the window's.
        other_export.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", [window_lock(window)])
        time.sleep(1)
        held = other_export.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchone()[0]
        assert held == 0


def test_a_request_for_a_window_being_exported_does_not_queue_a_second_export(
    db, out, django_capture_on_commit_callbacks
):
    from training_export.services.export import export_runs_request, window_for

    window = window_for(DAY, DAY)
    running = ExportRun.objects.create(
        data_type="events",
        format="jsonl",
        window_start=window.start,
        window_end=window.end,
        status=ExportRun.Status.RUNNING,
        started_at=timezone.now(),
    )
    # The worker exporting it: a live session (the fix marks a live run with an advisory lock
    # named after it, which the original code does not look at).
    with psycopg.connect(database_url(), autocommit=True) as worker:
        worker.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", [f"export_run:{running.pk}"])
        with django_capture_on_commit_callbacks(execute=False):
            result = export_runs_request(data_types=["events"], start_date=DAY, end_date=DAY)
    assert [r.pk for r in result.queued] in ([], [running.pk])


# --- a failure after the data file is written ---------------------------------------------------


def test_an_export_that_fails_leaves_no_dataset_at_its_final_paths(db, out, monkeypatch):
    from training_export.services import export as export_module

    seed_events(3)
    first = export_run(data_type="events", start_date=DAY, end_date=DAY)
    directory = Path(first.path).parent
    before = {path.name: path.read_bytes() for path in directory.iterdir()}
    EventFactory(event_type=EventType.AGENT_STARTED, created_at=T0 + dt.timedelta(hours=1), payload={"new": 1})
    real_stage = export_module.stage_bytes

    def disk_full_at_the_manifest(path, data):
        if path.name == "manifest.json":
            raise OSError(28, "No space left on device")
        return real_stage(path, data)

    monkeypatch.setattr(export_module, "stage_bytes", disk_full_at_the_manifest)
    with pytest.raises(OSError):
        export_run(data_type="events", start_date=DAY, end_date=DAY, force=True)
    failed = ExportRun.objects.order_by("-pk").first()
    assert failed.status == ExportRun.Status.FAILED and "No space left" in failed.error
    # The earlier export's files are untouched (no new data beside the old card and manifest),
    # and no temporary file is left behind.
    assert {path.name: path.read_bytes() for path in directory.iterdir()} == before


def test_the_web_service_sees_the_exported_files():
    """The exports API (web) downloads files and checks whether an export is intact."""
    import yaml

    from tests.test_compose import COMPOSE_FILE

    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    worker_mounts = {v for v in services["worker"].get("volumes", []) if "training" in v}
    assert worker_mounts and worker_mounts <= set(services["web"].get("volumes", [])), services["web"].get("volumes")


def test_one_failing_day_does_not_stop_the_daily_export_of_every_other_day_and_type(db, out, monkeypatch):
    """A day whose export fails for a reason of its own (not a window held open: a directory the
    worker cannot write, a row that breaks the count check) is retried first every night; it
    must not end the night before the other days and types are exported."""
    from training_export.services import export as export_module

    export_run(data_type="events", start_date=dt.date(2024, 3, 10), end_date=dt.date(2024, 3, 10))
    bad = dt.date(2024, 3, 11)
    real_write = export_module._write

    def write(exporter, window, *args, **kwargs):
        if exporter.data_type == "events" and window.first_day == bad:
            raise PermissionError(13, "Permission denied")
        return real_write(exporter, window, *args, **kwargs)

    monkeypatch.setattr(export_module, "_write", write)
    for night in (dt.datetime(2024, 3, 12, 0, 30, tzinfo=dt.UTC), dt.datetime(2024, 3, 13, 0, 30, tzinfo=dt.UTC)):
        with contextlib.suppress(PermissionError):
            export_previous_day(now=night)
    exported = set(
        ExportRun.objects.filter(status=ExportRun.Status.SUCCEEDED).values_list("data_type", "window_start__date")
    )
    # The second night's own day (the 12th) is exported for every type despite the failing 11th.
    assert {(t, dt.date(2024, 3, 12)) for t in DATA_TYPES} <= exported, sorted(exported)


def test_a_run_is_seen_alive_from_the_moment_its_row_is_running(
    transactional_db, out, monkeypatch, django_capture_on_commit_callbacks
):
    """The advisory lock is taken in the transaction that makes the row running: a request that
    finds the run running (here, paused just before it exports) finds it alive and queues no
    second export of the window beside it."""
    from training_export.services import export as export_module
    from training_export.services.export import export_runs_request

    seed_events(3)
    real_alive = export_module._run_alive
    in_gap, go_on = threading.Event(), threading.Event()

    def slow_alive(run):
        in_gap.set()  # the row is committed as running; the lock is not taken yet
        go_on.wait(30)
        return real_alive(run)

    monkeypatch.setattr(export_module, "_run_alive", slow_alive)
    result: dict = {}

    def worker():
        try:
            result["run"] = export_run(data_type="events", start_date=DAY, end_date=DAY)
        finally:
            connection.close()

    t = threading.Thread(target=worker)
    t.start()
    assert in_gap.wait(30)
    with django_capture_on_commit_callbacks(execute=False):
        request = export_runs_request(data_types=["events"], start_date=DAY, end_date=DAY)
    go_on.set()
    t.join(60)
    running = ExportRun.objects.get(status__in=["running", "succeeded"], pk=result["run"].pk)
    assert [r.pk for r in request.queued] == [running.pk], [(r.pk, r.status) for r in request.queued]
