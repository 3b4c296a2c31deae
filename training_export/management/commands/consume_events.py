import contextlib
import ctypes
import gc
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterator
from multiprocessing.connection import wait
from typing import Any

from django.conf import settings
from django.core.management.base import CommandError, CommandParser
from django.db import OperationalError, ProgrammingError, connections

from orchestration.management.arguments import DatabaseCommand, database_problem, synapse_reachable, text
from orchestration.management.stopping import STOP_SIGNALS, stop_on_signals
from training_export.services.store import TrainingDataStore
from training_export.services.synapse import (
    BatchResult,
    SynapseConsumer,
    default_consumer_name,
    synapse_consumer_client,
)

MAX_PROCESSES = 64
MAX_BLOCK_MS = 60_000
MAX_CLAIM_IDLE_MS = 30 * 24 * 3600 * 1000  # 30 days
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def ask_for_sigterm_when_parent_dies() -> None:
    """Linux only, best effort: have the kernel send SIGTERM to this process when its parent
    dies (even by SIGKILL). Elsewhere the consumer still notices the new parent between batches."""
    if not sys.platform.startswith("linux"):
        return
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # libc's, already loaded
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def _files_writable() -> Iterator[None]:
    """A file the consumer cannot write (a full disk, a read-only volume) stops it with one line
    naming the file and the cause; what it wrote and did not acknowledge is read again on restart."""
    try:
        yield
    except BrokenPipeError:
        # The reader of the consumer's own output left (a log collector restarted): ended as
        # manage.py ends any command then, not named as the files' fault (no file is a pipe).
        raise
    except OSError as exc:
        raise CommandError(f"cannot write the training data: {exc}") from exc


class Command(DatabaseCommand):
    help = (
        "Consume the Synapse event stream (Redis consumer group) into the daily training-data CSV files. "
        "Runs until SIGTERM/SIGINT, or with --once until nothing is left."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--group", type=text, default="training", help="consumer group (default: training)")
        parser.add_argument(
            "--consumer",
            type=text,
            help="consumer name (default: hostname-pid, unique per process); with --processes, "
            "each process adds -1, -2, ... to it",
        )
        parser.add_argument("--batch", type=int, default=500, help="entries per read (default: 500)")
        parser.add_argument(
            "--block-ms",
            type=int,
            default=2000,
            help=f"wait for new entries this long per read, at most {MAX_BLOCK_MS} (default: 2000); a stop "
            "request waits for the read under way",
        )
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
        if not 1 <= options["block_ms"] <= MAX_BLOCK_MS:
            raise CommandError(
                f"--block-ms must be between 1 (Redis reads BLOCK 0 as 'forever') and {MAX_BLOCK_MS} (a stop waits "
                "for the read under way)"
            )
        if not 0 <= options["claim_idle_ms"] <= MAX_CLAIM_IDLE_MS:
            raise CommandError(f"--claim-idle-ms must be between 0 and {MAX_CLAIM_IDLE_MS} (30 days)")
        if not options["group"].strip():
            raise CommandError("--group must not be blank")
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
                args=(options, f"{base}-{number}" if base else None, os.getpid()),
                name=f"consume_events-{number}",
            )
            for number in range(1, options["processes"] + 1)
        ]

        def stop_children(signum: int = signal.SIGTERM, frame: Any = None) -> None:
            for child in children:
                if child.pid is not None and child.is_alive():
                    child.terminate()  # SIGTERM: the child finishes its batch and leaves the group

        # A stop signal that arrives while the children are being started waits until they all
        # are (and the handler is in place), so that none is left running without its parent.
        # The children start with the signals blocked too, until their own handlers are in place.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        previous = {sig: signal.signal(sig, stop_children) for sig in STOP_SIGNALS}
        failed = []
        try:
            try:
                for child in children:
                    child.start()
            except BaseException:  # a fork failed: the ones started must not run on alone
                stop_children()
                raise
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
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

    def consume_child(self, options: dict[str, Any], name: str | None, parent: int) -> None:
        """A forked consumer. It stops when its parent is gone (a SIGKILLed parent leaves it
        to init): a restarted command would otherwise run next to it, two live processes
        could share a consumer name, and one's DELCONSUMER drop entries the other holds."""
        ask_for_sigterm_when_parent_dies()
        if os.getppid() != parent:  # died before the request above took effect
            return

        def orphaned() -> bool:
            return os.getppid() != parent

        try:
            self.consume(options, name or default_consumer_name(), also_stop_if=orphaned)
        except (CommandError, OperationalError, ProgrammingError) as exc:
            # As the command itself says it (DatabaseCommand), in one line, not multiprocessing's
            # traceback: the database or the stream went away (a restart, a failover).
            problem = str(exc) if isinstance(exc, CommandError) else database_problem(exc)
            if problem is None:
                raise
            self.stderr.write(f"CommandError: {problem}")
            sys.exit(1)
        except BrokenPipeError:
            # The reader of the output left: as manage.py ends a command then, without
            # multiprocessing's traceback (the parent names the exit). Nothing else here writes
            # to a pipe (Redis' and PostgreSQL's clients raise their own errors for a socket's).
            # stdout goes nowhere from here: the flush below would fail again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        finally:
            self.stdout.flush()

    def consume(
        self, options: dict[str, Any], name: str, also_stop_if: Callable[[], bool] = lambda: False
    ) -> BatchResult:
        """One consumer in this process, until the stream is drained (--once), SIGTERM/SIGINT
        or `also_stop_if()`; a stop is noticed between batches, so a batch is always finished
        and acknowledged, and the consumer leaves the group."""
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

        with stop_on_signals() as stop:

            def should_stop() -> bool:
                return stop.is_set() or also_stop_if()

            # What was written and not acknowledged is read again by name on restart.
            with synapse_reachable(), _files_writable():
                if options["once"]:
                    total = consumer.run(once=True, should_stop=should_stop, on_batch=on_batch)
                else:
                    if verbosity >= 1:
                        self.stdout.write(f"consumer {name} of group {options['group']} on {settings.SYNAPSE_STREAM}")
                    total = consumer.run(
                        once=False, block_ms=options["block_ms"], should_stop=should_stop, on_batch=on_batch
                    )
        if verbosity >= 1:
            self.stdout.write(f"consumer {name} done: {total.summary()}")
        return total
