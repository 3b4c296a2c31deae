"""A message run_task sent again itself (same id) after its delivery lost the database connection
or met an error the database answered a write with: what its next deliveries record of the
attempt it left running, on real workers (of this release and of the one before), PostgreSQL
and Redis."""

from __future__ import annotations

import json
import os
import signal

import pytest
import redis
from django.conf import settings
from django.db import connection, transaction

from orchestration.models import TaskAttempt, TaskExecution, Workflow
from tests.engine import RESULT_WRITE_NOT_RETRIED, database_url, wait_for
from tests.orchestration.test_engine import attempts, finished, submit, task

pytestmark = pytest.mark.django_db(transaction=True)

A = TaskAttempt.Status
PREVIOUS_RELEASE = "tests.orchestration.previous_release"


def running(workflow: Workflow, name: str, number: int) -> TaskAttempt:
    return wait_for(
        lambda: TaskAttempt.objects.filter(
            execution__workflow=workflow, execution__task_name=name, attempt_number=number, status=A.RUNNING
        ).first(),
        what=f"attempt {number} of {name} to run",
    )


def lock_waiter_terminated() -> bool:
    """Terminate the backends of this database waiting for a row lock (a worker's claim)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")  # else read once per transaction
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'"
        )
        return any(killed for (killed,) in cursor.fetchall())


def test_a_message_sent_again_for_a_database_error_runs_on_a_worker_of_the_previous_release(engine):
    """A rolling deploy: this release's worker meets a lock timeout recording the attempt and sends
    its message again, and is then stopped; a worker of the release before (its run_task takes
    the execution id only) gets the message. It runs it (not a TypeError for an argument it does
    not know, the attempt left running until the reaper's limit), closing the attempt as that
    release does: its lost connection."""
    new = engine(concurrency=1, env={"DATABASE_URL": f"{database_url()}?options=-c%20lock_timeout%3D300"})
    wf = submit({"name": "held", "agent": "sleep", "input": {"seconds": 1.5, "on_attempts": [1]}, "max_retries": 2})
    first = running(wf, "held", 1)
    with transaction.atomic():
        TaskAttempt.objects.select_for_update().get(pk=first.pk)
        wait_for(lambda: "retry: Retry in" in new.log(), timeout=15, what="run_task to send its message again")
        new.stop()  # warm: the message it holds for its countdown goes back to the queue
    old = engine(concurrency=1, app=PREVIOUS_RELEASE)
    wf = finished(wf, timeout=30)
    wait_for(lambda: "succeeded" in old.log(), timeout=10, what="the previous release's worker to log its success")
    assert "TypeError" not in old.log(), old.log()
    assert wf.status == Workflow.Status.COMPLETED
    assert [(a.attempt_number, a.status, a.cause, a.worker) for a in attempts(wf, "held")] == [
        (1, A.LOST, "connection_lost", new.name),
        (2, A.SUCCEEDED, None, old.name),
    ]


def test_keyword_arguments_of_a_later_release_are_ignored_and_logged_once(engine):
    """A message of a later release (a rolling deploy, a release rolled back) with a keyword
    argument this run_task does not know runs all the same; the argument is named in the log once."""
    from orchestration.tasks import run_task

    wf = submit({"name": "a", "agent": "echo"}, {"name": "b", "agent": "echo"})
    queued = TaskExecution.objects.filter(workflow=wf)
    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    assert broker.delete(*{t.priority for t in queued}) == 1  # the messages as the later release sends them instead:
    for t in queued:
        run_task.app.send_task(  # not apply_async, which checks the arguments against this release's
            run_task.name,
            args=[t.pk],
            kwargs={"later_option": 1},
            task_id=t.celery_task_id,
            queue=t.priority,
            routing_key=t.priority,
        )
    worker = engine(concurrency=1)
    assert finished(wf).status == Workflow.Status.COMPLETED
    assert worker.log().count("run_task ignores keyword arguments it does not know") == 1
    assert "later_option" in worker.log()


def test_each_of_two_failed_deliveries_in_a_row_keeps_its_own_cause(engine):
    """The first delivery meets a lock timeout recording attempt 1 and sends its message again; the
    second loses its connection in its claim (PostgreSQL terminates it while it waits for the
    task's row), before it closed attempt 1 or started one. Attempt 1's record says the database
    error it met, not the second delivery's lost connection, which started no attempt; so does
    the worker, asked for the reaper."""
    from orchestration.workers import workers_ask

    worker = engine(concurrency=1, env={"DATABASE_URL": f"{database_url()}?options=-c%20lock_timeout%3D2000"})
    wf = submit({"name": "held", "agent": "sleep", "input": {"seconds": 1, "on_attempts": [1]}, "max_retries": 3})
    t = task(wf, "held")
    first = running(wf, "held", 1)
    with transaction.atomic():
        TaskAttempt.objects.select_for_update().get(pk=first.pk)
        TaskExecution.objects.select_for_update().get(pk=t.pk)
        wait_for(lambda: "retry: Retry in" in worker.log(), timeout=15, what="run_task to send its message again")
        wait_for(lock_waiter_terminated, timeout=10, interval=0.05, what="the second delivery's claim to wait")
        wait_for(lambda: worker.log().count("retry: Retry in") == 2, timeout=15, what="the second retry")
    wf = finished(wf, timeout=30)
    assert wf.status == Workflow.Status.COMPLETED
    tried = attempts(wf, "held")
    assert [(a.attempt_number, a.status, a.cause) for a in tried] == [
        (1, A.LOST, "database_error"),
        (2, A.SUCCEEDED, None),
    ], tried[0].error
    assert tried[0].error_class == "psycopg.errors.LockNotAvailable"
    assert "LockNotAvailable: canceling statement due to lock timeout" in tried[0].error
    ended = workers_ask({worker.name}, {t.celery_task_id})[worker.name][0].ended[t.celery_task_id]
    assert (ended.how, ended.error_class) == ("database_error", "psycopg.errors.LockNotAvailable")


def test_a_message_sent_again_for_a_lost_connection_then_redelivered_records_the_lost_worker(engine):
    """Attempt 1's delivery loses its database connection and sends its message again; the next
    delivery starts attempt 2, and its whole worker is then killed. The broker redelivers the
    message (past its visibility timeout: here made so at once), and no one answers for the dead
    worker: attempt 2 was lost with its worker (worker_lost); the lost connection was attempt 1's."""
    first_worker = engine(concurrency=1, env=RESULT_WRITE_NOT_RETRIED)
    wf = submit(
        {"name": "cut", "agent": "sleep", "input": {"seconds": 3, "on_attempts": [1, 2]}, "max_retries": 3},
    )
    running(wf, "cut", 1)
    assert first_worker.database_connections_cut()
    running(wf, "cut", 2)
    first_worker.kill()
    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    unacked = broker.zrange("unacked_index", 0, -1)
    assert unacked, "the killed worker's message is not unacknowledged"
    broker.zadd("unacked_index", dict.fromkeys(unacked, 0))  # past the visibility timeout
    second_worker = engine(concurrency=1)
    wf = finished(wf, timeout=40)
    assert wf.status == Workflow.Status.COMPLETED
    tried = attempts(wf, "cut")
    assert [(a.attempt_number, a.status, a.cause) for a in tried] == [
        (1, A.LOST, "connection_lost"),
        (2, A.LOST, "worker_lost"),
        (3, A.SUCCEEDED, None),
    ], [a.error for a in tried]
    assert f"worker {first_worker.name} lost its database connection during attempt 1" in tried[0].error
    assert f"worker {first_worker.name} was lost during attempt 2" in tried[1].error
    assert tried[2].worker == second_worker.name


def replace_message(t: TaskExecution, **options: object) -> None:
    """Send task `t`'s message again as `options` say (another release's, a tampered one), in place
    of the one queued."""
    from orchestration.tasks import run_task

    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    assert broker.delete(t.priority) == 1
    run_task.app.send_task(  # not apply_async, which checks the arguments against this release's
        run_task.name, args=[t.pk], task_id=t.celery_task_id, queue=t.priority, routing_key=t.priority, **options
    )


def test_a_sent_again_header_out_of_its_domain_does_not_reach_the_record(engine):
    """A message sent again whose header names the running attempt but says what run_task never
    writes (an error class longer than an attempt records, an error text of a megabyte, keys it
    does not know): the claim reads none of it (logged), closes the attempt as it does for an
    earlier release's retry, and runs the next one; it did not fail the delivery on the write."""
    from orchestration.services.execution import attempt_claim
    from orchestration.tasks import SENT_AGAIN_HEADER

    wf = submit({"name": "t", "agent": "echo", "max_retries": 2})
    t = task(wf, "t")
    header = {
        "cause": "database_error",
        "attempt_number": 1,
        "error_class": "x" * 300,
        "error": "y" * 1_000_000,
        "more": ["z" * 1000] * 100,
        "retries": 1,
    }
    replace_message(t, retries=1, headers={SENT_AGAIN_HEADER: header})
    attempt_claim(execution_id=t.pk, celery_task_id=t.celery_task_id, worker="w1@h")  # the delivery that sent it
    worker = engine(concurrency=1)
    wf = finished(wf, timeout=30)
    assert wf.status == Workflow.Status.COMPLETED
    tried = attempts(wf, "t")
    assert [(a.attempt_number, a.status, a.cause, a.error_class) for a in tried] == [
        (1, A.LOST, "connection_lost", ""),
        (2, A.SUCCEEDED, None, ""),
    ]
    assert len(tried[0].error) < 200
    assert f"its {SENT_AGAIN_HEADER} header is not readable" in worker.log()


def test_run_tasks_retry_keeps_a_messages_headers_but_not_rabbitmqs_dead_letter_ones(engine):
    """run_task's own retry sends the message on with the headers it came with, as Celery's retry
    does, but not RabbitMQ's dead-letter headers (x-death: Celery's retry drops them, else
    RabbitMQ takes the message sent again for a dead-letter cycle), nor a header that grows."""
    from orchestration.tasks import SENT_AGAIN_HEADER

    wf = submit({"name": "cut", "agent": "sleep", "input": {"seconds": 3, "on_attempts": [1, 2]}, "max_retries": 3})
    t = task(wf, "cut")
    dead = {"x-death": [{"count": 1}], "x-first-death-queue": "dead", "x-first-death-reason": "expired"}
    replace_message(t, headers={**dead, "trace": "kept"})
    worker = engine(concurrency=1, env=RESULT_WRITE_NOT_RETRIED)
    running(wf, "cut", 1)
    assert worker.database_connections_cut()
    running(wf, "cut", 2)
    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    held = [json.loads(raw)[0]["headers"] for raw in broker.hvals("unacked")]
    (headers,) = [h for h in held if h["id"] == t.celery_task_id]
    assert headers["retries"] == 1
    assert headers["trace"] == "kept"
    assert headers[SENT_AGAIN_HEADER] == {"cause": "connection_lost", "attempt_number": 1, "retries": 1}
    assert not set(dead) & set(headers), headers
    assert finished(wf).status == Workflow.Status.COMPLETED


def test_a_delivery_that_started_no_attempt_leaves_the_workers_memory_of_the_running_one(engine):
    """Attempt 1's pool process dies (the OOM killer); its message, requeued, comes to a delivery
    whose claim meets a lock timeout before it started an attempt, and is sent again. The worker
    still says what ended attempt 1 (its pool process died), not that it met that database
    error, which it did not: the reaper, asking before the message is back, would close it so."""
    from orchestration.workers import workers_ask

    worker = engine(concurrency=2, env={"DATABASE_URL": f"{database_url()}?options=-c%20lock_timeout%3D500"})
    wf = submit({"name": "oom", "agent": "sleep", "input": {"seconds": 30, "on_attempts": [1]}, "max_retries": 3})
    t = task(wf, "oom")
    first = running(wf, "oom", 1)
    with transaction.atomic():
        TaskExecution.objects.select_for_update().get(pk=t.pk)
        os.kill(first.pool_pid, signal.SIGKILL)
        wait_for(lambda: "retry: Retry in" in worker.log(), timeout=15, what="run_task to send its message again")
        ended = workers_ask({worker.name}, {t.celery_task_id})[worker.name][0].ended[t.celery_task_id]
        assert (ended.how, ended.pool_pid, ended.error_class) == ("pool_process_lost", first.pool_pid, ""), ended
    wf = finished(wf, timeout=30)
    assert wf.status == Workflow.Status.COMPLETED
    assert [(a.attempt_number, a.status) for a in attempts(wf, "oom")] == [(1, A.LOST), (2, A.SUCCEEDED)]
