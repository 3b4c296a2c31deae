"""How the reaper tells a hard time-out from lost work, from what the attempt recorded and its
worker node answered (the real workers: test_engine.py)."""

from __future__ import annotations

import datetime as dt

import pytest

from orchestration.models import TaskAttempt
from orchestration.services.dispatch import hard_limit_seconds
from orchestration.services.reaper import attempt_verdict
from orchestration.workers import (
    BROKER_CONNECTION_LOST,
    DATABASE_CONNECTION_LOST,
    DATABASE_ERROR,
    HARD_TIMEOUT,
    POOL_PROCESS_LOST,
    Ending,
    NodeReport,
    node_report,
)

NODE = "celery@host"
STARTED = dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC)
TASK_ID = "5b0c6a3e-task"
LIMIT = hard_limit_seconds(60)


def attempt(**fields: object) -> TaskAttempt:
    recorded = {"worker_pid": 7, "worker_started_at": STARTED, "pool_pid": 11}
    return TaskAttempt(worker=NODE, celery_task_id=TASK_ID, timeout_seconds=60, **{**recorded, **fields})


def answer(pid: int | None = 7, started_at: dt.datetime | None = STARTED, **ended: Ending) -> dict:
    return {NODE: [NodeReport(pid=pid, started_at=started_at, ended=ended)]}


def verdict(a: TaskAttempt, answers: dict) -> tuple[bool, str]:
    v = attempt_verdict(a, answers)
    return v.hard_timeout, v.error


def test_a_silent_node_lost_the_attempt():
    assert verdict(attempt(), {}) == (
        False,
        f"worker {NODE} stopped answering; attempt abandoned past its {LIMIT} s limit",
    )


@pytest.mark.parametrize("pid", [9, 7], ids=["new-pid", "pid-reused"])
def test_another_process_answering_for_the_name_lost_the_attempt(pid):
    """Restarted under the same name, in a container often with the same pid: its start time differs."""
    later = STARTED + dt.timedelta(minutes=3)
    assert verdict(attempt(), answer(pid=pid, started_at=later)) == (
        False,
        f"worker {NODE} was restarted: the process that ran the attempt (pid 7, started 2026-01-02 03:04:05 UTC) "
        f"is gone, pid {pid} answers now; attempt abandoned past its {LIMIT} s limit",
    )


def test_the_same_process_that_killed_its_pool_process_at_the_limit_timed_it_out():
    killed = Ending(how=HARD_TIMEOUT, pool_pid=11, detail="hard time limit 61 s")
    assert verdict(attempt(), answer(**{TASK_ID: killed})) == (
        True,
        f"hard time limit of {LIMIT} s exceeded (worker {NODE} killed its pool process 11)",
    )


def test_the_same_process_whose_pool_process_died_lost_the_attempt():
    died = Ending(how=POOL_PROCESS_LOST, pool_pid=11, detail="Worker exited prematurely: signal 9 (SIGKILL) Job: 0.")
    hard_timeout, error = verdict(attempt(), answer(**{TASK_ID: died}))
    assert not hard_timeout
    assert error.startswith(f"pool process 11 of worker {NODE} died (Worker exited prematurely: signal 9 (SIGKILL)")


def test_the_same_process_that_stopped_the_attempt_for_a_lost_broker_connection_lost_it_to_redelivery():
    """Celery's worker_cancel_long_running_tasks_on_connection_loss: the worker lives on; the
    message, never acknowledged, comes back from the broker. Not a hard time-out."""
    stopped = Ending(how=BROKER_CONNECTION_LOST, pool_pid=11, detail="stopped when the broker connection was lost")
    v = attempt_verdict(attempt(), answer(**{TASK_ID: stopped}))
    assert (v.hard_timeout, v.cause) == (False, TaskAttempt.Cause.REDELIVERY)
    assert v.error.startswith(f"worker {NODE} lost its broker connection and stopped the attempt (pool process 11)")


@pytest.mark.parametrize("pool_pid", [11, 12], ids=["its-delivery", "a-later-delivery"])
def test_a_message_sent_again_for_a_lost_database_connection_lost_the_attempt(pool_pid):
    """run_task sent the message again (its database connection broke) from the delivery that
    ran the attempt: not a hard time-out. Whichever pool process the worker names (a later
    delivery that started no attempt leaves the memory as it was: tests/orchestration/
    test_engine_sent_again.py)."""
    sent_again = Ending(how=DATABASE_CONNECTION_LOST, pool_pid=pool_pid, detail="lost its database connection")
    v = attempt_verdict(attempt(attempt_number=1), answer(**{TASK_ID: sent_again}))
    assert (v.hard_timeout, v.cause) == (False, TaskAttempt.Cause.CONNECTION_LOST)
    assert v.error == (
        f"worker {NODE} lost its database connection during attempt 1 (message sent again, not yet back); "
        f"attempt abandoned past its {LIMIT} s limit"
    )


def test_a_message_sent_again_for_a_database_error_lost_the_attempt_to_that_error():
    """run_task sent the message again because the database answered a write with an error (a
    lock timeout), its connection up: the attempt is lost to that error, not to a lost connection."""
    sent_again = Ending(
        how=DATABASE_ERROR,
        pool_pid=11,
        detail="LockNotAvailable: canceling statement due to lock timeout",
        error_class="psycopg.errors.LockNotAvailable",
    )
    v = attempt_verdict(attempt(attempt_number=1), answer(**{TASK_ID: sent_again}))
    assert (v.hard_timeout, v.cause, v.error_class) == (
        False,
        TaskAttempt.Cause.DATABASE_ERROR,
        "psycopg.errors.LockNotAvailable",
    )
    assert v.error == (
        f"worker {NODE} met a database error during attempt 1, which was not recorded (message sent again, not "
        "yet back): LockNotAvailable: canceling statement due to lock timeout; "
        f"attempt abandoned past its {LIMIT} s limit"
    )


@pytest.mark.parametrize(
    ("recorded", "answered"),
    [
        ({"worker_pid": None, "worker_started_at": None, "pool_pid": None}, answer()),
        ({}, {NODE: [node_report({"error": "KeyError('agentledger_process')"})]}),
        ({}, answer()),
        ({}, answer(**{TASK_ID: Ending(how=POOL_PROCESS_LOST, pool_pid=12, detail="an earlier delivery")})),
    ],
    ids=["attempt-from-before", "worker-from-before", "ending-forgotten", "ending-of-another-delivery"],
)
def test_a_live_worker_that_cannot_say_more_is_presumed_to_have_hit_the_hard_limit(recorded, answered):
    assert verdict(attempt(**recorded), answered) == (True, f"hard time limit of {LIMIT} s exceeded (process killed)")


def test_a_reply_is_read_with_its_start_time_to_the_microsecond():
    report = node_report(
        {
            "pid": 7,
            "started_at": STARTED.isoformat(),
            "ended": {TASK_ID: {"how": HARD_TIMEOUT, "pool_pid": 11, "detail": "hard time limit 61 s"}},
        }
    )
    assert report == NodeReport(
        pid=7, started_at=STARTED, ended={TASK_ID: Ending(how=HARD_TIMEOUT, pool_pid=11, detail="hard time limit 61 s")}
    )
    assert node_report({"pid": "x", "started_at": "not a time"}) == NodeReport(pid=None, started_at=None, ended={})


def test_a_process_that_exited_is_told_from_a_live_one_zombie_included():
    """What the worker's main process checks when the hard limit of a task comes: is the pool
    process still there to kill, or had it died under the task (a zombie until reaped)."""
    import os
    import time

    from orchestration.workers import process_exited

    assert not process_exited(os.getpid())
    assert not process_exited(None)
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        for _ in range(200):  # the child exits at once; not yet reaped, it is a zombie
            if process_exited(pid):
                break
            time.sleep(0.01)
        assert process_exited(pid)
    finally:
        os.waitpid(pid, 0)
    assert process_exited(pid)  # reaped: gone


@pytest.mark.parametrize("pool_pid", [11, 12], ids=["its-delivery", "a-later-delivery"])
def test_a_redelivered_message_once_sent_again_for_a_lost_database_connection_lost_the_attempt_to_it(pool_pid):
    """The claim of a redelivered message asks the attempt's worker too (services/redelivery.py),
    and takes its word before its own rule for a message run_task sent again: when the worker
    says a delivery of the message lost its database connection, that is the cause, as the
    reaper records it (not a redelivery of a try the worker stopped)."""
    from orchestration.services.redelivery import previous_try_verdict

    sent_again = Ending(how=DATABASE_CONNECTION_LOST, pool_pid=pool_pid, detail="lost its database connection")
    answers = {NODE: [NodeReport(pid=7, started_at=STARTED, ended={TASK_ID: sent_again}, running={})]}
    v = previous_try_verdict(attempt(attempt_number=1), answers, process=None)
    assert v is not None and not v.running
    assert (v.status, v.cause) == (TaskAttempt.Status.LOST, TaskAttempt.Cause.CONNECTION_LOST)
    assert v.error == f"worker {NODE} lost its database connection during attempt 1 (message sent again)"


def test_a_redelivered_message_once_sent_again_for_a_database_error_lost_the_attempt_to_that_error():
    from orchestration.services.redelivery import previous_try_verdict

    sent_again = Ending(
        how=DATABASE_ERROR,
        pool_pid=11,
        detail="DiskFull: could not extend file",
        error_class="psycopg.errors.DiskFull",
    )
    answers = {NODE: [NodeReport(pid=7, started_at=STARTED, ended={TASK_ID: sent_again}, running={})]}
    v = previous_try_verdict(attempt(attempt_number=1), answers, process=None)
    assert v is not None and not v.running
    assert (v.status, v.cause, v.error_class) == (
        TaskAttempt.Status.LOST,
        TaskAttempt.Cause.DATABASE_ERROR,
        "psycopg.errors.DiskFull",
    )
    assert v.error == (
        f"worker {NODE} met a database error during attempt 1, which was not recorded (message sent again): "
        "DiskFull: could not extend file"
    )
