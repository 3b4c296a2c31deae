"""Holding Celery's soft time limit off (orchestration.soft_limit), in this process made to
look like a prefork pool child: billiard's soft-limit handler on SIGUSR1, which is sent to
the process as billiard's main process sends it. Another thread runs meanwhile, as an
InfluxDB writer's or an agent's may in a pool child: blocking the signal in the main thread
(pthread_sigmask) would not hold it off then, since the kernel delivers it to that thread
and Python runs the handler in the main thread all the same."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
from billiard.pool import soft_timeout_sighandler
from celery.exceptions import SoftTimeLimitExceeded

from orchestration.soft_limit import held_off, soft_limit_held


@pytest.fixture
def pool_child() -> Iterator[None]:
    previous = signal.signal(signal.SIGUSR1, soft_timeout_sighandler)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        yield
    finally:
        stop.set()
        other.join()
        signal.signal(signal.SIGUSR1, previous)


def soft_limit() -> None:
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.1)  # a wait the signal interrupts: the handler has run once it is over


def test_a_limit_that_fires_while_held_is_raised_where_it_is_released(pool_child):
    with soft_limit_held() as limit:
        soft_limit()
        assert limit.pending
        with pytest.raises(SoftTimeLimitExceeded), limit.released():
            pytest.fail("the pending limit is raised on entry")
        assert not limit.pending
    assert signal.getsignal(signal.SIGUSR1) is soft_timeout_sighandler


def test_a_limit_while_released_interrupts_at_once(pool_child):
    with soft_limit_held() as limit:
        with pytest.raises(SoftTimeLimitExceeded), limit.released():
            soft_limit()
            pytest.fail("the limit interrupts what runs released")
        soft_limit()  # held again after the release: noted, not raised
        assert limit.pending
        limit.pending = False
    assert signal.getsignal(signal.SIGUSR1) is soft_timeout_sighandler


def test_a_limit_still_pending_at_the_end_of_the_hold_is_dropped(pool_child, caplog):
    with caplog.at_level(logging.WARNING, logger="orchestration.soft_limit"), soft_limit_held():
        soft_limit()
    assert "soft time limit fired outside the agent's run" in caplog.text
    assert signal.getsignal(signal.SIGUSR1) is soft_timeout_sighandler


def test_nothing_is_held_where_sigusr1_is_not_the_soft_limit():
    """In the worker's main process SIGUSR1 is Celery's 'cry' handler (stack dumps); in a task
    run in-process it is the default. Neither is replaced."""

    def cry(signum, frame):
        raise AssertionError("not this one")

    previous = signal.signal(signal.SIGUSR1, cry)
    try:
        with soft_limit_held() as limit:
            assert not limit.holding and signal.getsignal(signal.SIGUSR1) is cry
            with limit.released():
                assert signal.getsignal(signal.SIGUSR1) is cry
        assert signal.getsignal(signal.SIGUSR1) is cry
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_nothing_is_held_off_the_main_thread(pool_child):
    """Python runs signal handlers in the main thread only, and only the main thread may set
    them: a task run on another thread (the threads pool) holds nothing."""
    seen = []

    def run():
        with soft_limit_held() as limit:
            seen.append(limit.holding)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == [False]
    assert signal.getsignal(signal.SIGUSR1) is soft_timeout_sighandler


def test_a_limit_held_off_in_a_write_is_raised_as_the_write_ends(pool_child):
    with soft_limit_held() as limit:
        with pytest.raises(SoftTimeLimitExceeded) as raised, limit.released(), held_off():
            soft_limit()
            assert limit.pending  # held off: the write goes on
            raise ValueError("the write failed")
        assert isinstance(raised.value.__context__, ValueError)
        assert not limit.pending


def test_a_process_stopping_in_a_held_write_is_not_replaced_by_the_limit(pool_child):
    """A cancel's SIGTERM (billiard's handler raises SystemExit) that lands in a write the limit
    waits for: the process stops. Raised from the write's end, the limit replaced the SystemExit:
    the engine took the try for the agent's time-out and recorded it, instead of stopping."""
    with soft_limit_held() as limit:
        with pytest.raises(SystemExit), limit.released(), held_off():
            soft_limit()
            raise SystemExit(-15)
        limit.pending = False
