"""Celery's soft time limit, held off while an attempt is claimed and while its outcome is
recorded, so that it interrupts only the agent.

In a prefork pool child, billiard delivers the soft limit as a signal (billiard.pool.
SIG_SOFT_TIMEOUT: SIGUSR1) whose handler raises SoftTimeLimitExceeded wherever Python is.
Landing in the claim, it rolled the claim back (the task then waited for the sweeper) or,
interrupting a statement psycopg leaves in flight, let it commit unseen (an attempt running
with no agent, for the reaper). Landing in the COMMIT of an outcome, the outcome was
committed but the messages to send after it (dependents made ready, a retry) were not.

attempt_run therefore runs in `soft_limit_held()` and lets the limit through only around the
agent (`released()`). A limit that fires while held is noted: raised as the agent would start
(the claim committed, the try has run out of time), or dropped once the attempt's outcome is
recorded (nothing is left to interrupt).

Held by a handler of our own in place of billiard's, which raises only while released, not
by blocking the signal (pthread_sigmask): the kernel delivers a process-directed signal that
the main thread blocks to any other thread that does not (an InfluxDB writer's, an agent's),
and Python then runs the handler in the main thread all the same. Setting a handler first
runs the handler of a signal already received, so none falls between the two.

The hard limit is unaffected: billiard's main process ends the child with SIGTERM, then
SIGKILL, which nothing here touches; the reaper records the attempt (DESIGN §5).

Inside released(), the platform's own writes for the agent (its meter's UPDATE of what a model
billed, a tool call's or a hand-off's record) are held off too (`held_off()`): interrupted in
a statement, psycopg leaves it in flight on the connection, which then refuses the attempt's
record ("connection in transaction status ACTIVE"), and the attempt stayed running for the
reaper, its spend possibly lost. A limit that fires in one is raised as it ends.

Nothing is held where SIGUSR1 is not billiard's soft limit: in the worker's main process it
is Celery's "cry" handler; a task run in-process (tests), the solo and threads pools have no
such signal; gevent and eventlet raise the limit from a timer in the greenlet. There a soft
limit still lands where it lands (execution._record_through_soft_limit covers the recording).
"""

from __future__ import annotations

# The C functions under signal.signal() and signal.getsignal(): those wrappers convert a
# function handler through the Handlers enum, raising and catching two exceptions per call
# (7 µs against 0.2 µs, on every attempt).
import _signal
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from billiard.pool import SIG_SOFT_TIMEOUT, soft_timeout_sighandler
from celery.exceptions import SoftTimeLimitExceeded

logger = logging.getLogger(__name__)

_agent_running: SoftLimit | None = None
"""The limit whose released() the main thread is in (the agent runs), for held_off()."""


class SoftLimit:
    """The soft limit of one delivery, inside soft_limit_held(). `holding` is False where
    nothing can be held (see the module's docstring): released() then does nothing."""

    def __init__(self, *, holding: bool) -> None:
        self.holding = holding
        self.pending = False
        self._released = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._released:
            raise SoftTimeLimitExceeded()
        self.pending = True

    @contextmanager
    def released(self) -> Iterator[None]:
        """Let the soft limit interrupt what runs inside; one that fired while it was held
        is raised on entry."""
        global _agent_running
        if not self.holding:
            yield
            return
        self._released = True
        _agent_running = self
        try:
            self.raise_if_pending()  # read once released: from there on, the handler raises itself
            yield
        finally:
            self._released = False
            _agent_running = None

    def raise_if_pending(self) -> None:
        """Raise the limit that fired while it was held, once."""
        if self.pending:
            self.pending = False
            raise SoftTimeLimitExceeded()


@contextmanager
def held_off() -> Iterator[None]:
    """Hold the soft limit off around a write the platform makes while an agent runs (see the
    module's docstring); one that fires meanwhile is raised once the write is done, in the
    agent's run, as if it had fired just after. Anywhere else (nothing released, another
    thread, a pool that cannot hold) it does nothing."""
    limit = _agent_running
    if limit is None or not limit._released or threading.current_thread() is not threading.main_thread():
        yield
        return
    limit._released = False
    stopping = False
    try:
        yield
    except (SystemExit, KeyboardInterrupt):
        # The process is stopping (a cancel's SIGTERM: billiard's handler): raised here, the limit
        # would replace that, and the try be recorded timed out instead of the process stopping.
        stopping = True
        raise
    finally:
        limit._released = True
        if not stopping:
            limit.raise_if_pending()  # the time is up, whatever the write did


@contextmanager
def soft_limit_held() -> Iterator[SoftLimit]:
    """Hold the soft limit off inside, except within the yielded SoftLimit's released().
    A limit still pending at the end is dropped (logged): what it would have interrupted
    has ended."""
    if (
        SIG_SOFT_TIMEOUT is None
        or threading.current_thread() is not threading.main_thread()
        or _signal.getsignal(SIG_SOFT_TIMEOUT) is not soft_timeout_sighandler
    ):
        yield SoftLimit(holding=False)
        return
    limit = SoftLimit(holding=True)
    _signal.signal(SIG_SOFT_TIMEOUT, limit._handle)
    try:
        yield limit
    finally:
        _signal.signal(SIG_SOFT_TIMEOUT, soft_timeout_sighandler)
        if limit.pending:
            logger.warning("the soft time limit fired outside the agent's run, while held off: nothing interrupted")
