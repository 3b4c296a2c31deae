"""A try's success written again when its write lost the database connection
(orchestration.services.execution._result_record_through_lost_connection), in-process against
the real database; the real worker's case, its session ended by the server while the agent
ran, is in test_engine.py."""

from __future__ import annotations

import time

import psycopg
import pytest
from django.db import OperationalError, connection
from django.utils import timezone

from orchestration.errors import PermanentError
from orchestration.models import Event, TaskAttempt, TaskExecution
from orchestration.runtime.context import Usage
from orchestration.services.execution import (
    RESULT_WRITE_HARD_LIMIT_MARGIN_SECONDS,
    _result_record_through_lost_connection,
    _result_write_until,
    attempt_fail,
)
from tests.orchestration.test_fastpath import _claimed, _succeed


def lost(message: str = "server closed the connection unexpectedly") -> OperationalError:
    """Django's error for a connection the server dropped, as the ORM raises it: psycopg's
    OperationalError without a SQLSTATE as its cause."""
    error = OperationalError(message)
    error.__cause__ = psycopg.OperationalError(message)
    return error


def test_a_success_whose_commit_landed_before_the_answer_was_lost_is_ours(committed):
    """The COMMIT reached the server, the connection went before its answer came back: the
    next try finds the attempt no longer running, recorded succeeded, and that is this try's
    own write, not an attempt someone else closed."""
    claim = _claimed(["a"])["a"]
    calls = []

    def record() -> bool:
        calls.append(1)
        done = _succeed(claim)
        if len(calls) == 1:
            raise lost()
        return done

    assert _result_record_through_lost_connection(record, attempt=claim.attempt) is True
    assert len(calls) == 2
    assert TaskAttempt.objects.get(pk=claim.attempt.pk).status == "succeeded"
    assert TaskExecution.objects.get(task_name="a").status == "completed"
    assert Event.objects.filter(event_type="task_completed").count() == 1


def test_an_attempt_closed_by_someone_else_meanwhile_is_not_ours(committed):
    claim = _claimed(["a"])["a"]
    calls = []

    def record() -> bool:
        calls.append(1)
        if len(calls) == 1:
            # The reaper (say) closes the attempt while this worker's connection is away.
            TaskAttempt.objects.filter(pk=claim.attempt.pk).update(
                status="lost", cause="worker_lost", finished_at=timezone.now()
            )
            raise lost()
        return _succeed(claim)

    assert _result_record_through_lost_connection(record, attempt=claim.attempt) is False
    assert TaskAttempt.objects.get(pk=claim.attempt.pk).status == "lost"


def test_an_error_the_database_answered_is_raised_at_once(committed):
    """A lock timeout is not a lost connection: run_task sends the message again, recording
    the attempt lost with that error (database_error), as before."""
    claim = _claimed(["a"])["a"]
    calls = []
    refused = OperationalError("canceling statement due to lock timeout")
    refused.__cause__ = psycopg.errors.LockNotAvailable("canceling statement due to lock timeout")

    def record() -> bool:
        calls.append(1)
        raise refused

    with pytest.raises(OperationalError, match="lock timeout"):
        _result_record_through_lost_connection(record, attempt=claim.attempt)
    assert len(calls) == 1


def test_a_connection_still_lost_after_the_retry_window_is_raised(committed, settings):
    settings.TASK_RESULT_WRITE_RETRY_SECONDS = 1
    claim = _claimed(["a"])["a"]
    calls = []

    def record() -> bool:
        calls.append(1)
        raise lost("connection refused")

    with pytest.raises(OperationalError, match="connection refused"):
        _result_record_through_lost_connection(record, attempt=claim.attempt)
    # Tried again after 0.25 s and 0.5 s; the next wait (1 s) would have passed the second.
    assert len(calls) == 3
    assert TaskAttempt.objects.get(pk=claim.attempt.pk).status == "running"


def test_no_try_is_begun_that_could_end_past_the_hard_time_limit(committed, settings):
    """The hard limit comes before TASK_RESULT_WRITE_RETRY_SECONDS ends: a try is begun only
    while it could end there, its connection refused after the connect timeout at worst, with
    the margin to spare (for run_task to send the message again before the pool kills the
    process)."""
    settings.TASK_RESULT_WRITE_RETRY_SECONDS = 10
    claim = _claimed(["a"])["a"]
    calls = []

    def record() -> bool:
        calls.append(1)
        raise lost("connection refused")

    connect_timeout = connection.settings_dict["OPTIONS"]["connect_timeout"]
    hard_limit_at = time.monotonic() + connect_timeout + RESULT_WRITE_HARD_LIMIT_MARGIN_SECONDS + 0.5
    with pytest.raises(OperationalError, match="connection refused"):
        _result_record_through_lost_connection(record, attempt=claim.attempt, until=_result_write_until(hard_limit_at))
    # Tried again after 0.25 s; the next try, 0.5 s later, could have ended past the margin.
    assert len(calls) == 2


def test_a_failure_whose_commit_landed_before_the_answer_was_lost_is_ours(committed):
    """As a success's: the failure's COMMIT reached the server, its answer did not come back;
    the next try finds the attempt recorded failed (error), as only this delivery records it."""
    claim = _claimed(["a"], continue_on_failure=True)["a"]
    calls = []

    def record() -> bool:
        calls.append(1)
        done = attempt_fail(
            attempt=claim.attempt, exc=PermanentError("refused"), duration_ms=2.5, now=timezone.now(), usage=Usage()
        )
        if len(calls) == 1:
            raise lost()
        return done

    recorded_as = {"status": "failed", "cause": "error"}
    assert _result_record_through_lost_connection(record, attempt=claim.attempt, recorded_as=recorded_as) is True
    assert len(calls) == 2
    attempt = TaskAttempt.objects.get(pk=claim.attempt.pk)
    assert (attempt.status, attempt.error) == ("failed", "PermanentError: refused")
    assert Event.objects.filter(event_type="task_failed").count() == 1
