import signal
import sys
import time
from pathlib import Path

from django.conf import settings
from django.core.management.base import CommandError
from django.utils import timezone

from orchestration.errors import SpecError
from orchestration.management.arguments import DatabaseCommand, seconds
from orchestration.management.stopping import INTERRUPTED, StopRequest, stop_on_signals
from orchestration.models import TaskExecution, Workflow
from orchestration.services.specs import spec_parse
from orchestration.services.workflows import workflow_submit

BAR = 20
SYMBOL = {
    "pending": " ",
    "queued": ".",
    "running": ">",
    "retrying": "~",
    "completed": "#",
    "failed": "x",
    "timed_out": "t",
    "cancelled": "-",
}


class Command(DatabaseCommand):
    help = "Submit a workflow spec (JSON or YAML) and print its id; with --wait, follow it until it ends."

    def add_arguments(self, parser):
        parser.add_argument("file", help="workflow spec, .json or .yaml/.yml ('-' reads JSON from stdin)")
        parser.add_argument("--wait", action="store_true", help="show progress until the workflow ends")
        parser.add_argument(
            "--timeout", type=seconds(), help="seconds to wait at most with --wait (default: until the workflow ends)"
        )

    def handle(self, *args, **options):
        if options["timeout"] is not None and not options["wait"]:
            # Before anything is submitted: without --wait it limited nothing, and said nothing.
            raise CommandError("--timeout is how long --wait waits: give --wait too")
        source = options["file"]
        shown = "stdin" if source == "-" else source
        # At most the API's limit on a request body: a bigger file was read whole (gigabytes of
        # memory for a few hundred megabytes of spec) and then refused by PostgreSQL with a
        # traceback (no jsonb string exceeds 256 MB).
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        try:
            if source == "-":
                data, fmt = sys.stdin.buffer.read(limit + 1), "json"
            else:
                path = Path(source)
                if not path.is_file():
                    raise CommandError(f"{source}: {'not a file' if path.exists() else 'no such file'}")
                fmt = "json" if path.suffix == ".json" else "yaml" if path.suffix in (".yaml", ".yml") else None
                if fmt is None:
                    raise CommandError(f"{source}: use a .json, .yaml or .yml file")
                with path.open("rb") as file:
                    data = file.read(limit + 1)
            if len(data) > limit:
                raise CommandError(
                    f"{shown}: larger than {limit} bytes, the most a spec may have (MAX_REQUEST_BODY_BYTES)"
                )
            # Decoded here, not by stdin's text layer: its error handler (surrogateescape in the
            # C and C.UTF-8 locales) read bytes that are not UTF-8 as lone surrogates, which the
            # spec's checks then named as "an unpaired UTF-16 surrogate" in some field.
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CommandError(f"{shown}: cannot be read: {exc}") from None
        # ^C or SIGTERM while the workflow is stored is heeded once its id is printed: it was a
        # KeyboardInterrupt's traceback or a silent end, and one after the commit lost the id of
        # a workflow that runs. Under --wait it stops the waiting, not the workflow: said in one
        # line, as a wait that gives up is.
        with stop_on_signals() as stop:
            try:
                workflow, created = workflow_submit(spec=spec_parse(text, fmt=fmt), initiator="manage.py")
            except SpecError as exc:
                raise CommandError("invalid workflow spec:\n  " + "\n  ".join(exc.listed)) from None
            self.stdout.write(
                workflow.workflow_id if created else f"{workflow.workflow_id} (existing, same idempotency key)"
            )
            if options["wait"]:
                final = self._poll(workflow.workflow_id, options["timeout"], stop)
                if final != Workflow.Status.COMPLETED:
                    raise CommandError(f"workflow {workflow.workflow_id} ended {final}")
            elif stop.is_set():
                raise CommandError(
                    f"stopped: workflow {workflow.workflow_id} was stored before the stop and goes on",
                    returncode=_stopped_status(stop),
                )

    def _poll(self, workflow_id: str, timeout: float | None, stop: StopRequest) -> str:
        deadline = None if timeout is None else time.monotonic() + timeout
        tty = self.stdout.isatty()
        lines = 0
        seen: dict[str, tuple[str, int]] = {}  # not on a terminal: each task's last state printed
        while True:
            workflow = Workflow.objects.get(pk=workflow_id)
            tasks = list(TaskExecution.objects.filter(workflow_id=workflow_id).order_by("created_at", "task_name"))
            rows = [self._row(t) for t in tasks]
            header = f"{workflow.name} [{workflow.status}] {workflow.completed_steps}/{workflow.total_steps}"
            timed_out = deadline is not None and time.monotonic() > deadline and not workflow.is_terminal
            stopped = stop.is_set() and not workflow.is_terminal
            if tty and lines:
                self.stdout.write(f"\x1b[{lines}F", ending="")
            if not tty:
                # A log (CI, a pipe) gets a line per change of a task's state instead of redrawn bars.
                for task in tasks:
                    state = (task.status, task.retry_count)
                    if seen.get(task.task_name) != state:
                        seen[task.task_name] = state
                        self.stdout.write(self._change(task))
            if tty or workflow.is_terminal or timed_out or stopped:
                self.stdout.write("\n".join([header, *rows]))
                lines = len(rows) + 1
            if workflow.is_terminal:
                if workflow.error:
                    self.stdout.write(f"error: {workflow.error}")
                return workflow.status
            if timed_out:
                raise CommandError(f"workflow {workflow_id} still {workflow.status} after {timeout:.0f} s")
            if stopped:
                raise CommandError(
                    f"stopped waiting: workflow {workflow_id} is still {workflow.status} and goes on "
                    f"(manage.py workflow_status {workflow_id} shows it)",
                    returncode=_stopped_status(stop),
                )
            time.sleep(0.5)  # a stop asked for meanwhile is seen at the next look

    @staticmethod
    def _change(task: TaskExecution) -> str:
        at = timezone.localtime().strftime("%H:%M:%S")
        return f"{at} {task.task_name} {task.status} (retries {task.retry_count}/{task.max_retries})"

    @staticmethod
    def _row(task: TaskExecution) -> str:
        filled = BAR if task.is_terminal else BAR // 2 if task.status == "running" else 0
        bar = SYMBOL.get(task.status, "?") * filled + " " * (BAR - filled)
        return f"  [{bar}] {task.task_name:<24} {task.status:<10} retries {task.retry_count}/{task.max_retries}"


def _stopped_status(stop: StopRequest) -> int:
    """^C's status, not 1: a script running this command in a loop stopped at ^C before, by the
    KeyboardInterrupt; with 1 it went on to submit the next spec."""
    return INTERRUPTED if stop.signum == signal.SIGINT else 1
