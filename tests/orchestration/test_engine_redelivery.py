"""A worker that lives on but loses its broker connection mid-task: kombu restores the
unacknowledged message and the broker delivers it again while the first try is recorded
running (real workers, their Redis connections closed on the server)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from django.conf import settings

from orchestration.models import Agent, Event, TaskAttempt, TaskExecution, Workflow
from orchestration.services.reaper import queued_sweep
from orchestration.services.workflows import workflow_submit
from tests.engine import RESULT_WRITE_NOT_RETRIED, PrivateRedis, flush_redis, use_broker, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

A = TaskAttempt.Status
RUNS_ON = {"CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS": "false"}
# What the held agent reports: 10 tokens ($0.001) metered at once, 120 ($0.0123) in all at its end.
METERED = (10, Decimal("0.001000"))
WHOLE = (120, Decimal("0.012300"))


@pytest.fixture
def held(engine: object, tmp_path: Path) -> Path:
    """The held agent (tests/orchestration/edge_agents.py); its first try waits for the file returned."""
    Agent.objects.create(
        id="held", name="Held", executor=Agent.Executor.PYTHON, entrypoint="tests.orchestration.edge_agents.held"
    )
    return tmp_path / "release"


@pytest.fixture
def broker(engine: object, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[PrivateRedis]:
    """A Redis of the test's own as the broker, to restart empty (it keeps nothing on disk); the
    suite's again after the test (its workers stopped first: requested after `engine`)."""

    private = PrivateRedis(tmp_path)
    use_broker(monkeypatch, private.url)
    assert settings.DISPATCH_SWEEP_AFTER_SECONDS == 60
    yield private
    monkeypatch.undo()  # the suite's broker again, for the flush after the test
    private.stop()


def submit(release: Path) -> Workflow:
    workflow, _ = workflow_submit(
        spec={
            "name": "redelivered",
            "tasks": [
                {"name": "t", "agent": "held", "input": {"release": str(release)}, "max_retries": 2},
                {"name": "after", "agent": "echo", "depends_on": ["t"]},
            ],
        }
    )
    return workflow


def tries(workflow: Workflow) -> list[TaskAttempt]:
    return list(TaskAttempt.objects.filter(execution__workflow=workflow, execution__task_name="t"))


def running_first(workflow: Workflow) -> TaskAttempt:
    return wait_for(
        lambda: TaskAttempt.objects.filter(execution__workflow=workflow, attempt_number=1, status=A.RUNNING).first(),
        what="the first try to run",
    )


def cut_and_claimed_again(worker, wf) -> None:
    """Cut the worker's broker connections and wait for the redelivered message's claim."""
    assert worker.broker_connections_cut()
    wait_for(
        lambda: "this delivery is a duplicate" in worker.log() or len(tries(wf)) > 1,
        timeout=30,
        what="the redelivered message to be claimed",
    )


def finished(workflow: Workflow) -> Workflow:
    return wait_for(
        lambda: (w := Workflow.objects.get(pk=workflow.pk)).is_terminal and w, timeout=60, what="the workflow to end"
    )


def events(workflow: Workflow) -> list[Event]:
    execution_id = TaskExecution.objects.get(workflow=workflow, task_name="t").pk
    return list(Event.objects.filter(entity_id=execution_id).order_by("sequence"))


def test_a_try_its_worker_stopped_for_a_lost_broker_connection_is_recorded_redelivered_not_lost(engine, held):
    """Our configuration: the worker stops the try it can no longer acknowledge (Celery's
    worker_cancel_long_running_tasks_on_connection_loss) and lives on. The redelivered message
    records that (cause redelivery, not a lost worker) and runs the next try."""
    worker = engine(concurrency=2)
    wf = submit(held)
    running_first(wf)
    assert worker.broker_connections_cut()
    wf = finished(wf)
    assert wf.status == Workflow.Status.COMPLETED and wf.completed_steps == 2
    first, second = tries(wf)
    assert [(a.attempt_number, a.status, a.cause) for a in (first, second)] == [
        (1, A.LOST, "redelivery"),
        (2, A.SUCCEEDED, None),
    ]
    assert f"worker {worker.name} lost its broker connection during attempt 1 and stopped it" in first.error
    assert first.worker_pid == second.worker_pid == worker.process.pid  # one worker process throughout
    assert (first.tokens_used, first.cost_usd) == METERED  # what the stopped try had paid
    assert (second.redelivered, second.delivery_count) == (True, 2)
    t = TaskExecution.objects.get(workflow=wf, task_name="t")
    assert (t.output_data, t.retry_count, t.tokens_used) == ({"attempt": 2}, 1, METERED[0] + WHOLE[0])
    assert wf.wasted_cost_usd == METERED[1]
    [lost] = [e for e in events(wf) if e.event_type == "task_lost"]
    assert lost.payload["cause"] == "redelivery"
    assert [e.event_type for e in events(wf)].count("task_completed") == 1


def test_a_try_still_running_when_its_message_is_redelivered_runs_once_and_keeps_its_record(engine, held):
    """A worker that lets its tries run on through a lost broker connection: the redelivered
    message finds its try still running in the same worker process and runs nothing. The try
    finishes and records its own outcome, with all it spent; the task runs once."""
    worker = engine(concurrency=2, env=RUNS_ON)
    wf = submit(held)
    first = running_first(wf)
    cut_and_claimed_again(worker, wf)
    assert [a.attempt_number for a in tries(wf)] == [1], "a second try started beside the running one"
    held.touch()
    wf = finished(wf)
    assert wf.status == Workflow.Status.COMPLETED and wf.completed_steps == 2
    [only] = tries(wf)
    assert (only.pk, only.status, only.cause) == (first.pk, A.SUCCEEDED, None)
    assert (only.tokens_used, only.cost_usd) == WHOLE
    t = TaskExecution.objects.get(workflow=wf, task_name="t")
    assert (t.output_data, t.retry_count, t.tokens_used, t.cost_usd) == ({"attempt": 1}, 0, *WHOLE)
    assert (wf.total_cost_usd, wf.wasted_cost_usd) == (WHOLE[1], 0)
    kinds = [e.event_type for e in events(wf)]
    assert (kinds.count("task_started"), kinds.count("task_completed"), kinds.count("task_lost")) == (1, 1, 0)


def test_a_superseded_try_that_finishes_later_keeps_its_spend_and_completes_nothing(engine, held):
    """When the worker cannot tell (here: an attempt recorded before worker processes were), the
    redelivered message presumes the try lost and runs the next. The first try still finishes:
    its outcome is not recorded over the task's, but what it reported spending is added to its
    attempt, task and workflow (wasted), not dropped, and how it ended is an event."""
    worker = engine(concurrency=2, env=RUNS_ON)
    wf = submit(held)
    first = running_first(wf)
    unknown = {"worker_pid": None, "worker_started_at": None, "pool_pid": None}
    assert TaskAttempt.objects.filter(pk=first.pk, status=A.RUNNING).update(**unknown) == 1
    assert worker.broker_connections_cut()
    wf = finished(wf)
    assert wf.status == Workflow.Status.COMPLETED
    assert [(a.attempt_number, a.status, a.cause) for a in tries(wf)] == [
        (1, A.LOST, "worker_lost"),
        (2, A.SUCCEEDED, None),
    ]
    held.touch()
    ended = f"orchestration.run_task[{first.celery_task_id}] succeeded"
    wait_for(lambda: worker.log().count(ended) == 2, timeout=30, what="the first try to end")
    first.refresh_from_db()
    assert (first.status, first.cause) == (A.LOST, "worker_lost")
    assert (first.tokens_used, first.cost_usd) == WHOLE
    t = TaskExecution.objects.get(workflow=wf, task_name="t")
    assert (t.status, t.output_data) == (TaskExecution.Status.COMPLETED, {"attempt": 2})
    assert (t.tokens_used, t.cost_usd) == (2 * WHOLE[0], 2 * WHOLE[1])
    wf.refresh_from_db()
    assert (wf.completed_steps, wf.total_cost_usd, wf.wasted_cost_usd) == (2, 2 * WHOLE[1], WHOLE[1])
    assert [e.event_type for e in events(wf)].count("task_completed") == 1
    # How the first try really ended is on record beside its lost attempt.
    [late] = [e for e in events(wf) if e.event_type == "task_ended_late"]
    assert (late.payload["attempt"], late.payload["closed_as"], late.payload["cause"]) == (1, A.LOST, "worker_lost")
    assert late.payload["outcome"] == "succeeded" and "error" not in late.payload
    assert late.payload["late_usage"] == {"input_tokens": 90, "output_tokens": 20, "cost_usd": "0.011300"}


def test_a_message_once_sent_again_by_run_task_still_asks_the_worker_when_the_broker_redelivers_it(engine, held):
    """run_task sends its message again (same id, retries=1) after a lost database connection;
    that message keeps its retries count through later deliveries. When the broker then
    redelivers it while its try still runs, the claim asks the worker as for any redelivered
    message: the try still runs, the delivery runs nothing (not a second try beside it, recorded
    as a lost database connection)."""
    import redis
    from django.conf import settings

    from orchestration.tasks import run_task

    wf = submit(held)
    t = TaskExecution.objects.get(workflow=wf, task_name="t")
    # The message as run_task's own retry sends it: same id, retries 1 (no worker runs yet).
    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    assert broker.delete(t.priority) == 1
    run_task.apply_async(args=[t.pk], task_id=t.celery_task_id, queue=t.priority, routing_key=t.priority, retries=1)
    worker = engine(concurrency=2, env=RUNS_ON)
    first = running_first(wf)
    cut_and_claimed_again(worker, wf)
    assert [(a.attempt_number, a.status) for a in tries(wf)] == [(1, A.RUNNING)], "a second try started"
    held.touch()
    wf = finished(wf)
    assert wf.status == Workflow.Status.COMPLETED
    [only] = tries(wf)
    assert (only.pk, only.status) == (first.pk, A.SUCCEEDED)


def test_a_message_once_sent_again_by_run_task_records_what_its_worker_says_when_redelivered(engine, held):
    """The same message (retries=1, as run_task sends it again after a lost database
    connection) claims a try normally; its worker then loses its broker connection and stops
    that try. The redelivered message's claim records what the worker said (redelivery), not a
    lost database connection the try never had."""
    import redis
    from django.conf import settings

    from orchestration.tasks import run_task

    wf = submit(held)
    t = TaskExecution.objects.get(workflow=wf, task_name="t")
    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    assert broker.delete(t.priority) == 1
    run_task.apply_async(args=[t.pk], task_id=t.celery_task_id, queue=t.priority, routing_key=t.priority, retries=1)
    worker = engine(concurrency=2)
    running_first(wf)
    assert worker.broker_connections_cut()
    wf = finished(wf)
    assert wf.status == Workflow.Status.COMPLETED
    first, second = tries(wf)
    assert [(a.attempt_number, a.status, a.cause) for a in (first, second)] == [
        (1, A.LOST, "redelivery"),
        (2, A.SUCCEEDED, None),
    ]
    assert "lost its database connection" not in first.error
    assert f"worker {worker.name} lost its broker connection during attempt 1 and stopped it" in first.error


def test_a_message_sent_again_naming_no_running_attempt_asks_its_worker_and_runs_nothing_beside_it(engine, held):
    """A delivery that started no attempt (its claim lost its database connection or met a
    database error) sends its message on naming none: the attempt still running is another
    delivery's, perhaps still running (here: the first delivery's, on a live worker). The next
    delivery asks that attempt's worker as a redelivered message's does, and runs nothing
    beside it, where it closed the live attempt `worker_lost` and ran a second try at once."""
    from orchestration.tasks import SENT_AGAIN_HEADER, run_task

    worker = engine(concurrency=2, env=RUNS_ON)
    wf = submit(held)
    first = running_first(wf)
    t = TaskExecution.objects.get(workflow=wf, task_name="t")
    record = {"cause": "connection_lost", "attempt_number": None, "retries": 1}
    run_task.apply_async(
        args=[t.pk],
        task_id=t.celery_task_id,
        queue=t.priority,
        routing_key=t.priority,
        retries=1,
        headers={SENT_AGAIN_HEADER: record},
    )
    wait_for(lambda: "this delivery is a duplicate" in worker.log() or len(tries(wf)) > 1, timeout=30, what="a claim")
    assert [(a.attempt_number, a.status) for a in tries(wf)] == [(1, A.RUNNING)], "a second try started"
    held.touch()
    wf = finished(wf)
    assert wf.status == Workflow.Status.COMPLETED
    [only] = tries(wf)
    assert (only.pk, only.status, only.cause) == (first.pk, A.SUCCEEDED, None)


def test_a_try_its_worker_stopped_when_redis_restarted_empty_is_closed_by_the_next_sweep(engine, held, settings):
    """Redis restarted empty under a running try (its data dropped, every connection broken):
    the worker stops the try and its unacknowledged message is gone, so no delivery comes back
    to close it. The dispatch sweep finds the message neither queued nor unacknowledged, asks
    the worker and closes the try at once (lost, redelivery), and the next one runs. The reaper
    closed it only past its hard limit plus the grace (302 s here, 340 s for the default
    timeout), the task held running, its dependent waiting and its agent's slot taken meanwhile."""
    settings.DISPATCH_SWEEP_AFTER_SECONDS = 1  # the sweep looks for the tries running longer
    worker = engine(concurrency=2)
    wf = submit(held)
    first = running_first(wf)
    flush_redis()
    assert worker.broker_connections_cut()
    wait_for(lambda: "cannot be acknowledged after a connection loss" in worker.log(), what="the try to be stopped")
    started = time.monotonic()

    def closed() -> bool:
        queued_sweep()
        return TaskAttempt.objects.get(pk=first.pk).status != A.RUNNING

    wait_for(closed, timeout=30, interval=0.5, what="the stopped try to be closed")
    assert time.monotonic() - started < 30
    wf = finished(wf)
    assert wf.status == Workflow.Status.COMPLETED and wf.completed_steps == 2
    first, second = tries(wf)
    assert [(a.attempt_number, a.status, a.cause) for a in (first, second)] == [
        (1, A.LOST, "redelivery"),
        (2, A.SUCCEEDED, None),
    ]
    assert first.error.endswith("its message is gone from the broker"), first.error
    assert TaskExecution.objects.get(workflow=wf, task_name="t").retry_count == 1


def test_a_try_running_on_when_redis_restarted_empty_is_left_to_run_whatever_its_message_ended_as_before(
    engine, settings
):
    """run_task sent its message again (same id) when attempt 1 lost its database connection,
    and the worker remembers that ending of the message; the next delivery runs attempt 2 in the
    same worker process. Redis then restarts empty under it, and the worker lets it run on: the
    sweep finds its message gone, and the worker says it runs there now. The try is left to
    record its own outcome, where the sweep closed it for attempt 1's lost connection and a
    third try ran beside it."""
    from orchestration.workers import workers_ask

    worker = engine(concurrency=2, env={**RUNS_ON, **RESULT_WRITE_NOT_RETRIED})
    spec = {"name": "t", "agent": "sleep", "input": {"seconds": 8, "on_attempts": [1, 2]}, "max_retries": 3}
    wf, _ = workflow_submit(spec={"name": "cut", "tasks": [spec]})
    running_first(wf)
    assert worker.database_connections_cut()
    second = wait_for(
        lambda: TaskAttempt.objects.filter(execution__workflow=wf, attempt_number=2, status=A.RUNNING).first(),
        timeout=30,
        what="the second try to run",
    )
    flush_redis()
    assert worker.broker_connections_cut()
    wait_for(lambda: (workers_ask({worker.name}, set()) or {}).get(worker.name), what="the worker to answer again")
    settings.DISPATCH_SWEEP_AFTER_SECONDS = 1
    time.sleep(1.5)  # the try has run longer than that: the sweep looks for its message
    queued_sweep()
    assert [(a.attempt_number, a.status) for a in tries(wf)] == [(1, A.LOST), (2, A.RUNNING)], tries(wf)[1].error
    wf = finished(wf)
    assert wf.status == Workflow.Status.COMPLETED
    assert [(a.attempt_number, a.status, a.cause) for a in tries(wf)] == [
        (1, A.LOST, "connection_lost"),
        (2, A.SUCCEEDED, None),
    ]
    assert second.celery_task_id == tries(wf)[0].celery_task_id  # one message throughout


def test_after_redis_restarted_empty_the_next_sweeps_send_again_what_it_lost_not_a_minute_later(engine, broker):
    """Redis, the broker, restarts empty (no persistence) just after a workflow was submitted:
    the queued task's message and the running try's are gone, and the worker stops the try. The
    sweep looked only at tasks queued, and tries started, DISPATCH_SWEEP_AFTER_SECONDS before
    (a message may still be on its way for a younger one), so the workflow stood still for a
    minute with its worker idle (70 s for 8 s of work). A sweep that finds the broker restarted
    since its last pass knows what was queued before is lost: it is sent again, and the stopped
    try closed, at once; each task still completes once."""
    worker = engine(concurrency=1)
    try:
        queued_sweep()  # the beat's sweeps every few seconds: one has seen this broker
        sleeping = {"agent": "sleep", "input": {"seconds": 3}}
        wf, _ = workflow_submit(
            spec={
                "name": "restarted",
                "tasks": [
                    {"name": "first", **sleeping},
                    {"name": "second", **sleeping},
                    {"name": "after", "agent": "echo", "depends_on": ["first", "second"]},
                ],
            }
        )
        running = wait_for(
            lambda: TaskAttempt.objects.filter(execution__workflow=wf, status=A.RUNNING).first(),
            what="a try to run",
        )
        broker.restart()
        back = time.monotonic()

        def ended() -> bool:
            queued_sweep()
            return Workflow.objects.get(pk=wf.pk).is_terminal

        wait_for(ended, timeout=40, interval=1, what="the workflow to end")
        assert time.monotonic() - back < 40
        assert Workflow.objects.get(pk=wf.pk).status == Workflow.Status.COMPLETED
        attempts = TaskAttempt.objects.filter(execution__workflow=wf)
        assert sorted((a.execution.task_name, a.status) for a in attempts if a.status != A.LOST) == [
            ("after", A.SUCCEEDED),
            ("first", A.SUCCEEDED),
            ("second", A.SUCCEEDED),
        ]
        [stopped] = [a for a in attempts if a.status == A.LOST]
        assert (stopped.pk, stopped.cause) == (running.pk, "redelivery")
    finally:
        worker.stop()


def test_a_retry_whose_countdown_ran_when_redis_restarted_empty_is_sent_again_once_it_ends(engine, broker):
    """The try fails, retryable, and its retry is sent with a countdown (the provider's
    Retry-After); Redis, the broker, restarts empty during it. The worker that held the retry's
    message drops it with its broken connection (Celery cancels the countdowns it holds), and the
    broker has lost it. The sweep that found the restart looked only at tasks queued before it,
    and a retry's queued_at is when its countdown ends, after the restart: the task waited,
    retrying, DISPATCH_SWEEP_AFTER_SECONDS past its countdown with its worker idle (62 s for a
    2 s backoff). Sent again once its countdown has ended, it completes once."""
    Agent.objects.create(
        id="busy",
        name="Busy",
        executor=Agent.Executor.PYTHON,
        entrypoint="tests.orchestration.edge_agents.busy_provider",
    )
    worker = engine(concurrency=1)
    try:
        queued_sweep()  # the beat's sweeps every few seconds: one has seen this broker
        wf, _ = workflow_submit(
            spec={
                "name": "retry lost",
                "tasks": [{"name": "t", "agent": "busy", "input": {"retry_after": 2}, "max_retries": 1}],
            }
        )
        task = wait_for(
            lambda: TaskExecution.objects.filter(workflow=wf, status=TaskExecution.Status.RETRYING).first(),
            interval=0.02,
            what="the first try to fail and its retry to be sent",
        )
        broker.restart()
        assert queued_sweep() == []  # the countdown runs: its message is not missed yet
        back = time.monotonic()

        def ended() -> bool:
            queued_sweep()
            return Workflow.objects.get(pk=wf.pk).is_terminal

        wait_for(ended, timeout=30, interval=1, what="the retry to run and the workflow to end")
        assert time.monotonic() - back < 30
        assert Workflow.objects.get(pk=wf.pk).status == Workflow.Status.COMPLETED
        assert [(a.attempt_number, a.status) for a in TaskAttempt.objects.filter(execution=task)] == [
            (1, A.FAILED),
            (2, A.SUCCEEDED),
        ]
    finally:
        worker.stop()


def test_a_sweep_in_a_process_started_after_redis_restarted_empty_sends_again_what_it_lost(engine, broker):
    """Redis, the broker, restarts empty with the task's message in its queue; the sweep that
    follows runs in a process that never read the broker before: an operator's
    `reap_stale_tasks`, or a worker restarted with Redis (a host's reboot). Only a process that
    had read the server's run_id before it restarted could tell (`_broker_runs`): this one
    re-sent nothing ("re-sent: 0"), and the task waited DISPATCH_SWEEP_AFTER_SECONDS with idle
    workers. The server's own uptime tells any process when it started."""
    from tests.engine import database_url, manage

    wf, _ = workflow_submit(spec={"name": "lost", "tasks": [{"name": "t", "agent": "echo"}]})
    task = TaskExecution.objects.get(workflow=wf)
    assert task.status == TaskExecution.Status.QUEUED
    broker.restart()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": database_url(),
        "CELERY_BROKER_URL": broker.url,
    }
    out = manage("reap_stale_tasks", env=env).stdout
    assert "re-sent: 1" in out, out
    worker = engine(concurrency=1)
    try:
        wait_for(lambda: Workflow.objects.get(pk=wf.pk).is_terminal, timeout=30, what="the workflow to end")
    finally:
        worker.stop()
    assert Workflow.objects.get(pk=wf.pk).status == Workflow.Status.COMPLETED
    assert [a.status for a in TaskAttempt.objects.filter(execution=task)] == [A.SUCCEEDED]
