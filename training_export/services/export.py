"""JSONL exports of closed windows, recorded in export_runs.

`export_run` exports one data type for the UTC days start_date..end_date (both included, so
the window is [start_date 00:00, end_date + 1 day 00:00)). It writes, in
`<output>/<data_type>/<start_date>_<end_date>/`:

- `<data_type>-train.jsonl`, streamed from the database, written atomically (services/files.py);
- `README.md`, a dataset card `datasets.load_dataset(<dir>)` understands;
- `manifest.json` (rows, sha256, schema version, watermark), written last.

Only closed windows are exported. A window is closed when its end lies at least
TRAINING_EXPORT_SAFETY_LAG_SECONDS in the past and, on PostgreSQL, no transaction that began
before its end plus STAMP_MARGIN is still open in this database. Rows carry the time their
transaction started (`created_at` defaults to now(), the transaction start) or a time the
application took for it: just before its first statement, kept through the retries of a
deadlock victim (under 2 s of backoff), on the database's clock as the application carries it
(orchestration.db.DatabaseClock: read at the attempt's claim, then on the host's monotonic
clock). So a transaction that began more than STAMP_MARGIN after the end cannot add rows
to the window, and one that began before that and commits late is waited for instead of missed.
The check runs before the export's own snapshot is taken, so every such transaction has ended
by then and is in the snapshot.
(Sessions of other database roles are visible only with pg_read_all_stats; writers use the
application's role.) SQLite serialises writers, so there the lag alone applies.

A window already exported successfully is not written again when its files are intact;
`force=True` re-exports it, and the new run supersedes the old one. Re-running a window gives
byte-identical files. Exports of one type and window run one at a time (`_window_alone`): one
started while another runs (by hand, the beat, a worker) waits for it, then finds its files.

`export_runs_request` (the API) records `pending` rows and queues one Celery task per row;
the task runs `export_run_execute`, which claims its row (pending -> running) and exports into
it. Every final status (succeeded, failed) is recorded in one transaction with its
export_completed / export_failed event.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import F, Max, Min, QuerySet
from django.db.models.functions import Now

from orchestration.db import database_now, process_stopping, stop_raised, stopping_write
from orchestration.errors import TransitionError
from orchestration.event_types import EntityType, EventType, Severity
from orchestration.isodates import is_iso_day_form
from orchestration.services.events import event_record
from training_export.models import ExportRun
from training_export.services.chat import ChatExporter
from training_export.services.files import (
    HashingWriter,
    commit,
    sha256_file,
    sha256_stream,
    stage_bytes,
    staged_writer,
)
from training_export.services.jsonl import EXPORTERS, SCHEMA_VERSION, Exporter
from training_export.services.manifest import (
    MANIFEST_NAME,
    KeysFile,
    Manifest,
    data_file_name,
    dataset_card,
    manifest_read,
)

logger = logging.getLogger(__name__)

CONVERSATIONS = "conversations"
DATA_TYPES = (*EXPORTERS, CONVERSATIONS)
PROGRESS_EVERY = 1000
# Hard time limit of one export task; a window held open is tried again after the countdown.
EXPORT_TIME_LIMIT_SECONDS = 6 * 3600
EXPORT_RETRY_COUNTDOWN_SECONDS = 600
# How long past its limit a run must be before export_runs_sweep decides it was lost.
EXPORT_LOST_GRACE_SECONDS = 900
# The error of a run whose process was stopped (a terminate signal, a worker's shutdown, ^C) or
# killed before it finished: recorded by that process as it stops, or by export_runs_sweep once
# the process is gone, whichever comes first. The window is exported again by the next run.
RUN_STOPPED_ERROR = "lost: the process running it was stopped or killed before it finished"
# How often an export waiting for its window's other export (`_window_alone`) tries its lock.
WINDOW_WAIT_POLL_SECONDS = 1.0


class ExportError(ValueError):
    """An export that cannot run as asked (bad type or dates, window not closed yet)."""


class WindowNotClosed(ExportError):
    pass


class ExportFileGone(ExportError):
    """The data file of a succeeded run is missing or is no longer the file it wrote."""


class ExportFileNone(ExportError):
    """A file a run does not have (the keys file of a type other than conversations, or of a run
    written before keys files were)."""


# The files of a run a client may download: its data file, and a conversations export's keys file.
DOWNLOAD_FILES = ("data", "keys")


@dataclass(frozen=True)
class Window:
    start: dt.datetime
    end: dt.datetime
    first_day: dt.date
    last_day: dt.date

    @property
    def label(self) -> str:
        return f"{self.first_day.isoformat()}_{self.last_day.isoformat()}"


def parse_day(value: str | dt.date, *, name: str) -> dt.date:
    if isinstance(value, dt.datetime):
        raise ExportError(f"{name} must be a date (YYYY-MM-DD), not a datetime")
    if isinstance(value, dt.date):
        return value
    text = str(value).strip()
    # fromisoformat alone also reads 20240305 and the week date 2024-W10-2 (5 March).
    if is_iso_day_form(text):
        try:
            return dt.date.fromisoformat(text)
        except ValueError:
            pass  # in form, but no day (2024-13-01)
    raise ExportError(f"{name}={value!r} is not a date; expected YYYY-MM-DD")


def window_for(start_date: str | dt.date, end_date: str | dt.date) -> Window:
    """The UTC window of the days start_date..end_date, both included."""
    first = parse_day(start_date, name="start_date")
    last = parse_day(end_date, name="end_date")
    if last < first:
        raise ExportError(f"end_date {last} is before start_date {first}")
    if last >= dt.date.max:
        raise ExportError(f"end_date must be before {dt.date.max.isoformat()}")
    start = dt.datetime.combine(first, dt.time(), tzinfo=dt.UTC)
    end = dt.datetime.combine(last + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    return Window(start=start, end=end, first_day=first, last_day=last)


def exporter_for(data_type: str) -> Exporter | ChatExporter:
    if data_type == CONVERSATIONS:
        return ChatExporter()
    try:
        return EXPORTERS[data_type]
    except KeyError:
        raise ExportError(f"unknown data type {data_type!r}; expected one of {', '.join(DATA_TYPES)} or all") from None


def format_for(data_type: str) -> str:
    return ExportRun.Format.CHAT_JSONL if data_type == CONVERSATIONS else ExportRun.Format.JSONL


# How long after a window's end a transaction may begin and still stamp rows inside the window
# (see the module doc): the application takes a completion's time before the transaction's first
# statement and keeps it through deadlock retries.
STAMP_MARGIN = dt.timedelta(seconds=60)


# The application_name of an export's read-only snapshot transaction (see window_check_closed).
EXPORT_SESSION_NAME = "agentledger export (read only)"


def window_check_closed(window: Window, *, now: dt.datetime | None = None) -> None:
    """Raise WindowNotClosed unless no row can still be added to the window (see module doc).
    Its end is compared with the database's clock, which stamps the rows: on a host whose clock
    ran ahead, a window whose rows were still being written looked closed."""
    now = now or database_now()
    # Never before STAMP_MARGIN has passed: a transaction that may still stamp rows into the
    # window must have begun, to be seen below.
    lag = max(dt.timedelta(seconds=settings.TRAINING_EXPORT_SAFETY_LAG_SECONDS), STAMP_MARGIN)
    if window.end > now - lag:
        raise WindowNotClosed(
            f"the window {window.start.isoformat()} .. {window.end.isoformat()} is not closed yet: it can be "
            f"exported from {(window.end + lag).isoformat()} (TRAINING_EXPORT_SAFETY_LAG_SECONDS="
            f"{settings.TRAINING_EXPORT_SAFETY_LAG_SECONDS}, at least {STAMP_MARGIN.total_seconds():.0f} s)"
        )
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        # Activity statistics are otherwise read once per transaction and then repeated.
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(
            "SELECT count(*), min(xact_start) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND backend_type = 'client backend' AND xact_start < %s "
            "AND application_name IS DISTINCT FROM %s",
            [window.end + STAMP_MARGIN, EXPORT_SESSION_NAME],
        )
        open_count, oldest = cursor.fetchone()
    if open_count:
        raise WindowNotClosed(
            f"the window {window.start.isoformat()} .. {window.end.isoformat()} is not closed yet: {open_count} "
            f"transaction(s) that began before its end or up to {STAMP_MARGIN.total_seconds():.0f} s after it "
            f"(the oldest at {oldest.isoformat()}) are still open and may still commit rows into it; try again "
            "when they have ended"
        )


def _export_dir(output_dir: Path | str | None, data_type: str, window: Window) -> Path:
    root = Path(output_dir) if output_dir else Path(settings.TRAINING_EXPORT_DIR)
    # Absolute: the run records this path, and the web process and workers read it from
    # their own working directories.
    return root.resolve() / data_type / window.label


def _intact(run: ExportRun) -> bool:
    path = Path(run.path)
    return path.is_file() and (path.parent / MANIFEST_NAME).is_file() and sha256_file(path) == run.checksum


def _previous_intact(*, data_type: str, fmt: str, window: Window, directory: Path) -> ExportRun | None:
    """The window's succeeded run when its files are still the ones it wrote, else None."""
    previous = ExportRun.objects.filter(
        data_type=data_type,
        format=fmt,
        window_start=window.start,
        window_end=window.end,
        status=ExportRun.Status.SUCCEEDED,
    ).first()
    if previous is not None and Path(previous.path).parent == directory and _intact(previous):
        return previous
    return None


def export_relative_path(path: str) -> str:
    """The data file's path below the export directory (`<type>/<window>/<file>`, the layout
    every export has), for showing a run without the machine's directories."""
    return str(Path(*Path(path).parts[-3:])) if path else ""


def _window_payload(run: ExportRun) -> dict[str, str]:
    return {
        "start": run.window_start.astimezone(dt.UTC).isoformat(),
        "end": run.window_end.astimezone(dt.UTC).isoformat(),
    }


def _event_completed(run: ExportRun) -> None:
    event_record(
        event_type=EventType.EXPORT_COMPLETED,
        entity_type=EntityType.EXPORT,
        entity_id=str(run.pk),
        payload={
            "data_type": run.data_type,
            "format": run.format,
            "window": _window_payload(run),
            "rows": run.rows,
            "bytes": run.bytes,
            "sha256": run.checksum,
            "path": export_relative_path(run.path),
        },
    )


def _event_failed(run: ExportRun, error: str) -> None:
    event_record(
        event_type=EventType.EXPORT_FAILED,
        entity_type=EntityType.EXPORT,
        entity_id=str(run.pk),
        payload={"data_type": run.data_type, "format": run.format, "window": _window_payload(run), "error": error},
        severity=Severity.ERROR,
    )


def _fail(run_ids: list[int], *, error: str, expected: tuple[str, ...] = (ExportRun.Status.RUNNING,)) -> list[int]:
    """Record runs (still in an expected status) failed, each with its export_failed event, in
    one transaction. Returns the ids that changed."""
    with transaction.atomic():
        runs = list(ExportRun.objects.select_for_update().filter(pk__in=run_ids, status__in=expected).order_by("pk"))
        now = database_now()
        for run in runs:
            run.status = ExportRun.Status.FAILED
            run.error = error
            run.finished_at = now
            run.save(update_fields=["status", "error", "finished_at", "updated_at"])
            _event_failed(run, error)
    return [run.pk for run in runs]


def export_run(
    *,
    data_type: str,
    start_date: str | dt.date,
    end_date: str | dt.date,
    output_dir: Path | str | None = None,
    force: bool = False,
    requested_by_id: int | None = None,
    progress: Callable[[int], None] | None = None,
    time_limit_seconds: int | None = None,
) -> ExportRun:
    """Export one data type for a closed window; returns the succeeded export_runs row (an
    earlier one when the window was already exported and its files are intact).
    `time_limit_seconds`: the hard limit of the worker running this, after which (plus a
    grace) export_runs_sweep records a run still running as lost; None for no limit."""
    exporter = exporter_for(data_type)
    window = window_for(start_date, end_date)
    fmt = format_for(data_type)
    window_check_closed(window)
    directory = _export_dir(output_dir, data_type, window)
    # Checked once the window's other export (by hand, the beat, a worker) has finished: that
    # one's files are then the answer, not a second run writing them again beside it.
    with _window_alone(data_type=data_type, fmt=fmt, window=window):
        if not force:
            previous = _previous_intact(data_type=data_type, fmt=fmt, window=window, directory=directory)
            if previous is not None:
                return previous

        with transaction.atomic():
            run = ExportRun.objects.create(
                data_type=data_type,
                format=fmt,
                window_start=window.start,
                window_end=window.end,
                status=ExportRun.Status.RUNNING,
                schema_version=SCHEMA_VERSION,
                requested_by_id=requested_by_id,
                started_at=(started := database_now()),
                deadline_at=_deadline(started, time_limit_seconds),
            )
            # Before the row is seen running: a run without its lock looks dead to the others.
            _run_lock(run.pk)
        return _execute(run, exporter=exporter, window=window, directory=directory, progress=progress)


def export_run_execute(
    *,
    run_id: int,
    output_dir: Path | str | None = None,
    final_try: bool = False,
    progress: Callable[[int], None] | None = None,
    time_limit_seconds: int | None = None,
) -> ExportRun:
    """Export into a pending export_runs row (one `export_runs_request` recorded): claim it
    (pending -> running; a row already claimed, by an earlier delivery, is returned as it is)
    and export its type and window. A window still held open raises WindowNotClosed with the
    row left pending, to be tried again; on the `final_try` the row is recorded failed."""
    run = ExportRun.objects.get(pk=run_id)
    if run.status != ExportRun.Status.PENDING:
        return run
    window = window_for(*run_days(run))
    try:
        exporter = exporter_for(run.data_type)
        window_check_closed(window)
    except ExportError as exc:
        if final_try or not isinstance(exc, WindowNotClosed):
            _fail([run.pk], error=str(exc), expected=(ExportRun.Status.PENDING,))
        else:
            # A sign of life for export_runs_sweep: this row still has a message (its retry).
            ExportRun.objects.filter(pk=run.pk, status=ExportRun.Status.PENDING).update(updated_at=Now())
        raise
    now = database_now()  # started_at and deadline_at, which export_runs_sweep compares with its clock
    deadline = _deadline(now, time_limit_seconds)
    with transaction.atomic():
        _run_lock(run.pk)  # before the claim is seen: a running row without its lock looks dead
        claimed = ExportRun.objects.filter(pk=run.pk, status=ExportRun.Status.PENDING).update(
            status=ExportRun.Status.RUNNING,
            started_at=now,
            deadline_at=deadline,
            schema_version=SCHEMA_VERSION,
            updated_at=now,
        )
    if claimed != 1:
        _run_unlock(run.pk)
        return ExportRun.objects.get(pk=run.pk)
    run.status, run.started_at, run.deadline_at = ExportRun.Status.RUNNING, now, deadline
    run.schema_version = SCHEMA_VERSION
    directory = _export_dir(output_dir, run.data_type, window)
    # Claimed first (the row running and alive: its message is not sent again while it waits),
    # and waited for as part of the run: a stop or an error meanwhile is recorded as its end.
    alone = _window_alone(data_type=run.data_type, fmt=run.format, window=window)
    return _execute(run, exporter=exporter, window=window, directory=directory, progress=progress, alone=alone)


def _window_lock_key(data_type: str, fmt: str, window: Window) -> str:
    return f"export_window:{data_type}:{fmt}:{window.label}"


@contextmanager
def _window_alone(*, data_type: str, fmt: str, window: Window) -> Iterator[None]:
    """Export a type's window only while no other process does (PostgreSQL; SQLite runs one
    process): waits for the one exporting it (the beat, a worker, manage.py) to finish. Two at
    once each wrote the day's files and recorded a run with its export_completed event; the one
    that finished first was then superseded, though its caller had reported it a success.
    A session lock, released when the export ends or its process dies.
    Waited for by trying it every WINDOW_WAIT_POLL_SECONDS, with no statement open in between:
    a statement waiting for it was an open transaction to window_check_closed, which then held
    off the export of every window ending after the wait began, and a soft time limit raised
    while it waited left the query running, the connection unusable."""
    if connection.vendor != "postgresql":
        yield
        return
    key = _window_lock_key(data_type, fmt, window)
    waiting = False
    while True:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", [key])
            if cursor.fetchone()[0]:
                break
        if not waiting:
            waiting = True
            logger.info("the %s export of %s waits for the one already running to finish", data_type, window.label)
        time.sleep(WINDOW_WAIT_POLL_SECONDS)
    try:
        yield
    finally:
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", [key])
        except Exception:
            logger.exception("could not release the advisory lock of the %s export of %s", data_type, window.label)


def _run_lock_key(run_pk: int) -> str:
    return f"export_run:{run_pk}"


def _run_lock(run_pk: int) -> None:
    """Take the session advisory lock named after a run, in the transaction that makes its row
    running (a session lock outlives the commit): a later run of the window can tell a run whose
    process died (its session, and so the lock, is gone) from one still working (`_dead_runs`)."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", [_run_lock_key(run_pk)])


def _run_unlock(run_pk: int) -> None:
    if connection.vendor != "postgresql":
        return
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", [_run_lock_key(run_pk)])
    except Exception:
        logger.exception("could not release the advisory lock of export run %s", run_pk)


@contextmanager
def _run_alive(run: ExportRun) -> Iterator[None]:
    """Release the run's lock (`_run_lock`, taken already) once it has exported."""
    try:
        yield
    finally:
        _run_unlock(run.pk)


def _dead_runs(run_ids: list[int]) -> list[int]:
    """The runs among `run_ids` whose process is gone: nobody holds their lock (taken here for
    the rest of the transaction). Elsewhere than PostgreSQL, all of them."""
    if connection.vendor != "postgresql" or not run_ids:
        return run_ids
    dead = []
    with connection.cursor() as cursor:
        for pk in run_ids:
            cursor.execute("SELECT pg_try_advisory_xact_lock(hashtextextended(%s, 0))", [_run_lock_key(pk)])
            if cursor.fetchone()[0]:
                dead.append(pk)
    return dead


def _execute(
    run: ExportRun,
    *,
    exporter: Exporter | ChatExporter,
    window: Window,
    directory: Path,
    progress: Callable[[int], None] | None,
    alone: AbstractContextManager[None] | None = None,
) -> ExportRun:
    """Write the files of a running row and record the outcome with its event (the run's lock
    held until then: a running row without it is taken for lost, export_runs_sweep). `alone`:
    the window's lock (`_window_alone`) when the caller has not taken it yet, waited for here."""
    with _run_alive(run):
        try:
            with alone or nullcontext():
                manifest = _write(exporter, window, directory, run.format, progress)
                return _record_success(run, window=window, directory=directory, manifest=manifest)
        except BaseException as exc:
            if process_stopping(exc):
                # Recorded as export_runs_sweep records a run whose process is gone, not as the
                # SystemExit or database error the stop showed up as here; briefly, on a connection
                # the stop may have left busy: the sweep records it if this cannot.
                stopping_write(f"the stop of export run {run.pk}", lambda: _fail([run.pk], error=RUN_STOPPED_ERROR))
                stop_raised(exc)  # as the stop, not as the database error it may have become
            try:
                _fail([run.pk], error=f"{type(exc).__name__}: {exc}")
            except Exception:
                # The original error is the one to report (a lost database takes both down).
                logger.exception("could not record export run %s as failed", run.pk)
            raise


def _record_success(run: ExportRun, *, window: Window, directory: Path, manifest: Manifest) -> ExportRun:
    same_window = {
        "data_type": run.data_type,
        "format": run.format,
        "window_start": window.start,
        "window_end": window.end,
    }
    with transaction.atomic():
        status = ExportRun.objects.select_for_update().filter(pk=run.pk).values_list("status", flat=True).first()
        if status != ExportRun.Status.RUNNING:
            # A run of this window that started later finished first and recorded this one
            # interrupted; it wrote the same files. That record stands.
            logger.warning("export run %s finished after a later run of its window; left %s", run.pk, status)
            return ExportRun.objects.get(pk=run.pk)
        # Earlier runs of this window still marked running were killed mid-write (a crash
        # leaves no other trace): record what happened to them. Locking them first waits for
        # one that is just finishing, so that its success is superseded below, not doubled.
        # Only runs whose process is gone: one still working finishes on its own and supersedes
        # this one then (both write the same files).
        interrupted = _dead_runs(
            list(
                ExportRun.objects.select_for_update()
                .filter(**same_window, status=ExportRun.Status.RUNNING, started_at__lt=run.started_at)
                .exclude(pk=run.pk)
                .order_by("pk")
                .values_list("pk", flat=True)
            )
        )
        _fail(interrupted, error=f"interrupted before it finished; export run {run.pk} completed this window")
        ExportRun.objects.select_for_update().filter(**same_window, status=ExportRun.Status.SUCCEEDED).update(
            status=ExportRun.Status.SUPERSEDED
        )
        run.status = ExportRun.Status.SUCCEEDED
        run.path = str(directory / manifest.file)
        run.rows = manifest.rows
        run.bytes = manifest.bytes
        run.checksum = manifest.sha256
        run.watermark = manifest.watermark
        run.finished_at = database_now()
        run.save(
            update_fields=["status", "path", "rows", "bytes", "checksum", "watermark", "finished_at", "updated_at"]
        )
        _event_completed(run)
    logger.info("exported %s %s: %d rows to %s", run.data_type, window.label, manifest.rows, run.path)
    return run


def _write(
    exporter: Exporter | ChatExporter,
    window: Window,
    directory: Path,
    fmt: str,
    progress: Callable[[int], None] | None,
) -> Manifest:
    name = data_file_name(exporter.data_type)
    # One snapshot for the count, the watermark and the rows: REPEATABLE READ when this
    # function owns the transaction (inside an outer one, e.g. a test's, it reads that one's).
    owns_transaction = not connection.in_atomic_block
    staged: list = []
    keys_staged: list = []
    try:
        with transaction.atomic():
            if owns_transaction and connection.vendor == "postgresql":
                with connection.cursor() as cursor:
                    cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    # Named for window_check_closed, which need not wait for it: a read-only
                    # transaction adds no row to any window (a long backfill would hold off
                    # every other export, the daily one too). Reset when it ends.
                    cursor.execute("SELECT set_config('application_name', %s, true)", [EXPORT_SESSION_NAME])
            expected = exporter.count(window.start, window.end)
            watermark = exporter.watermark(window.start, window.end)
            rows = 0
            with (
                staged_writer(directory / name) as (writer, staged),
                _keys_writer(exporter, directory) as (keys_writer, keys_staged),
            ):
                for lines in _line_batches(exporter, window):
                    writer.write(b"".join(lines))  # one write and one hash update per chunk
                    if keys_writer is not None:
                        # The keys of exactly these lines: the exporter made them as it yielded them.
                        keys_writer.write(b"".join(exporter.keys_lines))
                        exporter.keys_lines.clear()
                    rows += len(lines)
                    if progress is not None:
                        progress(len(lines))
                skipped = dict(getattr(exporter, "skipped", {}))
                if rows + sum(skipped.values()) != expected:
                    raise RuntimeError(
                        f"wrote {rows} rows (+{sum(skipped.values())} skipped) but the window has {expected}"
                    )
        manifest = Manifest(
            data_type=exporter.data_type,
            format=fmt,
            schema_version=SCHEMA_VERSION,
            window_start=window.start,
            window_end=window.end,
            file=name,
            rows=rows,
            bytes=writer.bytes,
            sha256=writer.sha256,
            watermark=watermark,
            skipped=skipped,
            legacy_prompt=getattr(exporter, "legacy_prompt", None),
            left_out=dict(getattr(exporter, "left_out", {})),
            columns=getattr(exporter, "record_columns", None),
            keys_file=(
                None
                if keys_writer is None
                else KeysFile(path=exporter.keys_file, bytes=keys_writer.bytes, sha256=keys_writer.sha256)
            ),
        )
        staged += keys_staged
        # Every file is complete and fsynced before any is renamed into place: a failure (a full
        # disk) leaves no data file without its card and manifest, nor a new one beside old ones.
        staged.append(stage_bytes(directory / "README.md", dataset_card(manifest)))
        staged.append(stage_bytes(directory / MANIFEST_NAME, manifest.encode()))
        commit(staged)
    except BaseException:
        for item in [*staged, *keys_staged]:
            item.discard()
        raise
    return manifest


@contextmanager
def _keys_writer(exporter: Exporter | ChatExporter, directory: Path) -> Iterator[tuple[HashingWriter | None, list]]:
    """The staged writer of the exporter's keys file (the conversations'), or None."""
    name = getattr(exporter, "keys_file", None)
    if name is None:
        yield None, []
        return
    with staged_writer(directory / name) as (writer, staged):
        yield writer, staged


def _line_batches(exporter: Exporter | ChatExporter, window: Window) -> Iterator[list[bytes]]:
    """The exporter's lines in order, in lists: an Exporter's chunks, or for the chat exporter
    (which builds its examples one by one, each a whole conversation) runs of lines bounded in
    count and bytes, so that memory stays bounded however long the conversations are."""
    if isinstance(exporter, Exporter):
        return exporter.line_batches(window.start, window.end)
    return _bounded_batches(exporter.lines(window.start, window.end))


def _bounded_batches(
    lines: Iterator[bytes], *, max_lines: int = PROGRESS_EVERY, max_bytes: int = 1 << 20
) -> Iterator[list[bytes]]:
    batch: list[bytes] = []
    size = 0
    for line in lines:
        batch.append(line)
        size += len(line)
        if len(batch) >= max_lines or size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def export_runs_for_window(
    *,
    data_types: list[str],
    start_date: str | dt.date,
    end_date: str | dt.date,
    output_dir: Path | str | None = None,
    force: bool = False,
    requested_by_id: int | None = None,
    progress: Callable[[int], None] | None = None,
    time_limit_seconds: int | None = None,
) -> list[ExportRun]:
    """Export several data types for one window (validated up front: nothing is written when
    one type or the window is bad)."""
    for data_type in data_types:
        exporter_for(data_type)
    window_for(start_date, end_date)
    return [
        export_run(
            data_type=data_type,
            start_date=start_date,
            end_date=end_date,
            output_dir=output_dir,
            force=force,
            requested_by_id=requested_by_id,
            progress=progress,
            time_limit_seconds=time_limit_seconds,
        )
        for data_type in data_types
    ]


def export_previous_day(
    *, now: dt.datetime | None = None, time_limit_seconds: int | None = None, final_try: bool = False
) -> list[ExportRun]:
    """The daily beat export: every data type for the previous UTC day, and the days a type
    missed before it (`_days_missed`), oldest first: a night whose export gave up, because a
    long transaction (a backup's snapshot, a report) held the window open past every retry, is
    exported the next night instead of never. A window still open raises WindowNotClosed; on
    the `final_try` each export it stops is first recorded failed, with the reason, so that the
    admin, the API and the metrics show the missing day."""
    with _daily_export_alone() as alone:
        if not alone:
            # Two beats send the entry twice, or a retry of last night's export still runs: the
            # other one exports these windows; a day it leaves out is caught up the next night.
            logger.warning("another daily export is running: this one is skipped")
            return []
        return _export_days(now=now, time_limit_seconds=time_limit_seconds, final_try=final_try)


# The session-level advisory lock that lets one daily export run at a time.
DAILY_EXPORT_LOCK = "training_export.export_previous_day"


@contextmanager
def _daily_export_alone() -> Iterator[bool]:
    """Whether this is the only daily export running (PostgreSQL; SQLite runs one process)."""
    if connection.vendor != "postgresql":
        yield True
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", [DAILY_EXPORT_LOCK])
        alone = bool(cursor.fetchone()[0])
    try:
        yield alone
    finally:
        if alone:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", [DAILY_EXPORT_LOCK])


def _export_days(*, now: dt.datetime | None, time_limit_seconds: int | None, final_try: bool) -> list[ExportRun]:
    # The database's day, the one that stamps the rows (a beat host's clock a little behind it
    # past midnight took the day before yesterday for yesterday, and yesterday waited a night).
    yesterday = (now or database_now()).astimezone(dt.UTC).date() - dt.timedelta(days=1)
    pending = [(day, data_type) for data_type in DATA_TYPES for day in _days_missed(data_type, yesterday)]
    pending += [(yesterday, data_type) for data_type in DATA_TYPES]
    pending.sort(key=lambda item: (item[0], DATA_TYPES.index(item[1])))
    runs = []
    failures: list[Exception] = []
    for index, (day, data_type) in enumerate(pending):
        try:
            runs.append(
                export_run(data_type=data_type, start_date=day, end_date=day, time_limit_seconds=time_limit_seconds)
            )
        except WindowNotClosed as exc:
            if final_try:
                _record_gave_up(pending[index:], error=str(exc))
            raise
        except Exception as exc:
            # A stop, even one that Django's atomic() replaced with the error of the connection it
            # left busy (a terminate signal in a COMMIT), ends the catch-up: the process was told
            # to stop, and every later day would only fail at once on that connection.
            stop_raised(exc)
            # Recorded failed with its event by export_run; the other days and types go on (a day
            # that fails on its own would otherwise stop every night of the catch-up).
            logger.exception("the daily export of %s for %s failed", data_type, day)
            failures.append(exc)
    if failures:
        raise failures[0]
    return runs


def _days_missed(data_type: str, yesterday: dt.date) -> list[dt.date]:
    """The days before `yesterday`, at most TRAINING_EXPORT_CATCHUP_DAYS back, that no succeeded
    export of a one-day window holds (by the beat, by hand or through the API), after the type's
    first such day: the nights the beat was away, and a day whose export failed on its own in a
    catch-up that exported the later days. A type never exported day by day (a new deployment)
    missed nothing."""
    first = yesterday - dt.timedelta(days=settings.TRAINING_EXPORT_CATCHUP_DAYS)
    return days_not_exported(data_type, since=first, before=yesterday) or []


def _one_day_runs(data_type: str) -> QuerySet[ExportRun]:
    return ExportRun.objects.filter(
        data_type=data_type,
        format=format_for(data_type),
        status=ExportRun.Status.SUCCEEDED,
        window_end=F("window_start") + dt.timedelta(days=1),
    )


def days_not_exported(data_type: str, *, since: dt.date, before: dt.date) -> list[dt.date] | None:
    """The days in [since, before) after the type's first exported day (see `last_exported_day`)
    that no succeeded export of a one-day window holds; None when the type has none."""
    runs = _one_day_runs(data_type)
    earliest = runs.aggregate(first=Min("window_start"))["first"]
    if earliest is None:
        return None
    start = max(since, earliest.astimezone(dt.UTC).date() + dt.timedelta(days=1))
    if start >= before:
        return []
    exported = {
        value.astimezone(dt.UTC).date()
        for value in runs.filter(
            window_start__gte=dt.datetime.combine(start, dt.time(), tzinfo=dt.UTC),
            window_start__lt=dt.datetime.combine(before, dt.time(), tzinfo=dt.UTC),
        ).values_list("window_start", flat=True)
    }
    days = (start + dt.timedelta(days=n) for n in range((before - start).days))
    return [day for day in days if day not in exported]


def last_exported_day(data_type: str, *, before: dt.date | None = None) -> dt.date | None:
    """The last day (before `before`, if given) of the type that a succeeded export of a one-day
    window holds (by the beat, by hand or through the API); None when there is none."""
    runs = _one_day_runs(data_type)
    if before is not None:
        runs = runs.filter(window_start__lt=dt.datetime.combine(before, dt.time(), tzinfo=dt.UTC))
    last = runs.aggregate(last=Max("window_start"))["last"]
    return None if last is None else last.astimezone(dt.UTC).date()


def _record_gave_up(pending: list[tuple[dt.date, str]], *, error: str) -> None:
    """Record the daily exports the last try could not run as failed runs, each with its
    export_failed event."""
    now = database_now()
    rows = []
    for day, data_type in pending:
        window = window_for(day, day)
        try:
            with transaction.atomic():
                run = ExportRun.objects.create(
                    data_type=data_type,
                    format=format_for(data_type),
                    window_start=window.start,
                    window_end=window.end,
                    status=ExportRun.Status.PENDING,
                    schema_version=SCHEMA_VERSION,
                    started_at=now,
                )
        except IntegrityError:
            continue  # a run of the window is queued already (the API): its own task records it
        rows.append(run.pk)
    _fail(rows, error=f"the daily export gave up: {error}", expected=(ExportRun.Status.PENDING,))


def _deadline(started: dt.datetime, time_limit_seconds: int | None) -> dt.datetime | None:
    if time_limit_seconds is None:
        return None
    return started + dt.timedelta(seconds=time_limit_seconds + EXPORT_LOST_GRACE_SECONDS)


@dataclass(frozen=True)
class ExportRequest:
    """What `export_runs_request` did per data type: rows queued for a worker, and windows
    already exported (their succeeded rows, returned instead of exporting again)."""

    queued: list[ExportRun]
    already_exported: list[ExportRun]

    @property
    def runs(self) -> list[ExportRun]:
        return sorted([*self.queued, *self.already_exported], key=lambda run: DATA_TYPES.index(run.data_type))


def export_runs_request(
    *,
    data_types: list[str],
    start_date: str | dt.date,
    end_date: str | dt.date,
    force: bool = False,
    requested_by_id: int | None = None,
) -> ExportRequest:
    """Queue exports of a closed window: a pending export_runs row per data type and, after
    commit, a task for each on the `low` queue. A type whose window was already exported and
    whose files are intact is not queued again (its succeeded row is returned) unless `force`.
    Everything is checked first: a bad type or date, or a window not closed yet, raises
    ExportError (WindowNotClosed) and nothing is recorded."""
    for data_type in data_types:
        exporter_for(data_type)
    window = window_for(start_date, end_date)
    window_check_closed(window)
    already_exported: list[ExportRun] = []
    to_queue: list[str] = []
    # Files are hashed before the transaction, which then only inserts (on SQLite it holds
    # the one write lock).
    for data_type in dict.fromkeys(data_types):
        previous = None
        if not force:
            directory = _export_dir(None, data_type, window)
            previous = _previous_intact(
                data_type=data_type, fmt=format_for(data_type), window=window, directory=directory
            )
        if previous is not None:
            already_exported.append(previous)
        else:
            to_queue.append(data_type)
    with transaction.atomic():
        queued = []
        run_ids = []
        # In one order for every request: two requests waiting on each other's pending row
        # (the unique constraint) in opposite orders would deadlock.
        for data_type in sorted(to_queue, key=DATA_TYPES.index):
            run, created = _pending_run(data_type=data_type, window=window, requested_by_id=requested_by_id)
            queued.append(run)
            if created:
                run_ids.append(run.pk)
        if run_ids:
            transaction.on_commit(lambda: _enqueue(run_ids))
    return ExportRequest(queued=queued, already_exported=already_exported)


def _pending_run(*, data_type: str, window: Window, requested_by_id: int | None) -> tuple[ExportRun, bool]:
    """The window's pending run of this type, and whether it was created now: a request for a
    window already waiting for a worker gets that run (its message exists, or the sweeper
    sends it again), not a second one. Two requests racing meet at the unique constraint
    `export_runs_one_pending_per_window`: the loser takes the winner's row, or creates its own
    when a worker claimed that row meanwhile."""
    fields = {
        "data_type": data_type,
        "format": format_for(data_type),
        "window_start": window.start,
        "window_end": window.end,
    }
    for _ in range(3):
        existing = ExportRun.objects.filter(**fields, status=ExportRun.Status.PENDING).order_by("pk").first()
        if existing is not None:
            return existing, False
        # A run exporting the window right now (its process alive) gives what a new one would:
        # a second one would only write the same files beside it.
        running = list(
            ExportRun.objects.filter(**fields, status=ExportRun.Status.RUNNING)
            .order_by("-pk")
            .values_list("pk", flat=True)
        )
        alive = [pk for pk in running if pk not in set(_dead_runs(running))]
        if connection.vendor == "postgresql" and alive:
            return ExportRun.objects.get(pk=alive[0]), False
        try:
            with transaction.atomic():  # a savepoint: the request's transaction goes on after a conflict
                run = ExportRun.objects.create(
                    **fields, status=ExportRun.Status.PENDING, requested_by_id=requested_by_id
                )
            return run, True
        except IntegrityError as exc:
            constraint = getattr(getattr(exc.__cause__, "diag", None), "constraint_name", None)
            if constraint not in (None, "export_runs_one_pending_per_window"):
                raise  # another constraint (SQLite names none): not a race
            continue  # another request created it: take it on the next turn
    raise TransitionError(f"could not queue the {data_type} export of {window.label}: requests kept racing for it")


def _enqueue(run_ids: list[int]) -> None:
    """Send the committed pending runs' tasks. With the broker down the runs stand, pending,
    and the export sweep sends them again: the caller (an API request) is not failed for it."""
    from orchestration.services.dispatch import BROKER_DOWN, queues_declare
    from training_export.tasks import export_run_task

    try:
        with export_run_task.app.producer_or_acquire() as producer:
            # Declared as a workflow's queues are: Celery's own declaration, retried, moved only
            # the queue to a new connection, and the message then failed on the closed channel.
            queues_declare(export_run_task.app, producer, ["low"])
            for run_id in run_ids:
                export_run_task.apply_async(
                    args=[run_id], queue="low", routing_key="low", producer=producer, declare=[]
                )
    except BROKER_DOWN as exc:
        logger.error(
            "broker unreachable (%s: %s): %d export run(s) not queued, the export sweep queues them: %s",
            type(exc).__name__,
            exc,
            len(run_ids),
            ", ".join(str(run_id) for run_id in run_ids),
        )


@dataclass(frozen=True)
class ExportSweep:
    requeued: list[int]
    lost: list[int]


def export_runs_sweep(*, now: dt.datetime | None = None) -> ExportSweep:
    """Runs whose message is gone (beat, every few minutes; safe to run concurrently).

    Export tasks are acknowledged when they start (a long export must not be redelivered to a
    second worker), so a crash can leave a row behind:
    - `pending` with no sign of life for longer than any message can wait unacknowledged
      (broker visibility timeout plus the retry countdown): its message was lost before a
      worker started it. It is queued again; a duplicate message is harmless, the first
      delivery claims the row and the other finds it taken.
    - `running` past its deadline (the hard time limit of the worker running it plus a grace;
      runs from manage.py have none), or, on PostgreSQL, whose process is gone (nobody holds
      its lock, `_run_lock`: a killed worker, a stopped or killed manage.py): the worker was
      killed or lost. It is recorded failed with its export_failed event; its temporary file is
      removed by retention. A process that is stopped (not killed) records its run so itself,
      with the same error (RUN_STOPPED_ERROR), as it stops.

    Times are the database's (`now`, by default its clock, and the runs' deadline_at): a sweeping
    host whose clock ran ahead recorded live runs lost. (A pending row's first updated_at is its
    INSERT's time on the database's clock too, as is each later touch.)
    """
    now = now or database_now()
    pending_before = now - dt.timedelta(
        seconds=settings.BROKER_VISIBILITY_TIMEOUT_SECONDS + EXPORT_RETRY_COUNTDOWN_SECONDS + EXPORT_LOST_GRACE_SECONDS
    )
    with transaction.atomic():  # the locks `_dead_runs` takes are held until the runs are recorded
        running = dict(ExportRun.objects.filter(status=ExportRun.Status.RUNNING).values_list("pk", "deadline_at"))
        past_deadline = sorted(pk for pk, deadline in running.items() if deadline is not None and deadline < now)
        lost = _fail(
            past_deadline,
            error=(
                f"lost: no outcome recorded by its deadline (the worker's time limit plus "
                f"{EXPORT_LOST_GRACE_SECONDS} s); the worker running it was killed or lost"
            ),
        )
        if connection.vendor == "postgresql":
            gone = _dead_runs(sorted(set(running) - set(past_deadline)))
            lost += _fail(
                gone,
                error=RUN_STOPPED_ERROR,
            )
    with transaction.atomic():
        stale_pending = list(
            ExportRun.objects.select_for_update(skip_locked=True)
            .filter(status=ExportRun.Status.PENDING, updated_at__lt=pending_before)
            .order_by("pk")
            .values_list("pk", flat=True)
        )
        if stale_pending:
            # Touched, so a concurrent or the next sweep leaves them alone while they wait.
            ExportRun.objects.filter(pk__in=stale_pending, status=ExportRun.Status.PENDING).update(updated_at=now)
            transaction.on_commit(lambda: _enqueue(stale_pending))
    if lost or stale_pending:
        logger.warning("export runs swept: %d queued again, %d lost", len(stale_pending), len(lost))
    return ExportSweep(requeued=stale_pending, lost=lost)


@dataclass(frozen=True)
class ExportDownload:
    file: BinaryIO  # open at its start; the caller closes it
    sha256: bytes
    filename: str


def run_days(run: ExportRun) -> tuple[dt.date, dt.date]:
    """The first and last UTC day of a run's window (both included)."""
    return run.window_start.astimezone(dt.UTC).date(), (run.window_end.astimezone(dt.UTC) - dt.timedelta(days=1)).date()


def export_file_open(*, run: ExportRun, file: str = "data") -> ExportDownload:
    """A file of a succeeded run (DOWNLOAD_FILES: its data file, or a conversations export's keys
    file), open and checked against the sha256 recorded for it: the run's own for the data file,
    the manifest's for the keys file once the manifest is shown to be the run's (its data file's
    sha256 is the run's). The open file is the one checked, even if its path is replaced meanwhile.

    Raises TransitionError for a run that has not succeeded (or was superseded), ExportFileNone
    for a file the run does not have, and ExportFileGone for a file that is missing or changed
    (export the window again with force)."""
    if run.status != ExportRun.Status.SUCCEEDED:
        detail = f"export run {run.pk} is {run.status}; only a succeeded run can be downloaded"
        if run.status == ExportRun.Status.SUPERSEDED:
            detail += " (a later run of the same window replaced it: download that one)"
        raise TransitionError(detail)
    first, last = run_days(run)
    if file == "keys":
        (path, checksum), what = _keys_file(run), "keys file"
        filename = f"{run.data_type}_{first}_{last}-keys.jsonl"
    else:
        path, checksum, what = Path(run.path), run.checksum, "data file"
        filename = f"{run.data_type}_{first}_{last}.jsonl"
    try:
        fh = open(path, "rb")  # noqa: SIM115  (returned open)
    except OSError:
        raise ExportFileGone(
            f"the {what} of export run {run.pk} is missing; export the window again with force"
        ) from None
    try:
        digest = sha256_stream(fh)
        fh.seek(0)
    except BaseException:
        fh.close()
        raise
    if digest.hexdigest() != checksum:
        fh.close()
        raise ExportFileGone(
            f"the {what} of export run {run.pk} no longer matches the sha256 it recorded; export the "
            "window again with force"
        )
    return ExportDownload(file=fh, sha256=digest.digest(), filename=filename)


def _keys_file(run: ExportRun) -> tuple[Path, str]:
    """The path and sha256 of a conversations run's keys file, from its manifest (the run's own:
    it names the run's data file with the run's sha256)."""
    if run.data_type != "conversations":
        raise ExportFileNone(f"export run {run.pk} is of {run.data_type}: only a conversations export has a keys file")
    directory = Path(run.path).parent
    try:
        manifest = manifest_read(directory)
        files = manifest["files"]
        data = files[0]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        raise ExportFileGone(
            f"the manifest of export run {run.pk} is missing or unreadable; export the window again with force"
        ) from None
    if not isinstance(data, dict) or data.get("sha256") != run.checksum:
        raise ExportFileGone(
            f"the manifest of export run {run.pk} is not the run's (another export wrote it); export the window "
            "again with force"
        )
    keys = next((f for f in files if isinstance(f, dict) and f.get("keys_of") == data.get("path")), None)
    if keys is None or not isinstance(keys.get("path"), str) or not isinstance(keys.get("sha256"), str):
        raise ExportFileNone(
            f"export run {run.pk} was written before keys files were; export the window again with force for one"
        )
    return directory / Path(keys["path"]).name, keys["sha256"]
