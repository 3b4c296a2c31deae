"""JSONL exports of closed windows, recorded in export_runs.

`export_run` exports one data type for the UTC days start_date..end_date (both included, so
the window is [start_date 00:00, end_date + 1 day 00:00)). It writes, in
`<output>/<data_type>/<start_date>_<end_date>/`:

- `<data_type>-train.jsonl`, streamed from the database, written atomically (services/files.py);
- `README.md`, a dataset card `datasets.load_dataset(<dir>)` understands;
- `manifest.json` (rows, sha256, schema version, watermark), written last.

Only closed windows are exported. A window is closed when its end lies at least
TRAINING_EXPORT_SAFETY_LAG_SECONDS in the past and, on PostgreSQL, no transaction that began
before its end is still open in this database. Rows carry the time their transaction started
(`created_at` defaults to now(), the transaction start) or a time taken inside it, so a
transaction that began after the end cannot add rows to the window, and one that began before
it and commits late is waited for instead of missed. The check runs before the export's own
snapshot is taken, so every such transaction has ended by then and is in the snapshot.
(Sessions of other database roles are visible only with pg_read_all_stats; writers use the
application's role.) SQLite serialises writers, so there the lag alone applies.

A window already exported successfully is not written again when its files are intact;
`force=True` re-exports it, and the new run supersedes the old one. Re-running a window gives
byte-identical files.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from training_export.models import ExportRun
from training_export.services.chat import ChatExporter
from training_export.services.files import atomic_writer, sha256_file, write_bytes_atomic
from training_export.services.jsonl import EXPORTERS, SCHEMA_VERSION, Exporter
from training_export.services.manifest import MANIFEST_NAME, Manifest, data_file_name, dataset_card

logger = logging.getLogger(__name__)

CONVERSATIONS = "conversations"
DATA_TYPES = (*EXPORTERS, CONVERSATIONS)
PROGRESS_EVERY = 1000


class ExportError(ValueError):
    """An export that cannot run as asked (bad type or dates, window not closed yet)."""


class WindowNotClosed(ExportError):
    pass


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
    try:
        return dt.date.fromisoformat(str(value).strip())
    except ValueError:
        raise ExportError(f"{name}={value!r} is not a date; expected YYYY-MM-DD") from None


def window_for(start_date: str | dt.date, end_date: str | dt.date) -> Window:
    """The UTC window of the days start_date..end_date, both included."""
    first = parse_day(start_date, name="start_date")
    last = parse_day(end_date, name="end_date")
    if last < first:
        raise ExportError(f"end_date {last} is before start_date {first}")
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


def window_check_closed(window: Window, *, now: dt.datetime | None = None) -> None:
    """Raise WindowNotClosed unless no row can still be added to the window (see module doc)."""
    now = now or timezone.now()
    lag = dt.timedelta(seconds=settings.TRAINING_EXPORT_SAFETY_LAG_SECONDS)
    if window.end > now - lag:
        raise WindowNotClosed(
            f"the window {window.start.isoformat()} .. {window.end.isoformat()} is not closed yet: it can be "
            f"exported from {(window.end + lag).isoformat()} (TRAINING_EXPORT_SAFETY_LAG_SECONDS="
            f"{settings.TRAINING_EXPORT_SAFETY_LAG_SECONDS})"
        )
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        # Activity statistics are otherwise read once per transaction and then repeated.
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(
            "SELECT count(*), min(xact_start) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND backend_type = 'client backend' AND xact_start < %s",
            [window.end],
        )
        open_count, oldest = cursor.fetchone()
    if open_count:
        raise WindowNotClosed(
            f"the window {window.start.isoformat()} .. {window.end.isoformat()} is not closed yet: {open_count} "
            f"transaction(s) that began before its end (the oldest at {oldest.isoformat()}) are still open and "
            "may still commit rows into it; try again when they have ended"
        )


def _export_dir(output_dir: Path | str | None, data_type: str, window: Window) -> Path:
    root = Path(output_dir) if output_dir else Path(settings.TRAINING_EXPORT_DIR)
    return root / data_type / window.label


def _intact(run: ExportRun) -> bool:
    path = Path(run.path)
    return path.is_file() and (path.parent / MANIFEST_NAME).is_file() and sha256_file(path) == run.checksum


def export_run(
    *,
    data_type: str,
    start_date: str | dt.date,
    end_date: str | dt.date,
    output_dir: Path | str | None = None,
    force: bool = False,
    requested_by_id: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> ExportRun:
    """Export one data type for a closed window; returns the succeeded export_runs row (an
    earlier one when the window was already exported and its files are intact)."""
    exporter = exporter_for(data_type)
    window = window_for(start_date, end_date)
    fmt = format_for(data_type)
    window_check_closed(window)
    directory = _export_dir(output_dir, data_type, window)
    previous = ExportRun.objects.filter(
        data_type=data_type,
        format=fmt,
        window_start=window.start,
        window_end=window.end,
        status=ExportRun.Status.SUCCEEDED,
    ).first()
    if previous is not None and not force and Path(previous.path).parent == directory and _intact(previous):
        return previous

    run = ExportRun.objects.create(
        data_type=data_type,
        format=fmt,
        window_start=window.start,
        window_end=window.end,
        status=ExportRun.Status.RUNNING,
        schema_version=SCHEMA_VERSION,
        requested_by_id=requested_by_id,
        started_at=timezone.now(),
    )
    try:
        manifest = _write(exporter, window, directory, fmt, progress)
    except BaseException as exc:
        ExportRun.objects.filter(pk=run.pk).update(
            status=ExportRun.Status.FAILED, error=f"{type(exc).__name__}: {exc}", finished_at=timezone.now()
        )
        raise
    with transaction.atomic():
        ExportRun.objects.select_for_update().filter(
            data_type=data_type,
            format=fmt,
            window_start=window.start,
            window_end=window.end,
            status=ExportRun.Status.SUCCEEDED,
        ).update(status=ExportRun.Status.SUPERSEDED)
        # Earlier runs of this window still marked running were killed mid-write (a crash
        # leaves no other trace): record what happened to them.
        ExportRun.objects.filter(
            data_type=data_type,
            format=fmt,
            window_start=window.start,
            window_end=window.end,
            status=ExportRun.Status.RUNNING,
            started_at__lt=run.started_at,
        ).update(
            status=ExportRun.Status.FAILED,
            error=f"interrupted before it finished; export run {run.pk} completed this window",
            finished_at=timezone.now(),
        )
        run.status = ExportRun.Status.SUCCEEDED
        run.path = str(directory / manifest.file)
        run.rows = manifest.rows
        run.bytes = manifest.bytes
        run.checksum = manifest.sha256
        run.watermark = manifest.watermark
        run.finished_at = timezone.now()
        run.save(update_fields=["status", "path", "rows", "bytes", "checksum", "watermark", "finished_at"])
    logger.info("exported %s %s: %d rows to %s", data_type, window.label, manifest.rows, run.path)
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
    with transaction.atomic():
        if owns_transaction and connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        expected = exporter.count(window.start, window.end)
        watermark = exporter.watermark(window.start, window.end)
        rows = 0
        with atomic_writer(directory / name) as writer:
            for line in exporter.lines(window.start, window.end):
                writer.write(line)
                rows += 1
                if progress is not None and rows % PROGRESS_EVERY == 0:
                    progress(PROGRESS_EVERY)
            skipped = dict(getattr(exporter, "skipped", {}))
            if rows + sum(skipped.values()) != expected:
                raise RuntimeError(
                    f"wrote {rows} rows (+{sum(skipped.values())} skipped) but the window has {expected}"
                )
    if progress is not None and rows % PROGRESS_EVERY:
        progress(rows % PROGRESS_EVERY)
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
    )
    write_bytes_atomic(directory / "README.md", dataset_card(manifest))
    write_bytes_atomic(directory / MANIFEST_NAME, manifest.encode())
    return manifest


def export_runs_for_window(
    *,
    data_types: list[str],
    start_date: str | dt.date,
    end_date: str | dt.date,
    output_dir: Path | str | None = None,
    force: bool = False,
    requested_by_id: int | None = None,
    progress: Callable[[int], None] | None = None,
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
        )
        for data_type in data_types
    ]


def export_previous_day(*, now: dt.datetime | None = None) -> list[ExportRun]:
    """The daily beat export: every data type for the previous UTC day."""
    day = (now or timezone.now()).astimezone(dt.UTC).date() - dt.timedelta(days=1)
    return export_runs_for_window(data_types=list(DATA_TYPES), start_date=day, end_date=day)
