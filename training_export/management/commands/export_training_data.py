import datetime as dt
import sys
from typing import Any

from django.core.management.base import CommandError, CommandParser
from tqdm import tqdm

from orchestration.db import database_now
from orchestration.management.arguments import DatabaseCommand, text
from training_export.models import ExportRun
from training_export.services.export import (
    DATA_TYPES,
    ExportError,
    export_runs_for_window,
    parse_day,
    window_check_closed,
    window_for,
)


class Command(DatabaseCommand):
    help = (
        "Export training data from the database to JSONL for the UTC days --start..--end (both included). "
        "Only closed windows are exported; a window already exported is kept unless --force."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--type", required=True, choices=[*DATA_TYPES, "all"], dest="data_type")
        parser.add_argument("--start", required=True, help="first UTC day, YYYY-MM-DD")
        parser.add_argument("--end", required=True, help="last UTC day, YYYY-MM-DD (included)")
        parser.add_argument("--output", type=text, help="directory to write to (default: TRAINING_EXPORT_DIR)")
        parser.add_argument("--force", action="store_true", help="export again even if the window was exported")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")

    def handle(self, *args: Any, **options: Any) -> None:
        data_types = list(DATA_TYPES) if options["data_type"] == "all" else [options["data_type"]]
        start, end = self._days(options["start"], options["end"])
        try:
            # Here, before the progress bar is drawn: the refusal is all that is printed. (The
            # export checks it again; a window closed once stays closed.)
            window_check_closed(window_for(start, end))
        except ExportError as exc:
            raise CommandError(str(exc)) from exc
        # On the database's clock, as the runs' finished_at: a run finished before this one began
        # was already there.
        began = database_now()
        bar = tqdm(
            unit="rows",
            file=sys.stderr,
            disable=options["no_progress"] or options["verbosity"] == 0,
            dynamic_ncols=True,
        )
        try:
            runs = export_runs_for_window(
                data_types=data_types,
                start_date=start,
                end_date=end,
                output_dir=options["output"],
                force=options["force"],
                progress=bar.update,
            )
        except ExportError as exc:
            raise CommandError(str(exc)) from exc
        except OSError as exc:  # --output not a writable directory, a full disk: the run is recorded failed
            raise CommandError(f"cannot write the export: {exc}") from exc
        finally:
            bar.close()
        failed = [run for run in runs if run.status != ExportRun.Status.SUCCEEDED]
        for run in runs:
            if run not in failed:
                # A window exported before, with its files intact, is returned as it was.
                kept = ""
                if run.finished_at < began:
                    kept = f" (already exported by run {run.pk}; --force exports it again)"
                self.stdout.write(f"{run.data_type}: {run.rows} rows, sha256 {run.checksum}, {run.path}{kept}")
        if failed:
            raise CommandError(
                "; ".join(f"{run.data_type}: export run {run.pk} is {run.status}: {run.error or ''}" for run in failed)
            )

    def _days(self, start: str, end: str) -> tuple[dt.date, dt.date]:
        """--start and --end, checked here so that errors name the options, not the service's
        arguments."""
        try:
            first, last = parse_day(start, name="--start"), parse_day(end, name="--end")
        except ExportError as exc:
            raise CommandError(str(exc)) from exc
        if last < first:
            raise CommandError(f"--end {last} is before --start {first}")
        if last >= dt.date.max:
            raise CommandError(
                f"--end {last}: the last day that can be exported is {dt.date.max - dt.timedelta(days=1)}"
            )
        return first, last
