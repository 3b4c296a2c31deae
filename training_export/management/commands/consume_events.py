import gc
import multiprocessing
import signal
import sys
import threading
from multiprocessing.connection import wait
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections

from training_export.services.store import TrainingDataStore
from training_export.services.synapse import (
    BatchResult,
    SynapseConsumer,
    default_consumer_name,
    synapse_consumer_client,
)

MAX_PROCESSES = 64


class Command(BaseCommand):
    help = (
        "Consume the Synapse event stream (Redis consumer group) into the daily training-data CSV files. "
        "Runs until SIGTERM/SIGINT, or with --once until nothing is left."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--group", default="training", help="consumer group (default: training)")
        parser.add_argument(
            "--consumer",
            help="consumer name (default: hostname-pid, unique per process); with --processes, "
            "each process adds -1, -2, ... to it",
        )
        parser.add_argument("--batch", type=int, default=2000, help="entries per read (default: 2000)")
        parser.add_argument("--block-ms", type=int, default=2000, help="wait for new entries this long per read")
        parser.add_argument(
            "--claim-idle-ms",
            type=int,
            default=60_000,
            help="claim entries another consumer left unacknowledged this long (default: 60000)",
        )
        parser.add_argument(
            "--processes",
            type=int,
            default=1,
            help="consumers of the group to run, one process each (default: 1)",
        )
        parser.add_argument("--once", action="store_true", help="process pending, claimable and new entries, then exit")

    def handle(self, *args: Any, **options: Any) -> None:
        if not 1 <= options["batch"] <= 10_000:
            raise CommandError("--batch must be between 1 and 10000")
        if options["block_ms"] < 1:
            raise CommandError("--block-ms must be at least 1 (Redis reads BLOCK 0 as 'forever')")
        if options["claim_idle_ms"] < 0:
            raise CommandError("--claim-idle-ms must not be negative")
        if not 1 <= options["processes"] <= MAX_PROCESSES:
            raise CommandError(f"--processes must be between 1 and {MAX_PROCESSES}")
        if not settings.REDIS_URL:
            raise CommandError("the Synapse stream needs Redis: set REDIS_URL")

        if options["processes"] == 1:
            self.consume(options, options["consumer"] or default_consumer_name())
        else:
            self.consume_in_processes(options)

    def consume_in_processes(self, options: dict[str, Any]) -> None:
        """Run `--processes` consumers of the group, one forked process each, and wait for them.

        They share nothing but the group and the files: Redis hands each entry to one of them,
        and the store's file lock and event_id dedupe hold across processes (an entry claimed
        from a sibling, or delivered again, is still written once). A consumer that fails stops
        the others, and the command fails, so that a supervisor restarts the whole set; the
        entries it left pending are read again by name or claimed once idle."""
        base = options["consumer"]
        connections.close_all()  # a forked child must open its own database connection
        sys.stdout.flush()
        sys.stderr.flush()
        self.stdout.flush()
        context = multiprocessing.get_context("fork")
        children = [
            context.Process(
                target=self.consume_child,
                args=(options, f"{base}-{number}" if base else None),
                name=f"consume_events-{number}",
            )
            for number in range(1, options["processes"] + 1)
        ]
        for child in children:
            child.start()

        def stop_children(signum: int = signal.SIGTERM, frame: Any = None) -> None:
            for child in children:
                if child.is_alive() and child.pid is not None:
                    child.terminate()  # SIGTERM: the child finishes its batch and leaves the group

        previous = {sig: signal.signal(sig, stop_children) for sig in (signal.SIGTERM, signal.SIGINT)}
        failed = []
        try:
            running = list(children)
            while running:
                wait([child.sentinel for child in running])
                for child in [child for child in running if not child.is_alive()]:
                    running.remove(child)
                    child.join()
                    if child.exitcode != 0:
                        failed.append(f"{child.name} exited with {child.exitcode}")
                        stop_children()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if failed:
            raise CommandError("; ".join(failed))

    def consume_child(self, options: dict[str, Any], name: str | None) -> None:
        try:
            self.consume(options, name or default_consumer_name())
        finally:
            self.stdout.flush()

    def consume(self, options: dict[str, Any], name: str) -> BatchResult:
        """One consumer in this process, until the stream is drained (--once) or SIGTERM/SIGINT."""
        consumer = SynapseConsumer(
            client=synapse_consumer_client(block_ms=options["block_ms"]),
            store=TrainingDataStore(settings.TRAINING_DATA_DIR),
            stream=settings.SYNAPSE_STREAM,
            group=options["group"],
            consumer=name,
            batch=options["batch"],
            claim_idle_ms=options["claim_idle_ms"],
        )
        verbosity = options["verbosity"]
        # Everything loaded so far lives as long as the process: keep the cyclic collector
        # from rescanning it (it cost 10-15 % of the consumer's CPU).
        gc.freeze()

        def on_batch(result: BatchResult) -> None:
            if verbosity >= 2:
                self.stdout.write(f"batch: {result.summary()}")

        if options["once"]:
            total = consumer.run(once=True, on_batch=on_batch)
        else:
            stop = threading.Event()
            previous = {
                sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)
            }
            try:
                if verbosity >= 1:
                    self.stdout.write(f"consumer {name} of group {options['group']} on {settings.SYNAPSE_STREAM}")
                total = consumer.run(
                    once=False, block_ms=options["block_ms"], should_stop=stop.is_set, on_batch=on_batch
                )
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        if verbosity >= 1:
            self.stdout.write(f"consumer {name} done: {total.summary()}")
        return total
