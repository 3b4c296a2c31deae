"""Operations on the engine: re-sending lost messages, retrying and resuming, cancelling a
task, queue timeouts, the commands, and the Celery configuration itself."""

from __future__ import annotations

import datetime as dt
import functools
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from celery.app.defaults import DEFAULTS
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError, call_command
from django.utils import timezone

from config.settings.base import check_visibility_timeout
from orchestration.errors import TransitionError
from orchestration.models import Agent, Event, TaskAttempt, TaskExecution, Workflow
from orchestration.services.execution import Claim, Outcome, attempt_claim, attempt_run
from orchestration.services.reaper import attempts_reap, queued_sweep
from orchestration.services.workflows import task_cancel, task_retry, workflow_cancel, workflow_resume
from tests.engine import ROOT, database_url, flush_redis, manage, manage_started, output_of, wait_for
from tests.orchestration.test_engine import attempts, finished, running_attempt, submit, task

A, T = TaskAttempt.Status, TaskExecution.Status


@pytest.mark.django_db(transaction=True)
def test_a_message_lost_between_commit_and_send_is_sent_again_by_the_sweeper(engine):
    wf = submit({"name": "a", "agent": "echo"})
    flush_redis()  # the message never reached the broker
    TaskExecution.objects.filter(workflow=wf).update(queued_at=timezone.now() - dt.timedelta(minutes=5))
    lost = task(wf, "a")
    assert queued_sweep() == [lost.execution_id]
    resent = task(wf, "a")
    assert resent.celery_task_id != lost.celery_task_id
    assert resent.queued_at == lost.queued_at, "the queue timeout still counts from the first queueing"
    engine()
    assert finished(wf).status == Workflow.Status.COMPLETED
    assert [a.status for a in attempts(wf, "a")] == [A.SUCCEEDED]


def unacked_message_ids() -> set[str]:
    """The task ids of the messages Redis counts as delivered to a worker and not acknowledged."""
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    return {json.loads(raw)[0]["headers"]["id"] for raw in client.hvals("unacked")}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("holder", ["killed", "alive"])
def test_a_retry_whose_message_a_killed_worker_held_is_sent_again_not_timed_out(engine, settings, monkeypatch, holder):
    """A retry's message waits out its backoff unacknowledged in the worker that took it. A
    worker SIGKILLed meanwhile takes it along, and Redis gives it back only after its visibility
    timeout, which exceeds the queue timeout: the task then failed for waiting in the queue while
    a live worker idled. The sweeper sends it again; one that a live worker holds it leaves alone."""
    Agent.objects.create(
        id="busy", name="Busy", executor="python", entrypoint="tests.orchestration.edge_agents.busy_provider"
    )
    first = engine(concurrency=1)
    wf = submit({"name": "r", "agent": "busy", "max_retries": 3})
    wait_for(lambda: task(wf, "r").status == T.RETRYING, interval=0.02, what="the first try to fail")
    held = task(wf, "r").celery_task_id
    wait_for(lambda: held in unacked_message_ids(), interval=0.02, what="the worker to hold the retry's message")
    if holder == "killed":
        first.kill()
        engine(concurrency=1)
    else:  # the live worker's answer may take more than the usual second on a loaded machine
        from orchestration.services import reaper
        from orchestration.workers import workers_holding

        monkeypatch.setattr(reaper, "workers_holding", functools.partial(workers_holding, timeout=5))
    later = timezone.now() + dt.timedelta(seconds=settings.DISPATCH_SWEEP_AFTER_SECONDS + 5)
    assert queued_sweep(now=later) == ([task(wf, "r").execution_id] if holder == "killed" else [])
    assert (task(wf, "r").celery_task_id == held) is (holder == "alive")
    wf = finished(wf)
    assert wf.status == Workflow.Status.COMPLETED
    assert [(a.attempt_number, a.status) for a in attempts(wf, "r")] == [(1, A.FAILED), (2, A.SUCCEEDED)]
    assert task(wf, "r").retry_count == 1


@pytest.mark.django_db(transaction=True)
def test_the_sweeper_leaves_alone_a_task_whose_message_is_still_queued(engine):
    wf = submit({"name": "a", "agent": "echo"})
    TaskExecution.objects.filter(workflow=wf).update(queued_at=timezone.now() - dt.timedelta(minutes=5))
    assert queued_sweep() == []
    engine()
    assert finished(wf).status == Workflow.Status.COMPLETED


@pytest.mark.django_db(transaction=True)
def test_the_sweeper_reads_a_long_queue_in_chunks_and_finds_a_message_at_its_end(committed, monkeypatch):
    """A backlog of messages was read whole by every sweep (LRANGE 0 -1, each message kept and
    parsed at once): a million waiting messages, 1.5 GB in the reaper, every few seconds."""
    from orchestration.services import reaper

    wf = submit({"name": "a", "agent": "echo"})
    TaskExecution.objects.filter(workflow=wf).update(queued_at=timezone.now() - dt.timedelta(minutes=5))
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    others = [json.dumps({"headers": {"id": f"other-{i}"}, "body": "x" * 100}) for i in range(2500)]
    for start in range(0, len(others), 500):
        client.lpush("normal", *others[start : start + 500])  # ahead of the task's message
    ranges: list[tuple[int, int]] = []
    lrange = redis.Redis.lrange

    def recorded(self, name, start, end):
        ranges.append((start, end))
        return lrange(self, name, start, end)

    monkeypatch.setattr(redis.Redis, "lrange", recorded)
    assert queued_sweep() == [], "its message is in the queue, behind 2 500 others"
    assert ranges and all(0 <= start <= end < start + reaper.BROKER_READ_CHUNK for start, end in ranges), ranges
    assert task(wf, "a").celery_task_id in {json.loads(raw)["headers"]["id"] for raw in client.lrange("normal", -1, -1)}


@pytest.mark.django_db(transaction=True)
def test_a_sweep_reading_a_long_backlog_keeps_its_lease_and_re_sends_what_it_found_lost(committed, monkeypatch):
    """The sweep's lock is a lease renewed before each batch it re-sends; a backlog long enough
    to take longer than the lease to read left the sweep without its lock when it came to
    re-send, and it re-sent nothing, sweep after sweep, for as long as the backlog lasted."""
    import time as time_module

    from orchestration.services import reaper

    wf = submit({"name": "a", "agent": "echo"})
    flush_redis()  # its message never reached the broker
    TaskExecution.objects.filter(workflow=wf).update(queued_at=timezone.now() - dt.timedelta(minutes=5))
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    client.lpush("normal", *[json.dumps({"headers": {"id": f"other-{i}"}}) for i in range(2500)])
    monkeypatch.setattr(reaper, "SWEEP_LOCK_SECONDS", 1)
    lrange = redis.Redis.lrange

    def slow(self, name, start, end):  # a backlog of a million messages, in miniature
        chunk = lrange(self, name, start, end)
        if chunk:
            time_module.sleep(0.4)
        return chunk

    monkeypatch.setattr(redis.Redis, "lrange", slow)
    assert queued_sweep() == [task(wf, "a").execution_id]


@pytest.fixture
def socket_redis(tmp_path):
    """A Redis of the test's own that listens on a unix socket only, as a broker on the same
    host is often reached: its path (a broker URL redis+socket://<path>, as config/settings asks
    of a unix-socket Redis)."""
    path = tmp_path / "redis.sock"
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--unixsocket", str(path), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )

    def answers() -> bool:
        try:
            return redis.Redis(unix_socket_path=str(path)).ping()
        except redis.ConnectionError:
            return False

    try:
        wait_for(answers, what="the socket Redis to answer")
        yield path
    finally:
        server.terminate()
        server.wait(timeout=10)


def _reap_with_broker(broker_url: str) -> str:
    """`manage.py reap_stale_tasks` as an operator runs it, its broker at `broker_url`."""
    environment = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": database_url(),
        "REDIS_URL": settings.REDIS_URL,
        "CELERY_BROKER_URL": broker_url,
    }
    return manage("reap_stale_tasks", env=environment, timeout=120).stdout.strip()


@pytest.mark.subprocess
def test_the_sweeper_reads_a_broker_reached_on_a_unix_socket(committed, socket_redis: Path, settings):
    """A Redis on a unix socket is a Celery broker as redis+socket://<path> (what the settings
    tell a unix:// REDIS_URL to set). The sweeper read only redis:// and rediss:// brokers and
    found nothing to re-send anywhere else: a message lost between commit and send was never
    sent again (the task timed out in the queue an hour later), and the queue gauges were
    missing. It reads the broker's queues there too, and leaves a message it finds alone."""
    broker = f"redis+socket://{socket_redis}"
    wf = submit({"name": "a", "agent": "echo"})  # its message went to the suite's broker, not this one
    TaskExecution.objects.filter(workflow=wf).update(queued_at=timezone.now() - dt.timedelta(minutes=5))
    lost = task(wf, "a")
    assert _reap_with_broker(broker).endswith("re-sent: 1")
    resent = task(wf, "a")
    assert resent.celery_task_id != lost.celery_task_id
    queue = redis.Redis(unix_socket_path=str(socket_redis)).lrange("normal", 0, -1)
    assert [json.loads(raw)["headers"]["id"] for raw in queue] == [resent.celery_task_id]
    assert _reap_with_broker(broker).endswith("re-sent: 0"), "the re-sent message is in the queue"

    from observability.collectors import queue_families

    settings.CELERY_BROKER_URL = broker
    depth = {sample.labels["queue"]: sample.value for sample in queue_families()[0].samples}
    assert depth["normal"] == 1


@pytest.mark.parametrize(
    ("query", "db"), [("", 0), ("?virtual_host=3", 3), ("?virtual_host=/3", 3), ("?virtual_host=/", 0)]
)
def test_a_socket_brokers_database_is_read_as_kombu_reads_it(settings, query, db):
    """kombu takes `virtual_host=/3` for database 3 (and `/` for 0); redis-py refused the
    `db=/3` the sweep passed it on: each sweep (and the queue gauges) raised ValueError."""
    from orchestration.services.reaper import broker_redis_url

    settings.CELERY_BROKER_URL = f"redis+socket:///run/redis/redis.sock{query}"
    client = redis.Redis.from_url(broker_redis_url())
    assert client.connection_pool.connection_kwargs.get("db", 0) == db
    assert client.connection_pool.connection_kwargs["path"] == "/run/redis/redis.sock"


@pytest.mark.django_db(transaction=True)
def test_retrying_a_failed_task_resumes_its_workflow_and_keeps_earlier_attempts(engine):
    engine()
    wf = finished(
        submit(
            {"name": "ok", "agent": "echo"},
            {"name": "bad", "agent": "fail", "max_retries": 0, "depends_on": ["ok"]},
            {"name": "after", "agent": "echo", "depends_on": ["ok", "bad"]},
        )
    )
    assert wf.status == Workflow.Status.FAILED
    # the agent is fixed: the same task now succeeds
    TaskExecution.objects.filter(workflow=wf, task_name="bad").update(input_data={})
    from orchestration.models import Agent

    Agent.objects.filter(pk="fail").update(entrypoint="orchestration.runtime.builtin.echo")
    task_retry(execution_id=task(wf, "bad").execution_id)
    wf = finished(wf)
    assert wf.status == Workflow.Status.COMPLETED
    assert [(a.attempt_number, a.status) for a in attempts(wf, "bad")] == [(1, A.FAILED), (2, A.SUCCEEDED)]
    assert [a.attempt_number for a in attempts(wf, "ok")] == [1], "completed tasks are not run again"
    assert task(wf, "after").status == T.COMPLETED
    assert "workflow_resumed" in Event.objects.filter(workflow_id=wf.pk).values_list("event_type", flat=True)
    with pytest.raises(TransitionError, match="only a failed, timed-out or cancelled task is retried"):
        task_retry(execution_id=task(wf, "ok").execution_id)
    with pytest.raises(TransitionError, match="only a failed or cancelled one resumes"):
        workflow_resume(workflow_id=wf.workflow_id)


@pytest.mark.django_db
def test_refusals_name_every_state_the_operation_accepts():
    """task_retry accepts a timed-out task and workflow_cancel a pending workflow, but their
    refusals said "only a failed or cancelled task" and "only a running workflow"."""
    from orchestration.services.workflows import workflow_cancel
    from tests.factories import TaskExecutionFactory, WorkflowFactory

    done = TaskExecutionFactory(status=T.COMPLETED)
    with pytest.raises(TransitionError, match="only a failed, timed-out or cancelled task is retried"):
        task_retry(execution_id=done.execution_id)
    ended = WorkflowFactory(status=Workflow.Status.COMPLETED)
    with pytest.raises(TransitionError, match="only a pending or running workflow can be cancelled"):
        workflow_cancel(workflow_id=ended.workflow_id)


@pytest.mark.django_db(transaction=True)
def test_retrying_one_of_two_failed_tasks_of_an_ended_workflow_reruns_that_task_alone(engine):
    """With continue_on_failure the workflow ended failed once its branches settled. Retrying
    one failed task runs it and what its failure cancelled; the other failed task and what
    waits on it are left as they are (retrying that one, or resuming, runs them)."""
    engine()
    wf = finished(
        submit(
            {"name": "a", "agent": "flaky", "input": {"fail_times": 1}, "max_retries": 0},
            {"name": "b", "agent": "echo", "depends_on": ["a"]},
            {"name": "z", "agent": "fail", "max_retries": 0},
            {"name": "y", "agent": "echo", "depends_on": ["z"]},
            {"name": "free", "agent": "echo"},
            continue_on_failure=True,
        )
    )
    assert (wf.status, wf.completed_steps, wf.failed_steps, wf.cancelled_steps) == (Workflow.Status.FAILED, 1, 2, 2)
    task_retry(execution_id=task(wf, "a").execution_id)
    wf.refresh_from_db()
    assert (wf.status, wf.completed_at, wf.duration_ms) == (Workflow.Status.RUNNING, None, None)
    assert (wf.failed_steps, wf.cancelled_steps) == (1, 1)
    assert wf.error.startswith("task z failed")
    resumed = Event.objects.filter(workflow_id=wf.pk, event_type="workflow_resumed").get()
    assert resumed.payload["tasks"] == ["a", "b"]
    wf = finished(wf)
    statuses = _statuses(wf)
    assert statuses == {"a": T.COMPLETED, "b": T.COMPLETED, "z": T.FAILED, "y": T.CANCELLED, "free": T.COMPLETED}
    assert (wf.status, wf.completed_steps, wf.failed_steps, wf.cancelled_steps) == (Workflow.Status.FAILED, 3, 1, 1)
    assert wf.error.startswith("task z failed") and wf.duration_ms is not None
    assert [len(attempts(wf, name)) for name in ("a", "b", "z", "y", "free")] == [2, 1, 1, 0, 1]
    assert list(
        Event.objects.filter(workflow_id=wf.pk, event_type__startswith="workflow_")
        .values_list("event_type", flat=True)
        .order_by("sequence")
    ) == [
        "workflow_created",
        "workflow_started",
        "workflow_failed",
        "workflow_resumed",
        "workflow_failed",
    ]
    # the other failed task, once its agent is fixed: the workflow completes
    Agent.objects.filter(pk="fail").update(entrypoint="orchestration.runtime.builtin.echo")
    task_retry(execution_id=task(wf, "z").execution_id)
    wf = finished(wf)
    assert (wf.status, wf.error, wf.completed_steps, wf.failed_steps, wf.cancelled_steps) == (
        Workflow.Status.COMPLETED,
        None,
        5,
        0,
        0,
    )
    assert [len(attempts(wf, name)) for name in ("a", "b", "z", "y", "free")] == [2, 1, 2, 1, 1]


@pytest.mark.django_db(transaction=True)
def test_cancelling_a_running_task_fails_its_workflow_and_records_the_attempt(engine):
    engine()
    wf = submit(
        {"name": "long", "agent": "sleep", "input": {"seconds": 20}},
        {"name": "other", "agent": "sleep", "input": {"seconds": 20}},
    )
    attempt = running_attempt(wf, "long")
    running_attempt(wf, "other")
    task_cancel(execution_id=attempt.execution_id, reason="not needed")
    wf.refresh_from_db()
    attempt.refresh_from_db()
    assert wf.status == Workflow.Status.CANCELLED and "task long cancelled: not needed" in wf.error
    assert (attempt.status, attempt.cause) == (A.CANCELLED, "cancelled")
    assert task(wf, "other").status == T.CANCELLED
    with pytest.raises(TransitionError, match="cannot be cancelled"):
        task_cancel(execution_id=attempt.execution_id)


@pytest.mark.django_db(transaction=True)
def test_a_cancel_hands_the_slot_it_frees_to_the_first_task_in_its_agents_line(engine):
    """A cancelled task's process is terminated, so its attempt never hands its agent's slot on:
    the cancel does. Left to the deferred messages, the next task in line waited out its whole
    deferral, set by the line it had joined (19.5 s behind twenty tasks), its agent idle."""
    Agent.objects.filter(pk="sleep").update(max_concurrency=1)
    engine(concurrency=4)
    holder = submit({"name": "holder", "agent": "sleep", "input": {"seconds": 60}})
    running_attempt(holder, "holder")
    line = []
    for number in range(12):
        waiter = submit({"name": "waiter", "agent": "sleep", "input": {"seconds": 0}}, name=f"waiter {number}")
        deferred = lambda waiter=waiter: task(waiter, "waiter").deferred_at is not None  # noqa: E731
        wait_for(deferred, what=f"waiter {number} to be deferred")
        line.append(waiter)
    last = task(line[-1], "waiter")
    assert last.deferred_at - timezone.now() > dt.timedelta(seconds=6), "the last in line waits behind the others"
    for waiter in line[:-1]:
        workflow_cancel(workflow_id=waiter.pk)
    workflow_cancel(workflow_id=holder.pk)
    cancelled = time.monotonic()
    assert finished(line[-1]).status == Workflow.Status.COMPLETED
    assert time.monotonic() - cancelled < 4, "the freed slot waited for the last task's deferred message"


@pytest.mark.parametrize(
    ("cancel", "continue_on_failure"), [("workflow", False), ("running task", False), ("workflow", True)]
)
def test_cancelling_a_workflow_that_has_failed_already_keeps_its_failure(
    db, builtin_agents, cancel, continue_on_failure
):
    """A workflow that stops at its first failure, waiting for a task still running to end (or
    that continues on failure, running its other branches): the cancel ends that task, and the
    workflow ends failed with its failure, as it would have ended anyway; the cancel is named in
    its workflow_failed event, not written over the failure."""
    wf = submit(
        {"name": "broken", "agent": "fail", "input": {"message": "no such table"}, "max_retries": 0},
        {"name": "slow", "agent": "sleep", "input": {"seconds": 30}},
        continue_on_failure=continue_on_failure,
    )
    slow = task(wf, "slow")
    assert isinstance(attempt_claim(execution_id=slow.pk, celery_task_id=slow.celery_task_id, worker="w@h"), Claim)
    assert _run(wf, "broken") == Outcome.FAILED
    wf.refresh_from_db()
    assert (wf.status, wf.failed_steps) == (Workflow.Status.RUNNING, 1), "it waits for its running task"
    if cancel == "workflow":
        workflow_cancel(workflow_id=wf.pk, reason="operator gave up")
    else:
        task_cancel(execution_id=slow.pk, reason="operator gave up")
    wf.refresh_from_db()
    assert wf.status == Workflow.Status.FAILED
    assert wf.error.startswith("task broken failed") and "no such table" in wf.error, wf.error
    ended = Event.objects.filter(entity_id=wf.pk).order_by("sequence").last()
    assert ended.event_type == "workflow_failed" and "operator gave up" in ended.payload["cancelled"]
    assert ended.payload["error"] == wf.error
    slow.refresh_from_db()
    assert slow.status == T.CANCELLED and "operator gave up" in slow.error
    assert TaskAttempt.objects.get(execution=slow).cause == "cancelled"


def _run(workflow: Workflow, name: str) -> Outcome:
    t = task(workflow, name)
    return attempt_run(execution_id=t.execution_id, celery_task_id=t.celery_task_id, worker="w@h")


def _statuses(workflow: Workflow) -> dict[str, str]:
    return dict(TaskExecution.objects.filter(workflow=workflow).values_list("task_name", "status"))


def test_cancelling_the_last_task_of_a_workflow_that_continues_on_failure_finishes_it(db, builtin_agents):
    """Finished as cancelled (no task failed, one was cancelled), so that it can be resumed:
    retrying the cancelled task runs it."""
    wf = submit({"name": "a", "agent": "echo"}, {"name": "b", "agent": "echo"}, continue_on_failure=True)
    assert _run(wf, "b") == Outcome.SUCCEEDED
    task_cancel(execution_id=task(wf, "a").execution_id, reason="not needed")
    wf.refresh_from_db()
    assert _statuses(wf) == {"a": T.CANCELLED, "b": T.COMPLETED}
    assert (wf.status, wf.completed_steps, wf.failed_steps, wf.cancelled_steps) == (Workflow.Status.CANCELLED, 1, 0, 1)
    workflow_events = Event.objects.filter(workflow_id=wf.pk, event_type__startswith="workflow_")
    assert list(workflow_events.values_list("event_type", flat=True))[-1] == "workflow_cancelled"

    task_retry(execution_id=task(wf, "a").execution_id)
    assert _run(wf, "a") == Outcome.SUCCEEDED
    wf.refresh_from_db()
    assert (wf.status, wf.completed_steps, wf.cancelled_steps) == (Workflow.Status.COMPLETED, 2, 0)


def test_cancelling_a_task_of_a_workflow_that_continues_on_failure_cancels_its_dependents(db, builtin_agents):
    wf = submit(
        {"name": "a", "agent": "echo"},
        {"name": "b", "agent": "echo", "depends_on": ["a"]},
        {"name": "c", "agent": "echo", "depends_on": ["b"]},
        {"name": "d", "agent": "echo"},
        continue_on_failure=True,
    )
    task_cancel(execution_id=task(wf, "a").execution_id, reason="not needed")
    wf.refresh_from_db()
    assert _statuses(wf) == {"a": T.CANCELLED, "b": T.CANCELLED, "c": T.CANCELLED, "d": T.QUEUED}
    assert task(wf, "b").error == "upstream task a cancelled"
    assert (wf.status, wf.cancelled_steps) == (Workflow.Status.RUNNING, 3)
    assert _run(wf, "d") == Outcome.SUCCEEDED
    wf.refresh_from_db()
    assert (wf.status, wf.completed_steps, wf.cancelled_steps) == (Workflow.Status.CANCELLED, 1, 3)


def test_retrying_a_failed_task_of_a_running_workflow_brings_back_what_its_failure_cancelled(db, builtin_agents):
    wf = submit(
        {"name": "a", "agent": "flaky", "input": {"fail_times": 1}, "max_retries": 0},
        {"name": "b", "agent": "echo", "depends_on": ["a"]},
        {"name": "c", "agent": "echo", "depends_on": ["b", "z"]},  # z fails too: c cannot run
        {"name": "z", "agent": "fail", "input": {"retryable": False}},
        {"name": "d", "agent": "sleep", "input": {"seconds": 0}},
        continue_on_failure=True,
    )
    assert _run(wf, "a") == Outcome.FAILED
    assert _run(wf, "z") == Outcome.FAILED
    wf.refresh_from_db()
    assert _statuses(wf) == {"a": T.FAILED, "b": T.CANCELLED, "c": T.CANCELLED, "z": T.FAILED, "d": T.QUEUED}
    assert (wf.failed_steps, wf.cancelled_steps) == (2, 2)

    task_retry(execution_id=task(wf, "a").execution_id)
    wf.refresh_from_db()
    assert _statuses(wf) == {"a": T.QUEUED, "b": T.PENDING, "c": T.CANCELLED, "z": T.FAILED, "d": T.QUEUED}
    assert (wf.failed_steps, wf.cancelled_steps) == (1, 1)
    assert _run(wf, "a") == Outcome.SUCCEEDED
    assert task(wf, "b").status == T.QUEUED
    assert _run(wf, "b") == Outcome.SUCCEEDED
    assert _run(wf, "d") == Outcome.SUCCEEDED
    wf.refresh_from_db()
    assert _statuses(wf) == {"a": T.COMPLETED, "b": T.COMPLETED, "c": T.CANCELLED, "z": T.FAILED, "d": T.COMPLETED}
    assert (wf.status, wf.completed_steps, wf.failed_steps, wf.cancelled_steps) == (Workflow.Status.FAILED, 3, 1, 1)


def test_a_workflow_whose_only_failure_is_retried_and_completes_keeps_no_error(db, builtin_agents):
    wf = submit(
        {"name": "a", "agent": "flaky", "input": {"fail_times": 1}, "max_retries": 0},
        {"name": "z", "agent": "fail", "input": {"retryable": False}},
        {"name": "d", "agent": "echo"},
        continue_on_failure=True,
    )
    assert _run(wf, "z") == Outcome.FAILED
    assert _run(wf, "a") == Outcome.FAILED
    wf.refresh_from_db()
    assert wf.error.startswith("task a failed: RetryableError")
    task_retry(execution_id=task(wf, "a").execution_id)
    wf.refresh_from_db()
    assert wf.error.startswith("task z failed: PermanentError"), "what still failed, not the task retried"
    Agent.objects.filter(pk="fail").update(entrypoint="orchestration.runtime.builtin.echo")
    task_retry(execution_id=task(wf, "z").execution_id)
    wf.refresh_from_db()
    assert wf.error is None
    for name in ("a", "z", "d"):
        assert _run(wf, name) == Outcome.SUCCEEDED
    wf.refresh_from_db()
    assert (wf.status, wf.error, wf.completed_steps, wf.failed_steps) == (Workflow.Status.COMPLETED, None, 3, 0)


def test_a_workflow_past_its_deadline_is_neither_resumed_nor_retried(db, builtin_agents):
    """Its first claim would fail it again at once: the operation is refused, with the reason."""
    for continue_on_failure in (False, True):
        wf = submit(
            {"name": "a", "agent": "echo"},
            deadline=(timezone.now() + dt.timedelta(hours=1)).isoformat(),
            continue_on_failure=continue_on_failure,
        )
        task_cancel(execution_id=task(wf, "a").execution_id)
        Workflow.objects.filter(pk=wf.pk).update(deadline=timezone.now() - dt.timedelta(seconds=1))
        events = Event.objects.filter(workflow_id=wf.pk).count()
        with pytest.raises(TransitionError, match="is past its deadline"):
            workflow_resume(workflow_id=wf.workflow_id)
        with pytest.raises(TransitionError, match="is past its deadline"):
            task_retry(execution_id=task(wf, "a").execution_id)
        wf.refresh_from_db()
        assert (wf.status, task(wf, "a").status) == (Workflow.Status.CANCELLED, T.CANCELLED)
        assert Event.objects.filter(workflow_id=wf.pk).count() == events


def test_retrying_a_task_whose_upstream_did_not_complete_names_the_upstream(db, builtin_agents):
    wf = submit(
        {"name": "a", "agent": "echo"},
        {"name": "b", "agent": "echo", "depends_on": ["a"]},
        {"name": "c", "agent": "sleep", "input": {"seconds": 0}},
        continue_on_failure=True,
    )
    task_cancel(execution_id=task(wf, "a").execution_id)
    with pytest.raises(TransitionError, match=r"task b depends on a, not completed: retry it first"):
        task_retry(execution_id=task(wf, "b").execution_id)
    task_retry(execution_id=task(wf, "a").execution_id)  # brings b back
    assert _statuses(wf) == {"a": T.QUEUED, "b": T.PENDING, "c": T.QUEUED}


def test_retrying_an_upstream_task_leaves_cancelled_a_dependent_a_user_cancelled(db, builtin_agents):
    wf = submit(
        {"name": "a", "agent": "flaky", "input": {"fail_times": 1}, "max_retries": 0},
        {"name": "b", "agent": "echo", "depends_on": ["a"]},
        {"name": "c", "agent": "echo", "depends_on": ["a"]},
        {"name": "d", "agent": "sleep", "input": {"seconds": 0}},
        continue_on_failure=True,
    )
    # Whatever the user's reason says, the record tells their cancel from an upstream one.
    task_cancel(execution_id=task(wf, "b").execution_id, reason="upstream task a is not wanted")
    assert _run(wf, "a") == Outcome.FAILED  # cancels c
    cancels = Event.objects.filter(event_type="task_cancelled", workflow_id=wf.pk).order_by("sequence")
    assert [(e.payload["task_name"], e.payload.get("upstream")) for e in cancels] == [("b", None), ("c", "a")]
    task_retry(execution_id=task(wf, "a").execution_id)
    wf.refresh_from_db()
    assert _statuses(wf) == {"a": T.QUEUED, "b": T.CANCELLED, "c": T.PENDING, "d": T.QUEUED}
    assert (wf.failed_steps, wf.cancelled_steps) == (0, 1)


@pytest.mark.django_db(transaction=True)
def test_a_retry_and_a_sibling_attempt_failing_at_the_same_moment_both_go_through(builtin_agents, monkeypatch):
    """The retry locks the workflow row, then the rows it revives; a sibling's failing
    attempt locks its task row, then the workflow row. The retry must not lock the running
    sibling's row (the two would deadlock, and the retry, a user's request, would fail)."""
    import threading

    from django.db import connection

    from orchestration.services import execution

    wf = submit(
        {"name": "a", "agent": "flaky", "input": {"fail_times": 1}, "max_retries": 0},
        {"name": "b", "agent": "echo", "depends_on": ["a"]},
        {"name": "c", "agent": "echo", "max_retries": 0},
        continue_on_failure=True,
    )
    assert _run(wf, "a") == Outcome.FAILED
    c = task(wf, "c")
    claim = attempt_claim(execution_id=c.execution_id, celery_task_id=c.celery_task_id, worker="w@h")
    assert isinstance(claim, Claim)
    holds_its_row = threading.Event()
    real_add_usage = execution.workflow_add_usage

    def slow_add_usage(*args, **kwargs):
        holds_its_row.set()
        time.sleep(0.5)  # c's task row is locked; the retry arrives meanwhile
        return real_add_usage(*args, **kwargs)

    monkeypatch.setattr(execution, "workflow_add_usage", slow_add_usage)
    errors: list[BaseException] = []

    def fail_c() -> None:
        try:
            execution.attempt_fail(attempt=claim.attempt, exc=RuntimeError("boom"), duration_ms=1.0, now=timezone.now())
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    sibling = threading.Thread(target=fail_c)
    sibling.start()
    assert holds_its_row.wait(5)
    task_retry(execution_id=task(wf, "a").execution_id)
    sibling.join(10)
    assert errors == []
    wf.refresh_from_db()
    assert _statuses(wf) == {"a": T.QUEUED, "b": T.PENDING, "c": T.FAILED}
    assert (wf.status, wf.failed_steps, wf.cancelled_steps) == (Workflow.Status.RUNNING, 1, 0)


def test_a_redelivered_task_counts_its_queue_timeout_from_the_redelivery(db, builtin_agents, settings):
    """It waited and ran for longer than the queue timeout before its worker died: it is
    retried, not failed as if it had waited that long in the queue."""
    settings.TASK_QUEUE_TIMEOUT_SECONDS = 3600
    wf = submit({"name": "x", "agent": "echo", "max_retries": 3})
    x = task(wf, "x")
    claim = attempt_claim(execution_id=x.execution_id, celery_task_id=x.celery_task_id, worker="w1@h")
    assert isinstance(claim, Claim)
    TaskExecution.objects.filter(pk=x.pk).update(queued_at=timezone.now() - dt.timedelta(minutes=65))
    TaskAttempt.objects.filter(pk=claim.attempt.pk).update(started_at=timezone.now() - dt.timedelta(minutes=15))
    again = attempt_claim(execution_id=x.execution_id, celery_task_id=x.celery_task_id, worker="w2@h", redelivered=True)
    assert isinstance(again, Claim) and again.attempt.attempt_number == 2
    assert [(a.status, a.cause) for a in attempts(wf, "x")] == [(A.LOST, "worker_lost"), (A.RUNNING, None)]


def test_a_task_queued_past_the_queue_timeout_never_starts(db, builtin_agents, settings):
    settings.TASK_QUEUE_TIMEOUT_SECONDS = 60
    wf = submit({"name": "late", "agent": "echo"}, {"name": "next", "agent": "echo", "depends_on": ["late"]})
    late = task(wf, "late")
    TaskExecution.objects.filter(pk=late.pk).update(queued_at=timezone.now() - dt.timedelta(seconds=61))
    outcome = attempt_claim(execution_id=late.execution_id, celery_task_id=late.celery_task_id, worker="w@h")
    assert outcome == Outcome.SKIPPED
    [attempt] = attempts(wf, "late")
    assert (attempt.status, attempt.cause, attempt.duration_ms) == (A.TIMED_OUT, "queue_timeout", 0.0)
    assert "limit 60 s" in attempt.error
    assert task(wf, "late").status == T.TIMED_OUT
    wf.refresh_from_db()
    assert wf.status == Workflow.Status.FAILED
    assert wf.error_count == 1, "a try timed out in the queue counts as a failed one"
    assert task(wf, "next").status == T.CANCELLED


def test_a_task_no_worker_takes_is_timed_out_by_the_reaper(db, builtin_agents, settings):
    """No worker consumes its queue (or none runs): no claim ever comes to time it out, and
    the workflow would stay running forever. The reaper records what the claim would have."""
    settings.TASK_QUEUE_TIMEOUT_SECONDS = 60
    wf = submit({"name": "late", "agent": "echo"}, {"name": "next", "agent": "echo", "depends_on": ["late"]})
    waiting = submit({"name": "deferred", "agent": "echo"})
    late, deferred = task(wf, "late"), task(waiting, "deferred")
    long_ago = timezone.now() - dt.timedelta(seconds=61)
    TaskExecution.objects.filter(pk=late.pk).update(queued_at=long_ago)
    # queued as long, but sent again a moment ago for its agent's concurrency limit
    TaskExecution.objects.filter(pk=deferred.pk).update(queued_at=long_ago, deferred_at=timezone.now())

    result = attempts_reap()

    assert result.queue_timed_out == [late.execution_id]
    [attempt] = attempts(wf, "late")
    assert (attempt.status, attempt.cause, attempt.worker) == (A.TIMED_OUT, "queue_timeout", "")
    assert "limit 60 s" in attempt.error
    wf.refresh_from_db()
    assert (wf.status, wf.error_count) == (Workflow.Status.FAILED, 1)
    assert (task(wf, "late").status, task(wf, "next").status) == (T.TIMED_OUT, T.CANCELLED)
    assert task(waiting, "deferred").status == T.QUEUED
    assert attempts_reap().queue_timed_out == []
    # its message, reaching a worker at last, runs nothing
    outcome = attempt_claim(execution_id=late.execution_id, celery_task_id=late.celery_task_id, worker="w@h")
    assert outcome == Outcome.SKIPPED and len(attempts(wf, "late")) == 1


def test_a_claim_past_the_deadline_fails_the_workflow_and_records_why_running_attempts_ended(db, builtin_agents):
    wf = submit(
        {"name": "a", "agent": "echo"},
        {"name": "b", "agent": "echo"},
        deadline=(timezone.now() + dt.timedelta(hours=1)).isoformat(),
    )
    a, b = task(wf, "a"), task(wf, "b")
    claim = attempt_claim(execution_id=a.execution_id, celery_task_id=a.celery_task_id, worker="w@h")
    assert isinstance(claim, Claim)
    Workflow.objects.filter(pk=wf.pk).update(deadline=timezone.now() - dt.timedelta(seconds=1))
    assert attempt_claim(execution_id=b.execution_id, celery_task_id=b.celery_task_id, worker="w@h") == (
        Outcome.SKIPPED
    )
    wf.refresh_from_db()
    assert (wf.status, wf.cancelled_steps) == (Workflow.Status.FAILED, 2) and "deadline" in wf.error
    [cut] = attempts(wf, "a")
    assert (cut.status, cut.cause) == (A.CANCELLED, "deadline")
    assert attempts(wf, "b") == []


def test_a_stale_message_id_runs_nothing(db, builtin_agents):
    wf = submit({"name": "a", "agent": "echo"})
    a = task(wf, "a")
    assert attempt_claim(execution_id=a.execution_id, celery_task_id="not-the-current-id", worker="w") == (
        Outcome.SKIPPED
    )
    assert attempts(wf, "a") == []


@pytest.mark.django_db(transaction=True)
def test_submit_command_waits_and_exits_by_the_outcome(engine, tmp_path):
    engine()
    good, bad = tmp_path / "good.json", tmp_path / "bad.yaml"
    good.write_text('{"name": "ok", "tasks": [{"name": "a", "agent": "echo"}]}')
    bad.write_text("name: failing\ntasks:\n  - {name: a, agent: fail, max_retries: 0}\n")
    out = io.StringIO()
    call_command("submit_workflow", str(good), "--wait", stdout=out)
    workflow_id = out.getvalue().splitlines()[0]
    assert Workflow.objects.get(pk=workflow_id).status == Workflow.Status.COMPLETED
    assert "ok [completed] 1/1" in out.getvalue()
    # Not a terminal (a CI log, a pipe): a line per change of a task's state, not only the end.
    assert re.search(r"^\d\d:\d\d:\d\d a completed \(retries 0/\d+\)$", out.getvalue(), re.M), out.getvalue()
    failing = io.StringIO()
    with pytest.raises(CommandError, match="ended failed"):
        call_command("submit_workflow", str(bad), "--wait", stdout=failing)
    assert re.search(r"^\d\d:\d\d:\d\d a failed \(retries 0/0\)$", failing.getvalue(), re.M), failing.getvalue()
    status = io.StringIO()
    call_command("workflow_status", workflow_id, stdout=status)
    assert "a" in status.getvalue() and "#1 succeeded" in status.getvalue()
    with pytest.raises(CommandError, match="no workflow 'nope'"):
        call_command("workflow_status", "nope")


def _status_rows(workflow: Workflow) -> dict[str, list[str]]:
    """workflow_status's task rows by task name, split into columns."""
    out = io.StringIO()
    call_command("workflow_status", workflow.workflow_id, stdout=out)
    lines = out.getvalue().splitlines()
    rows = lines[[line.startswith("---") for line in lines].index(True) + 1 : -1]
    return {row.split()[0]: row.split() for row in rows if not row.startswith(" ")}  # not the attempts' lines


def test_workflow_status_counts_the_tries_a_task_had(db, builtin_agents):
    """`tries` is the attempts on record: none for a task cancelled before it ran, every one
    for a task retried by hand (which starts its retry count again)."""
    wf = submit(
        {"name": "a", "agent": "fail", "input": {"retryable": False}, "max_retries": 0},
        {"name": "b", "agent": "echo", "depends_on": ["a"]},
    )
    assert _run(wf, "a") == Outcome.FAILED
    rows = _status_rows(wf)
    assert rows["a"][2:4] == ["failed", "1"]
    assert rows["b"][2:4] == ["cancelled", "0"]
    task_retry(execution_id=task(wf, "a").execution_id)
    assert _run(wf, "a") == Outcome.FAILED
    assert _status_rows(wf)["a"][2:4] == ["failed", "2"]


def test_workflow_status_shows_every_attempt_as_recorded(db, builtin_agents):
    """Under each task, one line per attempt: outcome and cause, duration beside the limit it
    ran under, tokens and cost, worker, the first line of its error."""
    wf = submit(
        {
            "name": "a",
            "agent": "fail",
            "input": {"retryable": True, "message": "upstream said no\nsecond line"},
            "max_retries": 1,
            "timeout_seconds": 30,
        },
    )
    assert _run(wf, "a") == Outcome.FAILED
    assert task(wf, "a").status == T.RETRYING
    assert _run(wf, "a") == Outcome.FAILED  # the retry's message, delivered before its countdown ends
    assert task(wf, "a").status == T.FAILED
    out = io.StringIO()
    call_command("workflow_status", wf.workflow_id, stdout=out)
    lines = out.getvalue().splitlines()
    task_row = next(i for i, line in enumerate(lines) if line.startswith("a "))
    first, second = lines[task_row + 1], lines[task_row + 2]
    for number, line in ((1, first), (2, second)):
        recorded = TaskAttempt.objects.get(execution__workflow=wf, attempt_number=number)
        assert line == (
            f"    #{number} failed (error)  {recorded.duration_ms:.1f} ms (limit 30 s)  tokens 0  cost $0.000000"
            "  on w@h  RetryableError: upstream said no"
        ), line
    assert lines[task_row + 3 :][0].startswith("events:"), "the error's second line is not shown under the attempts"


@pytest.mark.parametrize("timeout", ["nan", "inf", "-1", "0", "soon"])
def test_submit_command_refuses_a_wait_timeout_that_could_never_pass(db, builtin_agents, tmp_path, timeout):
    spec = tmp_path / "ok.json"
    spec.write_text('{"name": "ok", "tasks": [{"name": "a", "agent": "echo"}]}')
    with pytest.raises(CommandError, match="is not a positive number of seconds"):
        call_command("submit_workflow", str(spec), "--wait", "--timeout", timeout, stdout=io.StringIO())
    assert not Workflow.objects.exists()


def test_submit_command_refuses_a_timeout_without_wait(db, builtin_agents, tmp_path):
    """It was ignored: the workflow was submitted and the command returned at once."""
    spec = tmp_path / "ok.json"
    spec.write_text('{"name": "ok", "tasks": [{"name": "a", "agent": "echo"}]}')
    with pytest.raises(CommandError) as refused:
        call_command("submit_workflow", str(spec), "--timeout", "60", stdout=io.StringIO())
    assert str(refused.value) == "--timeout is how long --wait waits: give --wait too"
    assert not Workflow.objects.exists()


def test_submit_command_waits_without_a_limit_unless_given_one(db, builtin_agents, tmp_path, monkeypatch):
    """README: --wait exits 0 only if the workflow completed (within --timeout seconds, if
    given). Without --timeout it follows the workflow however long it runs: it gave up after
    an hour it never named, failing a workflow that was still running fine."""
    from orchestration.management.commands import submit_workflow as command

    spec = tmp_path / "long.json"
    spec.write_text('{"name": "long", "tasks": [{"name": "a", "agent": "echo"}]}')

    class Clock:
        """Three hours pass between two looks; after the second, the workflow is cancelled."""

        now = 0.0
        looks = 0

        def monotonic(self) -> float:
            return self.now

        def sleep(self, seconds: float) -> None:
            self.now += 3 * 3600
            self.looks += 1
            if self.looks == 2:
                workflow_cancel(workflow_id=Workflow.objects.get(name="long").pk, reason="operator")

    monkeypatch.setattr(command, "time", Clock())
    with pytest.raises(CommandError, match=r"ended cancelled"):
        call_command("submit_workflow", str(spec), "--wait", stdout=io.StringIO())
    out = io.StringIO()
    with pytest.raises(CommandError, match=r"still running after 60 s"):
        call_command("submit_workflow", str(spec), "--wait", "--timeout", "60", stdout=out)
    # Where it stood when the wait gave up, not only that it did.
    assert "long [running] 0/1\n  [" in out.getvalue(), out.getvalue()


@pytest.mark.subprocess
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_wait_not_the_workflow_in_one_line(builtin_agents, tmp_path, signum):
    """^C under `submit_workflow --wait` was a KeyboardInterrupt's traceback, and SIGTERM ended
    it without a word: either stops the waiting only, says so and where the workflow stood.
    ^C still ends the process by SIGINT, as the KeyboardInterrupt did: a shell running a script
    stops at a command that died of it, and goes on past one that exited 1 (every ^C in a loop
    of `submit_workflow F --wait` submitted the next spec)."""
    spec = tmp_path / "queued.json"
    spec.write_text('{"name": "queued", "tasks": [{"name": "a", "agent": "echo"}]}')  # no worker: it stays queued
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.test", "DATABASE_URL": database_url()}
    waiting = manage_started("submit_workflow", str(spec), "--wait", env=env)
    workflow = wait_for(lambda: Workflow.objects.filter(name="queued").first(), what="the workflow")
    time.sleep(1)  # into the wait's loop
    waiting.send_signal(signum)
    output = output_of(waiting, timeout=30)
    assert waiting.returncode == (-signal.SIGINT if signum == signal.SIGINT else 1), output
    assert "Traceback" not in output, output
    assert "queued [running] 0/1\n  [                    ] a " in output, output  # where it stood
    assert output.splitlines()[-1] == (
        f"CommandError: stopped waiting: workflow {workflow.pk} is still running and goes on "
        f"(manage.py workflow_status {workflow.pk} shows it)"
    )
    assert Workflow.objects.get(pk=workflow.pk).status == Workflow.Status.RUNNING
    assert task(workflow, "a").status == TaskExecution.Status.QUEUED


# `manage.py submit_workflow`, its workflow_submit sending the process a signal once the
# workflow is committed: the stop lands after the commit, before the id is printed.
_SIGNALLED_IN_SUBMISSION = """
import os, sys
import django
django.setup()
from orchestration.management.commands import submit_workflow
submitted = submit_workflow.workflow_submit
def signalled(**kwargs):
    answer = submitted(**kwargs)
    os.kill(os.getpid(), int(os.environ["STOP_SIGNAL"]))
    return answer
submit_workflow.workflow_submit = signalled
import manage
sys.argv = ["manage.py", "submit_workflow", *sys.argv[1:]]
manage.main()
"""


@pytest.mark.subprocess
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("wait", [True, False])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_submission_stops_the_command_once_the_id_is_printed(
    builtin_agents, tmp_path, signum, wait
):
    """^C or SIGTERM arriving while `submit_workflow` stored the workflow was a KeyboardInterrupt's
    traceback or a silent end, and after the commit the id of the workflow, which runs, was lost.
    The id is printed, then the command stops in one line (by SIGINT for ^C, as manage.py ends
    an interrupted command)."""
    spec = tmp_path / "queued.json"
    spec.write_text('{"name": "queued", "tasks": [{"name": "a", "agent": "echo"}]}')  # no worker: it stays queued
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": database_url(),
        "STOP_SIGNAL": str(int(signum)),
    }
    process = subprocess.run(
        [sys.executable, "-c", _SIGNALLED_IN_SUBMISSION, str(spec), *(["--wait"] if wait else [])],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = process.stdout + process.stderr
    (workflow,) = Workflow.objects.filter(name="queued")
    assert process.returncode == (-signal.SIGINT if signum == signal.SIGINT else 1), output
    assert "Traceback" not in output, output
    assert process.stdout.splitlines()[0] == workflow.pk, output
    stopped = "stopped waiting: workflow {} is still running" if wait else "stopped: workflow {} was stored"
    assert process.stderr.startswith("CommandError: " + stopped.format(workflow.pk)), output
    assert Workflow.objects.get(pk=workflow.pk).status == Workflow.Status.RUNNING


def test_submit_command_names_a_spec_it_cannot_read(db, builtin_agents, tmp_path):
    spec = tmp_path / "latin1.yaml"
    spec.write_bytes("name: caf\xe9\ntasks: []\n".encode("latin-1"))
    with pytest.raises(CommandError, match=r"latin1\.yaml: cannot be read: 'utf-8' codec can't decode"):
        call_command("submit_workflow", str(spec), stdout=io.StringIO())
    assert not Workflow.objects.exists()


def test_submit_command_refuses_a_spec_larger_than_the_api_would_before_reading_it(
    db, builtin_agents, tmp_path, settings
):
    """A 300 MB spec was read whole (5 GB of memory) and then refused by PostgreSQL with a
    traceback: "string too long to represent as jsonb string". It is refused by its size, at
    the limit the API has for a body."""
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    spec = tmp_path / "big.json"
    spec.write_text(json.dumps({"name": "big", "tasks": [{"name": "a", "agent": "echo", "input": {"t": "x" * 1000}}]}))
    with pytest.raises(CommandError) as refused:
        call_command("submit_workflow", str(spec), stdout=io.StringIO())
    assert str(refused.value) == f"{spec}: larger than 1000 bytes, the most a spec may have (MAX_REQUEST_BODY_BYTES)"
    assert not Workflow.objects.exists()
    spec.write_text(json.dumps({"name": "small", "tasks": [{"name": "a", "agent": "echo", "input": {"t": "x"}}]}))
    call_command("submit_workflow", str(spec), stdout=io.StringIO())
    assert Workflow.objects.get().name == "small"


def test_submit_command_says_a_directory_is_not_a_file(db, builtin_agents, tmp_path):
    (tmp_path / "specs.yaml").mkdir()
    with pytest.raises(CommandError) as refused:
        call_command("submit_workflow", str(tmp_path / "specs.yaml"), stdout=io.StringIO())
    assert str(refused.value) == f"{tmp_path / 'specs.yaml'}: not a file"  # it said "no such file"


@pytest.mark.subprocess
def test_submit_command_names_stdin_that_is_not_utf8(tmp_path):
    """Read through stdin's text layer, bytes that are not UTF-8 became lone surrogates, named
    as "name contains an unpaired UTF-16 surrogate"; as a file's, they are named as the bytes."""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.test", "DATABASE_URL": database_url()}
    result = subprocess.run(
        [sys.executable, "manage.py", "submit_workflow", "-"],
        cwd=ROOT,
        env=env,
        input='{"name": "caf\xe9", "tasks": [{"name": "a", "agent": "echo"}]}'.encode("latin-1"),
        capture_output=True,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.decode() == (
        "CommandError: stdin: cannot be read: 'utf-8' codec can't decode byte 0xe9 in position 13: "
        "invalid continuation byte\n"
    )


@pytest.mark.django_db(transaction=True)
def test_reap_and_relay_commands_run_once(engine, settings):
    import uuid

    import redis

    settings.SYNAPSE_STREAM = f"synapse-test-{uuid.uuid4().hex[:8]}"
    reap = io.StringIO()
    call_command("reap_stale_tasks", stdout=reap)
    assert "timed out: 0  lost: 0" in reap.getvalue()
    relay = io.StringIO()
    client = redis.Redis.from_url(settings.REDIS_URL)
    for _ in range(3):
        call_command("relay_events", stdout=relay)
    # Later passes prove the hole below the first event empty once the transactions writing
    # events when it was seen have ended: go on for at most a minute.
    deadline = time.monotonic() + 60
    while client.xlen(settings.SYNAPSE_STREAM) < Event.objects.count() and time.monotonic() < deadline:
        time.sleep(0.1)
        call_command("relay_events", stdout=relay)
    assert client.xlen(settings.SYNAPSE_STREAM) == Event.objects.count() > 0
    client.delete(settings.SYNAPSE_STREAM, f"{settings.SYNAPSE_STREAM}:relay:gaps")


def test_every_celery_setting_is_one_celery_knows():
    # Celery's own flat table of setting names, plus the one its Django fixup reads itself.
    known = {key.upper() for key in DEFAULTS} | {"DB_REUSE_MAX"}
    ours = {name[len("CELERY_") :] for name in dir(settings) if name.startswith("CELERY_")}
    assert ours, "settings use the CELERY_ namespace"
    assert ours <= known, f"unknown to Celery (silently ignored): {sorted(ours - known)}"


def test_worker_settings_protect_against_lost_work():
    from config.celery import app

    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert [q.name for q in conf.task_queues] == ["system", "critical", "high", "normal", "low"]
    hold = settings.TASK_MAX_TIMEOUT_SECONDS + settings.TASK_HARD_TIMEOUT_GRACE_SECONDS
    assert conf.broker_transport_options["visibility_timeout"] > hold + settings.TASK_RETRY_BACKOFF_MAX_SECONDS


@pytest.mark.parametrize("order", [None, "round_robin", "sideways"])
def test_a_redis_broker_takes_the_queues_in_the_order_of_precedence_unless_told_otherwise(order):
    """kombu's Redis transport takes a worker's queues in turn unless told otherwise: a
    deployment's settings (not only the tests') ask for the order its -Q lists them."""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.local", "REDIS_URL": "redis://127.0.0.1:6379/0"}
    env.pop("CELERY_BROKER_URL", None)
    env.pop("BROKER_QUEUE_ORDER", None)
    if order:
        env["BROKER_QUEUE_ORDER"] = order
    code = "from django.conf import settings; print(settings.CELERY_BROKER_TRANSPORT_OPTIONS['queue_order_strategy'])"
    result = manage("shell", "-c", code, env=env, check=False, timeout=60)
    if order == "sideways":
        assert result.returncode == 1
        assert "BROKER_QUEUE_ORDER='sideways' is not one of: priority, round_robin" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert result.stdout.split()[-1] == (order or "priority")


def test_the_relay_and_reaper_are_scheduled_on_the_system_queue_no_user_task_uses(db):
    """Migration 0027: with every process of a worker on long user tasks of any priority, the
    recovery schedules still have the `system` queue's workers (compose: worker-system)."""
    from django_celery_beat.models import PeriodicTask

    queues = dict(
        PeriodicTask.objects.filter(
            name__in=["synapse event relay", "reap stale tasks", "sweep export runs"]
        ).values_list("name", "queue")
    )
    assert queues == {"synapse event relay": "system", "reap stale tasks": "system", "sweep export runs": "system"}
    assert "system" not in settings.TASK_QUEUES_BY_PRIORITY  # no task execution is routed there


def test_a_visibility_timeout_shorter_than_a_task_can_hold_its_message_is_refused():
    with pytest.raises(ImproperlyConfigured, match="BROKER_VISIBILITY_TIMEOUT_SECONDS=100 must exceed"):
        check_visibility_timeout(100, 3910)


@pytest.mark.subprocess
def test_settings_refuse_to_load_with_a_short_visibility_timeout():
    from tests.config.test_settings import run_manage

    result = run_manage("check", BROKER_VISIBILITY_TIMEOUT_SECONDS="60")
    assert result.returncode != 0
    assert "BROKER_VISIBILITY_TIMEOUT_SECONDS=60 must exceed" in result.stderr


def test_the_visibility_timeout_covers_a_deferred_messages_countdown_whatever_the_backoff(db, builtin_agents):
    """A task deferred for its agent's max_concurrency comes back as a message with a countdown
    of up to 37.5 s, which a worker holds unacknowledged, then runs up to its hard limit: with
    retries' backoff capped below that, a visibility timeout sized for the backoff alone let
    Redis deliver a healthy task again while it ran."""
    from config.settings.base import TASK_DEFERRAL_MAX_COUNTDOWN_SECONDS, longest_message_hold_seconds
    from orchestration.services.execution import agent_slot_recheck_seconds

    assert longest_message_hold_seconds(3600, 10, 1) == 3600 + 10 + 38
    with pytest.raises(ImproperlyConfigured, match="38 s for a task deferred for its agent's max_concurrency"):
        check_visibility_timeout(3645, longest_message_hold_seconds(3600, 10, 1))
    # The longest line's deferral, jitter included, stays within what the timeout is sized for.
    Agent.objects.filter(pk="echo").update(max_concurrency=1)
    wf = submit(*({"name": f"t{n}", "agent": "echo"} for n in range(40)))
    now = timezone.now()
    TaskExecution.objects.filter(workflow=wf).update(deferred_at=now + dt.timedelta(seconds=60))
    agent = Agent.objects.get(pk="echo")
    delays = [agent_slot_recheck_seconds(agent, priority="low", now=now) for _ in range(200)]
    assert max(delays) <= TASK_DEFERRAL_MAX_COUNTDOWN_SECONDS


def test_beat_schedules_for_the_relay_and_the_reaper_exist(db):
    from django_celery_beat.models import PeriodicTask

    tasks = dict(PeriodicTask.objects.values_list("task", "interval__every"))
    assert tasks["orchestration.relay_events"] == 1
    assert tasks["orchestration.reap_stale_tasks"] == 5
    assert settings.CELERY_BEAT_SCHEDULER == "config.beat:DatabaseScheduler"


def test_backoff_grows_exponentially_with_jitter_and_honours_retry_after(settings):
    from orchestration.services.execution import retry_countdown

    settings.TASK_RETRY_BACKOFF_BASE_SECONDS = 1.0
    settings.TASK_RETRY_BACKOFF_MAX_SECONDS = 30
    for n, (low, high) in enumerate([(0.5, 1), (1, 2), (2, 4), (4, 8)]):
        samples = {retry_countdown(n) for _ in range(50)}
        assert all(low <= s <= high for s in samples), (n, samples)
        assert len(samples) > 1, "jittered"
    assert retry_countdown(10) <= 30
    assert retry_countdown(0, retry_after=7) == 7
    assert retry_countdown(0, retry_after=99) == 30


def test_a_message_redelivered_in_a_loop_is_capped_by_the_attempts_recorded(db, builtin_agents):
    wf = submit({"name": "poison", "agent": "echo", "max_retries": 2})
    t = task(wf, "poison")
    first = attempt_claim(execution_id=t.execution_id, celery_task_id=t.celery_task_id, worker="w1@h")
    assert first.attempt.attempt_number == 1
    # the worker dies every time; the broker keeps redelivering the same message
    for number in (2, 3):
        again = attempt_claim(
            execution_id=t.execution_id, celery_task_id=t.celery_task_id, worker=f"w{number}@h", redelivered=True
        )
        assert again.attempt.attempt_number == number
    final = attempt_claim(execution_id=t.execution_id, celery_task_id=t.celery_task_id, worker="w4@h", redelivered=True)
    assert final == Outcome.SKIPPED
    assert [(a.status, a.cause) for a in attempts(wf, "poison")] == [(A.LOST, "worker_lost")] * 3
    # each try says how many times the message had come: once, then twice, then three times
    assert [(a.delivery_count, a.redelivered) for a in attempts(wf, "poison")] == [(1, False), (2, True), (3, True)]
    t.refresh_from_db()
    assert (t.status, t.retry_count) == (T.FAILED, 2)
    assert (
        attempt_claim(execution_id=t.execution_id, celery_task_id=t.celery_task_id, worker="w5@h", redelivered=True)
        == Outcome.SKIPPED
    ), "a failed task records nothing more"
    assert len(attempts(wf, "poison")) == 3


def test_a_redelivered_message_of_a_limited_agent_waits_for_another_task_and_then_runs(db, builtin_agents):
    """The lost attempt's task is between attempts, not running: it neither counts against
    its agent's limit nor is skipped as a duplicate when its deferred message arrives."""
    Agent.objects.filter(pk="echo").update(max_concurrency=1)
    wf = submit({"name": "x", "agent": "echo", "max_retries": 3}, {"name": "y", "agent": "echo"})
    x, y = task(wf, "x"), task(wf, "y")
    assert isinstance(attempt_claim(execution_id=x.execution_id, celery_task_id=x.celery_task_id, worker="w1@h"), Claim)
    # x's worker dies; the broker redelivers x's message after y has taken the agent's only slot
    Agent.objects.filter(pk="echo").update(max_concurrency=2)
    y_claim = attempt_claim(execution_id=y.execution_id, celery_task_id=y.celery_task_id, worker="w2@h")
    assert isinstance(y_claim, Claim)
    Agent.objects.filter(pk="echo").update(max_concurrency=1)
    redelivered = attempt_claim(
        execution_id=x.execution_id, celery_task_id=x.celery_task_id, worker="w3@h", redelivered=True
    )
    assert redelivered == Outcome.DEFERRED
    x.refresh_from_db()
    assert (x.status, x.retry_count) == (T.RETRYING, 1)
    assert [(a.status, a.cause) for a in attempts(wf, "x")] == [(A.LOST, "worker_lost")]
    assert TaskExecution.objects.filter(agent_id="echo", status=T.RUNNING).count() == 1  # y alone
    assert queued_sweep() == []  # its deferred message is on its way, not lost
    # y finishes; x's deferred message then runs it
    TaskExecution.objects.filter(pk=y.pk).update(status=T.COMPLETED)
    again = attempt_claim(execution_id=x.execution_id, celery_task_id=x.celery_task_id, worker="w4@h")
    assert isinstance(again, Claim) and again.attempt.attempt_number == 2


def test_a_task_waiting_for_its_agent_longer_than_the_queue_timeout_is_not_failed(db, builtin_agents, settings):
    settings.TASK_QUEUE_TIMEOUT_SECONDS = 60
    Agent.objects.filter(pk="echo").update(max_concurrency=1)
    wf = submit({"name": "x", "agent": "echo"}, {"name": "y", "agent": "echo"})
    x, y = task(wf, "x"), task(wf, "y")
    assert isinstance(attempt_claim(execution_id=y.execution_id, celery_task_id=y.celery_task_id, worker="w1@h"), Claim)
    start = timezone.now()
    TaskExecution.objects.filter(pk=x.pk).update(queued_at=start - dt.timedelta(seconds=50))  # 50 s in the queue
    for waited in (0, 40, 80):  # y keeps the agent's only slot; x's deferred message comes back
        x.refresh_from_db()
        outcome = attempt_claim(
            execution_id=x.execution_id,
            celery_task_id=x.celery_task_id,
            worker="w2@h",
            now=start + dt.timedelta(seconds=waited),
        )
        assert outcome == Outcome.DEFERRED, f"after {50 + waited} s of waiting"
    x.refresh_from_db()
    assert x.status == T.QUEUED and not attempts(wf, "x")
    # it has waited since it was first queued (the queued-age gauge, submit-to-start); it waits
    # for the agent until its deferred message comes back, a second or so later ...
    assert x.queued_at == start - dt.timedelta(seconds=50)
    back = x.deferred_at - (start + dt.timedelta(seconds=80))
    assert dt.timedelta(seconds=0.75) <= back <= dt.timedelta(seconds=1.25)
    # ... and a deferred message that then waits for a worker past the limit times out
    late = attempt_claim(
        execution_id=x.execution_id,
        celery_task_id=x.celery_task_id,
        worker="w2@h",
        now=x.deferred_at + dt.timedelta(seconds=61),
    )
    assert late == Outcome.SKIPPED
    [timed_out] = attempts(wf, "x")
    assert (timed_out.cause, timed_out.error) == ("queue_timeout", "waited 61 s in the queue (limit 60 s)")


def test_a_freed_slot_wakes_the_task_that_waited_longest_for_the_agent_and_no_other(db, builtin_agents):
    """Deferrals look again later the longer the line (not every second each); the task that
    ends hands its slot to the task waiting longest. A task between tries waits out its
    backoff, and one already woken is not woken again."""
    from orchestration.services.execution import agent_slot_hand_on

    Agent.objects.filter(pk="echo").update(max_concurrency=1)
    wf = submit(*({"name": name, "agent": "echo"} for name in ("run", "old", "new", "backoff")))
    run, old, new, backoff = (task(wf, name) for name in ("run", "old", "new", "backoff"))
    claim = attempt_claim(execution_id=run.execution_id, celery_task_id=run.celery_task_id, worker="w")
    assert isinstance(claim, Claim)
    start = timezone.now()
    TaskExecution.objects.filter(pk=old.pk).update(queued_at=start - dt.timedelta(seconds=30))
    for t in (old, new, backoff):
        t.refresh_from_db()
        assert attempt_claim(execution_id=t.execution_id, celery_task_id=t.celery_task_id, worker="w") == (
            Outcome.DEFERRED
        )
    deferred = {t.task_name: t for t in TaskExecution.objects.filter(workflow=wf)}
    # the line's length sets the wait: one second per task before it (one slot), jittered
    delays = [(deferred[n].deferred_at - start).total_seconds() for n in ("old", "new", "backoff")]
    assert 0.7 <= delays[0] <= 1.4 and 1.4 <= delays[1] <= 2.6 and 2.2 <= delays[2] <= 3.9, delays
    # backoff's next try failed meanwhile and waits out its countdown: not the agent's line
    TaskExecution.objects.filter(pk=backoff.pk).update(
        status=T.RETRYING, queued_at=start + dt.timedelta(seconds=10), celery_task_id="retry-message"
    )
    agent = Agent.objects.get(pk="echo")
    now = start + dt.timedelta(seconds=0.5)
    agent_slot_hand_on(agent, now=now)
    after = {t.task_name: t for t in TaskExecution.objects.filter(workflow=wf)}
    assert after["old"].celery_task_id != deferred["old"].celery_task_id, "the longest waiting task is sent again"
    assert after["old"].deferred_at == now and after["old"].queued_at == start - dt.timedelta(seconds=30)
    assert after["new"].celery_task_id == deferred["new"].celery_task_id
    assert after["backoff"].celery_task_id == "retry-message"
    agent_slot_hand_on(agent, now=now)  # old's message is on its way: the next one in line
    again = {t.task_name: t for t in TaskExecution.objects.filter(workflow=wf)}
    assert again["old"].celery_task_id == after["old"].celery_task_id
    assert again["new"].celery_task_id != deferred["new"].celery_task_id
    # the old deferred message is superseded and runs nothing
    stale = attempt_claim(execution_id=old.execution_id, celery_task_id=deferred["old"].celery_task_id, worker="w")
    assert stale == Outcome.SKIPPED


def test_two_slots_freed_at_once_wake_two_tasks_not_one_twice(db, builtin_agents):
    """Two attempts of the agent end at the same moment in two processes: each wakes a task. The
    second's clock (its own DatabaseClock) may read a millisecond before the first's, which woke
    the longest waiting task then: that task is on its way, and the next one in line is woken."""
    from orchestration.services.execution import agent_slot_hand_on

    Agent.objects.filter(pk="echo").update(max_concurrency=2)
    wf = submit(*({"name": name, "agent": "echo"} for name in ("a", "b", "old", "new")))
    a, b, old, new = (task(wf, name) for name in ("a", "b", "old", "new"))
    for t in (a, b):
        assert isinstance(
            attempt_claim(execution_id=t.execution_id, celery_task_id=t.celery_task_id, worker="w"), Claim
        )
    start = timezone.now()
    TaskExecution.objects.filter(pk=old.pk).update(queued_at=start - dt.timedelta(seconds=30))
    for t in (old, new):
        t.refresh_from_db()
        assert attempt_claim(execution_id=t.execution_id, celery_task_id=t.celery_task_id, worker="w") == (
            Outcome.DEFERRED
        )
    deferred = {t.task_name: t.celery_task_id for t in TaskExecution.objects.filter(workflow=wf)}
    agent = Agent.objects.get(pk="echo")
    TaskExecution.objects.filter(pk__in=[a.pk, b.pk]).update(status=T.COMPLETED)
    ended = timezone.now()
    agent_slot_hand_on(agent, now=ended)  # a's end
    woken = TaskExecution.objects.get(pk=old.pk).celery_task_id
    assert woken != deferred["old"]
    agent_slot_hand_on(agent, now=ended - dt.timedelta(milliseconds=1))  # b's end: its clock a millisecond behind
    after = {t.task_name: t.celery_task_id for t in TaskExecution.objects.filter(workflow=wf)}
    assert after["old"] == woken, "woken once: its message is on its way"
    assert after["new"] != deferred["new"], "the second freed slot goes to the next in line"


def _agent_line(names: tuple[str, ...], *, running: int) -> tuple[Workflow, list[Workflow]]:
    """A workflow of `running` echo tasks, all claimed (the agent's limit: `running`), and behind
    them, in the order of `names`, workflows of one echo task each, deferred in the agent's line."""
    Agent.objects.filter(pk="echo").update(max_concurrency=running)
    holder = submit(*({"name": f"hold-{n}", "agent": "echo"} for n in range(running)), name="holder")
    for n in range(running):
        held = task(holder, f"hold-{n}")
        claim = attempt_claim(execution_id=held.execution_id, celery_task_id=held.celery_task_id, worker="w")
        assert isinstance(claim, Claim)
    line = [submit({"name": "wait", "agent": "echo"}, name=name) for name in names]
    for wf in line:
        waiting = task(wf, "wait")
        outcome = attempt_claim(execution_id=waiting.execution_id, celery_task_id=waiting.celery_task_id, worker="w")
        assert outcome == Outcome.DEFERRED
    return holder, line


def test_a_cancel_of_a_task_woken_for_a_freed_slot_hands_that_slot_on(
    db, builtin_agents, django_capture_on_commit_callbacks
):
    """A task woken for a freed slot (its message on its way) holds that slot until its message
    comes: cancelled before then, the slot was handed to nobody, and the next in line waited out
    its whole deferral, the agent idle."""
    from orchestration.services.execution import agent_slot_hand_on

    holder, [first, second] = _agent_line(("first", "second"), running=1)
    deferred = task(second, "wait").celery_task_id
    TaskExecution.objects.filter(workflow=holder).update(status=T.COMPLETED)
    agent_slot_hand_on(Agent.objects.get(pk="echo"), now=timezone.now())  # the holder's end
    assert task(first, "wait").deferred_at <= timezone.now(), "first is woken: its message is on its way"
    with django_capture_on_commit_callbacks(execute=True):
        workflow_cancel(workflow_id=first.pk)
    assert task(second, "wait").celery_task_id != deferred, "the slot first was to take goes to the next in line"


def test_a_cancel_of_more_running_tasks_than_the_agents_limit_wakes_as_many_as_it_has_free(
    db, builtin_agents, django_capture_on_commit_callbacks
):
    """The limit lowered below the tasks running (they were claimed before), a cancel of them
    frees only what the limit has: one hand-on per task cancelled woke a task each, all but one
    only to be deferred again, one transaction each."""
    holder, line = _agent_line(("a", "b", "c", "d"), running=3)
    deferred = {wf.name: task(wf, "wait").celery_task_id for wf in line}
    Agent.objects.filter(pk="echo").update(max_concurrency=1)
    with django_capture_on_commit_callbacks(execute=True):
        workflow_cancel(workflow_id=holder.pk)
    woken = [wf.name for wf in line if task(wf, "wait").celery_task_id != deferred[wf.name]]
    assert woken == ["a"]


def test_a_deferral_counts_the_line_only_as_far_as_it_sets_the_wait(db, builtin_agents):
    """The line is counted under the agent's row lock at every deferral: a line past
    AGENT_SLOT_RECHECK_MAX_SECONDS' worth waits that long whatever its length, and is not
    counted to its end (a line of 50,000 took 21 ms a deferral, 3 ms counted so far)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from orchestration.services.execution import AGENT_SLOT_RECHECK_MAX_SECONDS, agent_slot_recheck_seconds

    Agent.objects.filter(pk="echo").update(max_concurrency=1)
    wf = submit(*({"name": f"t{n}", "agent": "echo"} for n in range(40)))
    now = timezone.now()
    TaskExecution.objects.filter(workflow=wf).update(deferred_at=now + dt.timedelta(seconds=60))
    agent = Agent.objects.get(pk="echo")
    with CaptureQueriesContext(connection) as queries:
        delay = agent_slot_recheck_seconds(agent, priority="normal", now=now)
    assert 0.75 * AGENT_SLOT_RECHECK_MAX_SECONDS <= delay <= 1.25 * AGENT_SLOT_RECHECK_MAX_SECONDS
    (count,) = queries.captured_queries
    assert "LIMIT 30" in count["sql"], count["sql"]


def test_a_deferral_counts_only_the_tasks_ahead_of_it_in_the_priority_ordered_line(db, builtin_agents):
    """Migration 0039 put the line in priority order, but a deferral still counted every task
    waiting for the agent: a critical task arriving behind 40 low ones was deferred 30 s though
    none was ahead of it (a slot freed by a cancel went to the low tasks coming back before it).
    A task of a less urgent priority is behind it, whenever it was queued."""
    from orchestration.services.execution import AGENT_SLOT_RECHECK_MAX_SECONDS, AGENT_SLOT_RECHECK_SECONDS

    Agent.objects.filter(pk="echo").update(max_concurrency=1)
    r = task(submit({"name": "r", "agent": "echo"}), "r")
    assert isinstance(attempt_claim(execution_id=r.pk, celery_task_id=r.celery_task_id, worker="w"), Claim)
    backlog = submit(*({"name": f"t{n}", "agent": "echo"} for n in range(40)), priority="low")
    start = timezone.now()
    TaskExecution.objects.filter(workflow=backlog).update(deferred_at=start + dt.timedelta(seconds=60))

    def deferral(wf: Workflow, name: str) -> float:
        t = task(wf, name)
        assert attempt_claim(execution_id=t.pk, celery_task_id=t.celery_task_id, worker="w") == Outcome.DEFERRED
        return (task(wf, name).deferred_at - start).total_seconds()

    critical = submit({"name": "c", "agent": "echo"}, {"name": "c2", "agent": "echo"}, priority="critical")
    assert deferral(critical, "c") <= 1.25 * AGENT_SLOT_RECHECK_SECONDS + 1, "no task is ahead of it"
    # c is ahead of c2 (and the low ones behind both); a low task still waits behind the line.
    assert deferral(critical, "c2") <= 1.25 * 2 * AGENT_SLOT_RECHECK_SECONDS + 1
    assert deferral(backlog, "t0") >= 0.75 * AGENT_SLOT_RECHECK_MAX_SECONDS


def test_the_wake_and_the_deferral_read_the_agents_line_on_its_index_and_stop_at_the_limit(db, builtin_agents):
    """Migrations 0036, 0039: each ended attempt of a limited agent looks for the first task in
    its line, each deferral counts the line before it. Without idx_tasks_agent_priority_line the
    first read every waiting task and sorted them, on disk past a few thousand (0.1 to 0.16 s a
    freed slot with 50,000 waiting), and the second, in the model's order, walked the agent's finished tasks
    before its line (60 ms a deferral beside 75,000 of them). Checked on the
    statements as Django writes them: the index's condition must follow from their filters."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from orchestration.services.execution import agent_slot_hand_on, agent_slot_recheck_seconds

    Agent.objects.filter(pk="echo").update(max_concurrency=2)
    agent = Agent.objects.get(pk="echo")
    now = timezone.now()
    TaskExecution.objects.bulk_create(
        [
            TaskExecution(
                agent=agent,
                task_name=f"done{n}",
                status=T.COMPLETED,
                created_at=now - dt.timedelta(days=1, seconds=n),
                queued_at=now - dt.timedelta(days=1, seconds=n),
                deferred_at=now - dt.timedelta(days=1, seconds=n) if n % 3 == 0 else None,
            )
            for n in range(3000)
        ]
        + [
            TaskExecution(
                agent=agent,
                task_name=f"waiting{n}",
                status=T.RETRYING if n % 10 == 0 else T.QUEUED,
                queued_at=now - dt.timedelta(seconds=n),
                deferred_at=now + dt.timedelta(seconds=30 + n % 8),
            )
            for n in range(3000)
        ]
    )
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE task_executions")
    with CaptureQueriesContext(connection) as queries:
        agent_slot_recheck_seconds(agent, priority="critical", now=now)
        agent_slot_recheck_seconds(agent, priority="low", now=now)
        agent_slot_hand_on(agent, now=now)
    counts = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("SELECT COUNT(*)")]
    wake = next(q["sql"] for q in queries.captured_queries if "FOR UPDATE SKIP LOCKED" in q["sql"])
    for sql in (*counts, wake):
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL enable_seqscan = off")  # a table this small is read whole otherwise
            cursor.execute("EXPLAIN " + sql)
            plan = "\n".join(row[0] for row in cursor.fetchall())
        assert "Index Scan using idx_tasks_agent_priority_line" in plan and "Sort" not in plan, f"{sql}\n{plan}"


def test_a_redelivered_message_of_an_agent_at_its_limit_does_not_wait_behind_itself(db, builtin_agents):
    Agent.objects.filter(pk="echo").update(max_concurrency=1)
    wf = submit({"name": "x", "agent": "echo", "max_retries": 3})
    x = task(wf, "x")
    attempt_claim(execution_id=x.execution_id, celery_task_id=x.celery_task_id, worker="w1@h")
    again = attempt_claim(execution_id=x.execution_id, celery_task_id=x.celery_task_id, worker="w2@h", redelivered=True)
    assert isinstance(again, Claim) and again.attempt.attempt_number == 2
    x.refresh_from_db()
    assert x.status == T.RUNNING


def test_run_tasks_own_retry_closes_the_attempt_its_message_left_running_as_connection_lost(db, builtin_agents):
    wf = submit({"name": "cut", "agent": "echo", "max_retries": 1})
    t = task(wf, "cut")
    first = attempt_claim(execution_id=t.execution_id, celery_task_id=t.celery_task_id, worker="w1@h")
    # The same message again, without a retry: a duplicate, recorded already.
    assert attempt_claim(execution_id=t.execution_id, celery_task_id=t.celery_task_id, worker="w2@h") == (
        Outcome.SKIPPED
    )
    second = attempt_claim(execution_id=t.execution_id, celery_task_id=t.celery_task_id, worker="w1@h", retried=True)
    assert (first.attempt.attempt_number, second.attempt.attempt_number) == (1, 2)
    closed = attempts(wf, "cut")[0]
    assert (closed.status, closed.cause, closed.retryable) == (A.LOST, "connection_lost", True)
    assert closed.error == "worker w1@h lost its database connection during attempt 1 (message sent again)"
    t.refresh_from_db()
    assert (t.status, t.retry_count) == (T.RUNNING, 1)
    # No retries left: the next lost connection fails the task, and nothing more is recorded.
    assert (
        attempt_claim(execution_id=t.execution_id, celery_task_id=t.celery_task_id, worker="w1@h", retried=True)
        == Outcome.SKIPPED
    )
    t.refresh_from_db()
    assert t.status == T.FAILED and [a.status for a in attempts(wf, "cut")] == [A.LOST, A.LOST]


def test_run_tasks_own_retry_for_a_database_error_closes_the_attempt_with_that_error(db, builtin_agents):
    """The message sent again carries the error the database answered (run_task): the attempt it
    left running is closed lost with that error's class and message, cause database_error, and
    spends a retry as a lost connection does."""
    from django.db import OperationalError, connection, transaction

    from orchestration.db import database_error_described, database_unreachable

    with pytest.raises(OperationalError) as raised, transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL statement_timeout = 1")
        cursor.execute("SELECT pg_sleep(1)")
    assert not database_unreachable(raised.value)
    met = database_error_described(raised.value)
    assert met == {
        "error_class": "psycopg.errors.QueryCanceled",
        "error": "QueryCanceled: canceling statement due to statement timeout",
    }
    wf = submit({"name": "timed", "agent": "echo", "max_retries": 1})
    t = task(wf, "timed")
    attempt_claim(execution_id=t.execution_id, celery_task_id=t.celery_task_id, worker="w1@h")
    met = {"cause": "database_error", **met, "attempt_number": 1}  # of the attempt the delivery had started
    second = attempt_claim(
        execution_id=t.execution_id, celery_task_id=t.celery_task_id, worker="w1@h", retried=True, sent_again=met
    )
    assert second.attempt.attempt_number == 2
    closed = attempts(wf, "timed")[0]
    assert (closed.status, closed.cause, closed.retryable) == (A.LOST, "database_error", True)
    assert closed.error_class == "psycopg.errors.QueryCanceled"
    assert closed.error == (
        "worker w1@h met a database error during attempt 1, which was not recorded (message sent again): "
        "QueryCanceled: canceling statement due to statement timeout"
    )
    t.refresh_from_db()
    assert (t.status, t.retry_count) == (T.RUNNING, 1)

    # The same message again, redelivered after the worker running attempt 2 was lost (it cannot
    # answer): the error it carries was attempt 1's, not attempt 2's.
    attempt_claim(
        execution_id=t.execution_id,
        celery_task_id=t.celery_task_id,
        worker="w2@h",
        redelivered=True,
        retried=True,
        sent_again=met,
    )
    later = attempts(wf, "timed")[1]
    assert (later.attempt_number, later.status, later.cause, later.error_class) == (2, A.LOST, "worker_lost", "")


def test_a_record_of_an_earlier_attempt_closes_the_running_one_as_lost_with_its_worker(db, builtin_agents):
    """run_task's message names the attempt its delivery left running (attempt 1, lost connection);
    the next delivery started attempt 2 and was lost with its worker; the broker redelivered the
    message to a worker whose claim lost its connection before it committed, which sent the
    record on as it was. The next delivery (retried, not redelivered) finds attempt 2 running:
    its worker was lost, not its database connection."""
    wf = submit({"name": "t", "agent": "echo", "max_retries": 3})
    t = task(wf, "t")
    ids = {"execution_id": t.execution_id, "celery_task_id": t.celery_task_id}
    attempt_claim(**ids, worker="w1@h")
    record = {"cause": "connection_lost", "attempt_number": 1}
    assert attempt_claim(**ids, worker="w1@h", retried=True, sent_again=record).attempt.attempt_number == 2
    assert attempt_claim(**ids, worker="w2@h", retried=True, sent_again=record).attempt.attempt_number == 3
    first, second, _ = attempts(wf, "t")
    assert (first.status, first.cause) == (A.LOST, "connection_lost")
    assert (second.status, second.cause) == (A.LOST, "worker_lost"), second.error
    assert second.error == "worker w1@h was lost during attempt 2 (message redelivered)"


def test_a_header_that_an_earlier_releases_retry_carried_on_is_not_read():
    """Celery keeps a message's headers when a task retries: a worker of an earlier release that
    sends the message again carries this release's header on unchanged, about another delivery.
    Its `retries` is not the message's: not read (the earlier release's keyword argument is)."""
    from celery.app.task import Context

    from orchestration.tasks import SENT_AGAIN_HEADER, _sent_again

    header = {"cause": "connection_lost", "attempt_number": 1, "retries": 1}
    assert _sent_again(Context(headers={SENT_AGAIN_HEADER: header}, retries=1), None) == {
        "cause": "connection_lost",
        "attempt_number": 1,
    }
    assert _sent_again(Context(headers={SENT_AGAIN_HEADER: header}, retries=2), None) is None
    old = {"error_class": "psycopg.errors.LockNotAvailable", "error": "LockNotAvailable: x", "attempt_number": 2}
    assert _sent_again(Context(headers={SENT_AGAIN_HEADER: header}, retries=2), old) == {
        **old,
        "cause": "database_error",
    }
    assert _sent_again(Context(headers={SENT_AGAIN_HEADER: "?"}, retries=1), None) is None


def test_a_sent_again_record_out_of_its_domain_is_not_read():
    """A record as run_task writes it is read with its known keys only; one that says what
    run_task never writes (a tampered message, a later release's other shape) is not read at all,
    nothing of it reaching the attempt's record: an attempt number that is not a positive integer
    (a boolean is not one), an error class or message that is not text, longer than an attempt
    records or holding a NUL, a `retries` that is not the message's integer."""
    from celery.app.task import Context

    from orchestration.db import sent_again_read
    from orchestration.errors import ERROR_CLASS_MAX_LENGTH
    from orchestration.tasks import SENT_AGAIN_HEADER, _sent_again

    met = {"cause": "database_error", "error_class": "psycopg.errors.DiskFull", "error": "DiskFull: no space"}
    assert sent_again_read({**met, "attempt_number": 3, "padding": "z" * 10_000}) == {**met, "attempt_number": 3}
    assert sent_again_read({"cause": "connection_lost", "attempt_number": None, "error": "?"}) == {
        "cause": "connection_lost",
        "attempt_number": None,
    }
    for bad in (
        {**met, "attempt_number": True},
        {**met, "attempt_number": 0},
        {**met, "attempt_number": "1"},
        {**met, "attempt_number": 1, "error_class": "x" * (ERROR_CLASS_MAX_LENGTH + 1)},
        {**met, "attempt_number": 1, "error_class": ""},
        {**met, "attempt_number": 1, "error_class": "psycopg\x00errors"},
        {**met, "attempt_number": 1, "error": {"a": 1}},
        {**met, "attempt_number": 1, "error": "y" * 1_000_000},
        {**met, "attempt_number": 1, "error": "DiskFull: \x00"},
        {"cause": "worker_lost", "attempt_number": 1},
    ):
        assert sent_again_read(bad) is None, bad
    header = {"cause": "connection_lost", "attempt_number": 1, "retries": True}
    assert _sent_again(Context(headers={SENT_AGAIN_HEADER: header}, retries=1), None) is None


@pytest.mark.django_db(transaction=True)
def test_two_reapers_at_once_close_an_abandoned_attempt_once(builtin_agents):
    import threading

    from django.db import connection

    from orchestration.services.reaper import attempts_reap

    wf = submit({"name": "orphan", "agent": "echo", "max_retries": 1, "timeout_seconds": 1})
    t = task(wf, "orphan")
    claim = attempt_claim(execution_id=t.execution_id, celery_task_id=t.celery_task_id, worker="gone@nowhere")
    five_minutes_ago = timezone.now() - dt.timedelta(minutes=5)
    TaskAttempt.objects.filter(pk=claim.attempt.pk).update(started_at=five_minutes_ago, created_at=five_minutes_ago)
    results = []

    def reap() -> None:
        try:
            results.append(attempts_reap())
        finally:
            connection.close()

    threads = [threading.Thread(target=reap) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(len(r.lost) for r in results) == 1
    [attempt] = attempts(wf, "orphan")
    assert (attempt.status, attempt.cause) == (A.LOST, "worker_lost")
    t.refresh_from_db()
    assert (t.status, t.retry_count) == (T.RETRYING, 1)
    retrying = Event.objects.filter(entity_id=t.execution_id, event_type="task_retrying").count()
    assert retrying == 1
    flush_redis()


def test_the_sweeper_leaves_a_task_just_deferred_for_its_agent(db, builtin_agents, settings):
    """Deferred past DISPATCH_SWEEP_AFTER_SECONDS of waiting, between the deferral's commit and its
    message's send (inside this test's transaction the send never happens, so the real broker
    holds no message for it): the message is on its way, not lost (the deferral keeps queued_at)."""
    Agent.objects.filter(pk="echo").update(max_concurrency=1)
    wf = submit({"name": "x", "agent": "echo"}, {"name": "y", "agent": "echo"})
    x, y = task(wf, "x"), task(wf, "y")
    attempt_claim(execution_id=y.execution_id, celery_task_id=y.celery_task_id, worker="w1@h")
    waited = dt.timedelta(seconds=settings.DISPATCH_SWEEP_AFTER_SECONDS + 5)
    TaskExecution.objects.filter(pk=x.pk).update(queued_at=timezone.now() - waited)
    assert attempt_claim(execution_id=x.execution_id, celery_task_id=x.celery_task_id, worker="w2@h") == (
        Outcome.DEFERRED
    )
    assert queued_sweep() == []


def test_a_task_deferred_before_its_workflow_was_cancelled_is_not_taken_for_one_deferred_once_resumed(
    db, builtin_agents, settings
):
    """A resume (or a retry) sends the task a message of its own, due at once: the deferral it had
    before the cancel is over. Kept, it hid the new message's loss from the sweeper (inside this
    test's transaction the send never happens, as when the broker is down) until that deferral's
    end was as old as DISPATCH_SWEEP_AFTER_SECONDS, and put the task in its agent's line."""
    Agent.objects.filter(pk="echo").update(max_concurrency=1)
    wf = submit({"name": "x", "agent": "echo"}, {"name": "y", "agent": "echo"})
    x, y = task(wf, "x"), task(wf, "y")
    attempt_claim(execution_id=y.execution_id, celery_task_id=y.celery_task_id, worker="w1@h")
    assert attempt_claim(execution_id=x.execution_id, celery_task_id=x.celery_task_id, worker="w2@h") == (
        Outcome.DEFERRED
    )
    # behind a long line: its message comes back in 30 s
    TaskExecution.objects.filter(pk=x.pk).update(deferred_at=timezone.now() + dt.timedelta(seconds=30))
    workflow_cancel(workflow_id=wf.pk)
    workflow_resume(workflow_id=wf.pk)
    x.refresh_from_db()
    assert (x.status, x.deferred_at) == (T.QUEUED, None)
    later = x.queued_at + dt.timedelta(seconds=settings.DISPATCH_SWEEP_AFTER_SECONDS + 1)
    assert sorted(queued_sweep(now=later)) == sorted([x.pk, y.pk])


def test_delivery_count_after_a_connection_lost_resend_then_a_redelivery(db, builtin_agents):
    """run_task sends its own message again (same id) when its database connection breaks;
    the broker may then redeliver that message after a lost worker. The counts of one id
    must go up one at a time (1, 2, 3) - or count the resent message afresh (1, 1, 2) - not
    1 then 3, which says a delivery happened that no try recorded."""
    wf = submit({"name": "flaky", "agent": "echo", "max_retries": 3})
    t = task(wf, "flaky")
    first = attempt_claim(execution_id=t.execution_id, celery_task_id=t.celery_task_id, worker="w1@h")
    assert first.attempt.attempt_number == 1
    resent = attempt_claim(execution_id=t.execution_id, celery_task_id=t.celery_task_id, worker="w1@h", retried=True)
    assert resent.attempt.attempt_number == 2
    again = attempt_claim(
        execution_id=t.execution_id, celery_task_id=t.celery_task_id, worker="w2@h", retried=True, redelivered=True
    )
    assert again.attempt.attempt_number == 3
    counts = [a.delivery_count for a in attempts(wf, "flaky")]
    assert counts in ([1, 2, 3], [1, 1, 2]), counts


@pytest.mark.django_db(transaction=True)
def test_two_sweeps_at_once_send_a_lost_message_once(builtin_agents, monkeypatch):
    """A re-sent task keeps its first queued_at, so between the first sweep's commit and its
    publish (a slow broker: here it waits for the second sweep to end) a second sweep found it
    lost too and sent it again: two messages for one task. One sweep runs at a time now (a lock
    in the broker, released when it ends); the other returns at once."""
    import threading

    from django.db import connection

    from orchestration.services import dispatch, reaper

    flush_redis()
    wf = submit({"name": "a", "agent": "echo"})
    flush_redis()  # the message never reached the broker
    TaskExecution.objects.filter(workflow=wf).update(queued_at=timezone.now() - dt.timedelta(minutes=5))
    send = dispatch.dispatch_send
    sending, second_done = threading.Event(), threading.Event()

    def slow_send(dispatches):
        if threading.current_thread() is first:  # committed, not yet sent: until the second sweep ends
            sending.set()
            second_done.wait(10)
        send(dispatches)

    monkeypatch.setattr(dispatch, "dispatch_send", slow_send)
    swept: dict[str, list[str]] = {}

    def sweep(name: str) -> None:
        try:
            swept[name] = queued_sweep()
        finally:
            connection.close()
            if name == "second":
                second_done.set()

    first = threading.Thread(target=sweep, args=("first",))
    first.start()
    assert sending.wait(10), "the first sweep did not send"
    second = threading.Thread(target=sweep, args=("second",))
    second.start()
    first.join()
    second.join()
    assert swept == {"first": [task(wf, "a").execution_id], "second": []}
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    assert client.llen("normal") == 1
    assert not client.exists(reaper.SWEEP_LOCK), "the lock outlived its sweep"
    assert queued_sweep() == [], "the re-sent message is in the queue"


@pytest.mark.django_db(transaction=True)
def test_a_sweep_cut_off_by_a_broker_restart_holds_off_the_next_ones_for_seconds_not_minutes(
    builtin_agents, monkeypatch, tmp_path
):
    """A sweep holds a lock in the broker while it runs. A broker restarted under it (one that
    keeps its data, as a durable broker does) refuses the release, and the lock, back from disk,
    held off every sweep for its whole 120 s: a message lost meanwhile waited two minutes more to
    be sent again (the chaos soak's drain waited for it). The lock is a lease of a few seconds
    now, renewed by the sweep as it goes."""
    from orchestration.services import reaper
    from tests.engine import PrivateRedis, use_broker

    broker = PrivateRedis(tmp_path, keep_data=True)
    use_broker(monkeypatch, broker.url, environment=False)
    try:
        wf = submit({"name": "a", "agent": "echo"})
        client = redis.Redis.from_url(broker.url)
        client.delete("normal")  # the message was lost
        TaskExecution.objects.filter(workflow=wf).update(queued_at=timezone.now() - dt.timedelta(minutes=5))
        lost = task(wf, "a")

        def cut_off(**kwargs):
            broker.stop()
            raise redis.ConnectionError("the broker went away under the sweep")

        with monkeypatch.context() as during:
            during.setattr(reaper, "_queued_sweep", cut_off)
            with pytest.raises(redis.ConnectionError):
                queued_sweep()
        broker.start()
        assert client.exists(reaper.SWEEP_LOCK), "the lock came back with the broker's data"

        started = time.monotonic()
        wait_for(lambda: queued_sweep() == [lost.execution_id], timeout=25, interval=0.5, what="a sweep to run")
        assert time.monotonic() - started < 25
        assert task(wf, "a").celery_task_id != lost.celery_task_id
    finally:
        broker.stop()


@pytest.mark.django_db(transaction=True)
def test_a_held_message_is_asked_about_only_once_its_countdown_has_ended(builtin_agents, monkeypatch):
    """A message a worker holds unacknowledged until its ETA (a retry's backoff) is where it
    belongs until then: the sweeper neither asks the workers about it on every pass (a broadcast
    that waits its whole timeout) nor re-sends it early. Past its ETA it asks, and re-sends it
    when no live worker holds it."""
    from orchestration.services import reaper

    flush_redis()
    wf = submit({"name": "a", "agent": "echo"})
    flush_redis()
    now = timezone.now()
    TaskExecution.objects.filter(workflow=wf).update(queued_at=now - dt.timedelta(minutes=5))
    held = task(wf, "a")
    eta = now + dt.timedelta(seconds=300)
    message = {
        "body": "",
        "headers": {"id": held.celery_task_id, "task": "orchestration.run_task", "eta": eta.isoformat()},
    }
    redis.Redis.from_url(settings.CELERY_BROKER_URL).hset("unacked", "tag-1", json.dumps([message, "", "normal"]))
    asked: list[set[str]] = []
    monkeypatch.setattr(reaper, "workers_holding", lambda ids: asked.append(set(ids)) or set())
    assert queued_sweep(now=now) == []
    assert asked == [] and task(wf, "a").celery_task_id == held.celery_task_id
    assert queued_sweep(now=eta + dt.timedelta(seconds=1)) == [held.execution_id]
    assert asked == [{held.celery_task_id}]
    assert task(wf, "a").celery_task_id != held.celery_task_id
    flush_redis()
