import time

from django.core.management.base import BaseCommand

from orchestration.services.relay import events_relay


class Command(BaseCommand):
    help = "Publish committed events to the Synapse stream in order (once, or continuously with --follow)."

    def add_arguments(self, parser):
        parser.add_argument("--follow", action="store_true", help="keep relaying until interrupted")
        parser.add_argument("--interval", type=float, default=0.5, help="seconds between polls with --follow")

    def handle(self, *args, **options):
        while True:
            result = events_relay()
            if result.published or not options["follow"]:
                gap = f"  waiting on uncommitted sequence {result.waiting_on_gap}" if result.waiting_on_gap else ""
                self.stdout.write(f"published {result.published}; stream at sequence {result.last_sequence}{gap}")
            if not options["follow"]:
                return
            time.sleep(options["interval"])
