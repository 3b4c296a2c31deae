import argparse
import math
import signal
import threading

import redis
from django.core.management.base import BaseCommand, CommandError

from orchestration.services.relay import events_relay

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _interval(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (seconds >= 0 and math.isfinite(seconds)):
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds (0 or more)")
    return seconds


class Command(BaseCommand):
    help = (
        "Publish committed events to the Synapse stream in order (once, or continuously with --follow "
        "until SIGTERM/SIGINT, which end it after the pass under way)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--follow", action="store_true", help="keep relaying until interrupted")
        parser.add_argument("--interval", type=_interval, default=0.5, help="seconds between polls with --follow")

    def handle(self, *args, **options):
        stop = threading.Event()
        previous = {}
        if options["follow"]:
            previous = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in STOP_SIGNALS}
        try:
            while True:
                try:
                    result = events_relay()
                except redis.RedisError as exc:
                    raise CommandError(f"cannot reach the Synapse stream: {type(exc).__name__}: {exc}") from None
                if result.published or not options["follow"]:
                    gap = f"  waiting on uncommitted sequence {result.waiting_on_gap}" if result.waiting_on_gap else ""
                    self.stdout.write(f"published {result.published}; stream at sequence {result.last_sequence}{gap}")
                if not options["follow"] or stop.wait(options["interval"]):
                    return
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
