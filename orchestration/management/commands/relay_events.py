import contextlib

from orchestration.management.arguments import DatabaseCommand, seconds, synapse_reachable
from orchestration.management.stopping import stop_on_signals
from orchestration.services.relay import events_relay


class Command(DatabaseCommand):
    help = (
        "Publish committed events to the Synapse stream in order (once, or continuously with --follow "
        "until SIGTERM/SIGINT, which end it after the pass under way)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--follow", action="store_true", help="keep relaying until interrupted")
        parser.add_argument(
            "--interval", type=seconds(zero=True), default=0.5, help="seconds between polls with --follow (default 0.5)"
        )

    def handle(self, *args, **options):
        with stop_on_signals() if options["follow"] else contextlib.nullcontext() as stop:
            while True:
                with synapse_reachable():
                    result = events_relay()
                if result.published or not options["follow"]:
                    gap = f"  waiting on uncommitted sequence {result.waiting_on_gap}" if result.waiting_on_gap else ""
                    self.stdout.write(f"published {result.published}; stream at sequence {result.last_sequence}{gap}")
                if stop is None or stop.wait(options["interval"]):
                    return
