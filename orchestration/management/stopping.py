"""Stopping a long-running command between two pieces of work on SIGTERM/SIGINT.

A signal handler runs in the main thread between two bytecodes of whatever it interrupts,
and again, nested, for a signal that arrives while it runs: it must take no lock the code it
interrupts may hold. threading.Event takes one in set() and holds it for moments in wait(): a
`consume_events --processes` child sent SIGTERM twice at once (by its supervisor, to the
process group, and by its parent) waited in its nested handler for the lock the first one
held, for ever, and `relay_events --follow`, waiting between polls, could do the same on a
single SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

# The status of a command that ^C stopped, as shells give it: manage.py ends a command that
# exits with it by SIGINT itself, which is what tells a shell running a script to stop too.
INTERRUPTED = 128 + signal.SIGINT


class StopRequest:
    """A stop asked for by a signal handler (set), seen between pieces of work (is_set) and
    ending a wait at once (wait). No lock: a flag, and a byte written to a pipe of its own that
    the wait selects on (a signal interrupting the select runs the handler, which makes the
    pipe readable, before the select goes on)."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None  # the signal that asked, if one did
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def set(self, signum: int | None = None) -> None:
        self.requested = True
        self.signum = self.signum or signum  # the first: ^C then SIGTERM was still a ^C
        with contextlib.suppress(BlockingIOError, OSError):  # full: a wake-up is pending; closed: over
            os.write(self._write, b"\0")

    def is_set(self) -> bool:
        return self.requested

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds or until set(); whether a stop was asked for."""
        if not self.requested:
            select.select([self._read], [], [], timeout)
        return self.requested

    def close(self) -> None:
        for fd in (self._read, self._write):
            with contextlib.suppress(OSError):
                os.close(fd)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Turn SIGTERM/SIGINT into a stop request for the duration, then unblock them: a forked
    consumer starts with them blocked, so that one sent before this point waits here instead
    of killing it mid-batch. The previous handlers and mask are restored on the way out."""
    stop = StopRequest()
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set(signum)) for sig in STOP_SIGNALS}
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        yield stop
    finally:
        # Mask first: in a forked consumer the handler underneath is the parent's.
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop.close()
