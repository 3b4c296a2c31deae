"""Execution on real Celery workers (subprocesses, prefork pool) against the test
PostgreSQL database and Redis. No eager mode anywhere."""

from __future__ import annotations

import itertools
import re
import time
from decimal import Decimal

import pytest

from orchestration.errors import TransitionError
from orchestration.models import Agent, Event, TaskAttempt, TaskExecution, Workflow
from orchestration.services.reaper import attempts_reap
from orchestration.services.workflows import task_retry, workflow_cancel, workflow_resume, workflow_submit
from tests.engine import (
    RESULT_WRITE_NOT_RETRIED,
    database_connections_refused,
    database_url,
    longer_hard_grace,
    wait_for,
)
from tests.orchestration.edge_agents import edge_agent

pytestmark = pytest.mark.django_db(transaction=True)

A = TaskAttempt.Status
T = TaskExecution.Status


def submit(*tasks: dict, **fields: object) -> Workflow:
    workflow, _ = workflow_submit(spec={"name": "test", **fields, "tasks": list(tasks)})
    return workflow


def finished(workflow: Workflow, timeout: float = 40) -> Workflow:
    return wait_for(
        lambda: (w := Workflow.objects.get(pk=workflow.pk)).is_terminal and w,
        timeout=timeout,
        what=f"workflow {workflow.pk} to finish",
    )


def task(workflow: Workflow, name: str) -> TaskExecution:
    return TaskExecution.objects.get(workflow=workflow, task_name=name)


def attempts(workflow: Workflow, name: str) -> list[TaskAttempt]:
    return list(TaskAttempt.objects.filter(execution__workflow=workflow, execution__task_name=name))


def event_types(entity_id: str) -> list[str]:
    return list(Event.objects.filter(entity_id=entity_id).order_by("sequence").values_list("event_type", flat=True))


def running_attempt(workflow: Workflow, name: str) -> TaskAttempt:
    return wait_for(
        lambda: (
            TaskAttempt.objects.filter(execution__workflow=workflow, execution__task_name=name, status=A.RUNNING)
            .order_by("-attempt_number")
            .first()
        ),
        what=f"{name} to be running",
    )


@pytest.mark.parametrize("fast_path", ["true", "false"], ids=["fast-path", "general-path"])
def test_dag_fans_out_and_in_with_upstream_outputs(engine, fast_path):
    engine(env={"ENGINE_FAST_PATH": fast_path})
    wf = submit(
        {"name": "a", "agent": "echo", "input": {"n": 1}},
        {"name": "b", "agent": "echo", "input": {"n": 2}, "depends_on": ["a"]},
        {"name": "c", "agent": "echo", "input": {"n": 3}, "depends_on": ["a"]},
        {"name": "d", "agent": "echo", "depends_on": ["b", "c"]},
    )
    wf = finished(wf)
    assert wf.status == Workflow.Status.COMPLETED
    assert (wf.total_steps, wf.completed_steps, wf.failed_steps, wf.error_count) == (4, 4, 0, 0)
    assert wf.duration_ms == round((wf.completed_at - wf.started_at).total_seconds() * 1000)
    d = task(wf, "d")
    assert d.output_data["upstream"] == {
        "b": {"echo": {"n": 2}, "upstream": {"a": {"echo": {"n": 1}}}},
        "c": {"echo": {"n": 3}, "upstream": {"a": {"echo": {"n": 1}}}},
    }
    assert set(wf.step_results) == {"a", "b", "c", "d"}
    assert [c["task"] for c in wf.checkpoints][-1] == "d"
    # d started only after both parents completed
    b, c = task(wf, "b"), task(wf, "c")
    assert d.started_at >= max(b.completed_at, c.completed_at)
    for name in "abcd":
        t = task(wf, name)
        assert [(a.attempt_number, a.status) for a in attempts(wf, name)] == [(1, A.SUCCEEDED)]
        assert event_types(t.execution_id) == ["task_queued", "task_started", "task_completed"]
        assert t.execution_time_ms == pytest.approx(attempts(wf, name)[0].duration_ms)
    assert event_types(wf.workflow_id) == ["workflow_created", "workflow_started", "workflow_completed"]


def test_a_fan_in_gets_its_upstream_outputs_in_the_order_its_depends_on_names_them(engine):
    engine(concurrency=2)
    edge_agent("names", "upstream_names")
    parents = [f"p{i:02d}" for i in range(12)]
    order = [*parents[1::2], *reversed(parents[::2])]  # neither the rows' order nor the names'
    wf = finished(
        submit(
            *({"name": name, "agent": "echo"} for name in parents),
            {"name": "join", "agent": "names", "depends_on": order},
        )
    )
    assert wf.status == Workflow.Status.COMPLETED
    assert task(wf, "join").output_data == {"names": order}


@pytest.mark.parametrize("fast_path", ["true", "false"], ids=["fast-path", "general-path"])
def test_retryable_errors_are_retried_with_backoff_and_every_attempt_is_recorded(engine, fast_path):
    engine(env={"ENGINE_FAST_PATH": fast_path})
    wf = finished(submit({"name": "f", "agent": "flaky", "input": {"fail_times": 2}, "max_retries": 3}))
    t = task(wf, "f")
    assert (t.status, t.retry_count, t.error) == (T.COMPLETED, 2, None)
    tries = attempts(wf, "f")
    assert [(a.attempt_number, a.status, a.cause) for a in tries] == [
        (1, A.FAILED, "error"),
        (2, A.FAILED, "error"),
        (3, A.SUCCEEDED, None),
    ]
    assert tries[0].error_class == "orchestration.errors.RetryableError" and tries[0].retryable is True
    assert "planned failure 1 of 2" in tries[0].error and "Traceback" in tries[0].traceback
    retrying = list(Event.objects.filter(entity_id=t.execution_id, event_type="task_retrying").order_by("sequence"))
    countdowns = [e.payload["countdown_s"] for e in retrying]
    assert len(countdowns) == 2 and all(c > 0 for c in countdowns)
    for previous, nxt, countdown in zip(tries, tries[1:], countdowns, strict=False):
        # the next try did not start before its backoff had passed
        assert (nxt.started_at - previous.finished_at).total_seconds() >= countdown - 0.01
    assert t.execution_time_ms == pytest.approx(sum(a.duration_ms for a in tries))
    assert wf.error_count == 2


@pytest.mark.parametrize(
    ("retry_after", "countdown"),
    [("1.5", 1.5), (1.5, 1.5), (10**400, 2), ("1e400", 2), ("inf", 2)],
    ids=["text", "number", "integer-too-large", "text-too-large", "infinity"],
)
def test_a_retry_after_an_agent_gives_as_text_or_past_a_float_is_honoured_not_a_failed_record(
    engine, retry_after, countdown
):
    """A python agent's RetryableError whose retry_after is the Retry-After header's text, as it
    came, or an integer too large for a float (JSON sets no limit on an integer's digits).
    Before, comparing the text with the backoff raised TypeError, and float() of the integer
    OverflowError, in the record of the failure: the try stayed running until the reaper closed
    it as a hard time-out of a process never killed (its error lost, its agent's slot held
    meanwhile: 5 s here, 340 s with the default limits), and the retry came after the backoff
    alone. A value too large (infinity) asks the longest backoff,
    TASK_RETRY_BACKOFF_MAX_SECONDS (2 s here)."""
    Agent.objects.create(
        id="busy", name="Busy", executor="python", entrypoint="tests.orchestration.edge_agents.busy_provider"
    )
    engine(concurrency=1)
    wf = submit({"name": "r", "agent": "busy", "input": {"retry_after": retry_after}, "timeout_seconds": 3})
    wf = finished(wf, timeout=20)
    assert wf.status == Workflow.Status.COMPLETED
    first, second = attempts(wf, "r")
    assert (first.status, first.cause, first.error) == (A.FAILED, "error", "RetryableError: provider busy")
    [retrying] = Event.objects.filter(entity_id=task(wf, "r").execution_id, event_type="task_retrying")
    assert retrying.payload["countdown_s"] == countdown
    assert second.status == A.SUCCEEDED
    assert (second.started_at - first.finished_at).total_seconds() >= countdown


def test_non_retryable_error_fails_at_once_and_cancels_dependents(engine):
    engine()
    wf = finished(
        submit(
            {"name": "bad", "agent": "fail", "input": {"retryable": False, "message": "no"}, "max_retries": 3},
            {"name": "after", "agent": "echo", "depends_on": ["bad"]},
        )
    )
    assert wf.status == Workflow.Status.FAILED
    assert "task bad failed" in wf.error and "PermanentError: no" in wf.error
    assert [(a.status, a.retryable) for a in attempts(wf, "bad")] == [(A.FAILED, False)]
    assert task(wf, "bad").retry_count == 0
    assert task(wf, "after").status == T.CANCELLED
    assert attempts(wf, "after") == []
    assert (wf.failed_steps, wf.completed_steps) == (1, 0)


def test_retryable_error_fails_the_task_once_retries_are_used_up(engine):
    engine()
    wf = finished(submit({"name": "bad", "agent": "fail", "input": {"retryable": True}, "max_retries": 2}))
    t = task(wf, "bad")
    assert (t.status, t.retry_count) == (T.FAILED, 2)
    assert [a.status for a in attempts(wf, "bad")] == [A.FAILED] * 3
    assert event_types(t.execution_id).count("task_retrying") == 2
    assert event_types(t.execution_id)[-1] == "task_failed"


def test_continue_on_failure_runs_independent_branches(engine):
    engine()
    wf = finished(
        submit(
            {"name": "bad", "agent": "fail", "max_retries": 0},
            {"name": "blocked", "agent": "echo", "depends_on": ["bad"]},
            {"name": "free", "agent": "echo"},
            continue_on_failure=True,
        )
    )
    assert wf.status == Workflow.Status.FAILED
    assert (task(wf, "free").status, task(wf, "blocked").status) == (T.COMPLETED, T.CANCELLED)
    assert (wf.completed_steps, wf.failed_steps) == (1, 1)


@pytest.mark.parametrize("fast_path", ["true", "false"], ids=["fast-path", "general-path"])
def test_a_failed_task_fails_the_workflow_and_lets_running_siblings_finish(engine, fast_path):
    """DESIGN §5: a failed task with no retries left fails the workflow and cancels what has
    not started. A sibling already running finishes and is recorded (its work and spend are
    not thrown away), nothing that depends on it runs, and the workflow ends failed, with the
    first failure as its error, when that sibling ends: its workflow_failed event carries the
    final state."""
    engine(env={"ENGINE_FAST_PATH": fast_path})
    wf = submit(
        {"name": "long", "agent": "sleep", "input": {"seconds": 3}},
        {"name": "after_long", "agent": "echo", "depends_on": ["long"]},
        {"name": "pause", "agent": "sleep", "input": {"seconds": 0.3}},
        {"name": "bad", "agent": "fail", "input": {"retryable": False, "message": "no"}, "depends_on": ["pause"]},
        {"name": "after_bad", "agent": "echo", "depends_on": ["bad"]},
    )
    long_attempt = running_attempt(wf, "long")
    wait_for(lambda: task(wf, "bad").status == T.FAILED, what="bad to fail")
    stopping = Workflow.objects.get(pk=wf.pk)
    assert (stopping.status, task(wf, "long").status) == (Workflow.Status.RUNNING, T.RUNNING)
    assert "task bad failed" in stopping.error
    assert {task(wf, name).status for name in ("after_long", "after_bad")} == {T.CANCELLED}
    # Nothing of it may be retried meanwhile: the workflow only waits for what runs.
    with pytest.raises(TransitionError, match="is stopping after a failure"):
        task_retry(execution_id=task(wf, "bad").pk)

    failed = finished(wf)
    long_attempt.refresh_from_db()
    assert long_attempt.status == A.SUCCEEDED and task(wf, "long").status == T.COMPLETED
    assert attempts(wf, "after_long") == []
    assert (failed.status, failed.error) == (Workflow.Status.FAILED, stopping.error)
    assert (failed.completed_steps, failed.failed_steps, failed.cancelled_steps) == (2, 1, 2)
    assert set(failed.step_results) == {"pause", "long"}
    [ended] = Event.objects.filter(entity_id=wf.workflow_id, event_type="workflow_failed")
    assert ended.payload["state"]["completed_steps"] == 2
    assert ended.payload["error"] == stopping.error, "the same event, whichever task ends last"


def test_a_task_still_running_in_a_stopping_workflow_is_not_retried(engine):
    """A retry would only run work the workflow no longer wants: it fails for good, and
    the workflow ends with it."""
    engine()
    wf = submit(
        {"name": "slow_bad", "agent": "sleep", "input": {"seconds": 3}, "timeout_seconds": 1, "max_retries": 3},
        {"name": "pause", "agent": "sleep", "input": {"seconds": 0.3}},
        {"name": "bad", "agent": "fail", "input": {"retryable": False}, "depends_on": ["pause"]},
    )
    running_attempt(wf, "slow_bad")
    failed = finished(wf)
    t = task(wf, "slow_bad")
    assert (t.status, t.retry_count) == (T.TIMED_OUT, 0)
    assert [a.status for a in attempts(wf, "slow_bad")] == [A.TIMED_OUT]
    assert "task_retrying" not in event_types(t.execution_id)
    assert "task bad failed" in failed.error and failed.failed_steps == 2


def test_resuming_a_workflow_that_stopped_at_a_failure_reruns_what_did_not_complete(engine):
    engine()
    wf = submit(
        {"name": "long", "agent": "sleep", "input": {"seconds": 2}},
        {"name": "after_long", "agent": "echo", "depends_on": ["long"]},
        {"name": "pause", "agent": "sleep", "input": {"seconds": 0.3}},
        {"name": "bad", "agent": "flaky", "input": {"fail_times": 1}, "max_retries": 0, "depends_on": ["pause"]},
    )
    running_attempt(wf, "long")
    assert finished(wf).status == Workflow.Status.FAILED
    workflow_resume(workflow_id=wf.workflow_id)
    done = finished(wf)
    assert done.status == Workflow.Status.COMPLETED
    assert [a.status for a in attempts(wf, "long")] == [A.SUCCEEDED]  # not run twice
    assert [a.status for a in attempts(wf, "after_long")] == [A.SUCCEEDED]
    assert [a.status for a in attempts(wf, "bad")] == [A.FAILED, A.SUCCEEDED]


def test_soft_timeout_is_recorded_then_the_retry_succeeds(engine):
    engine()
    wf = finished(
        submit(
            {
                "name": "slow",
                "agent": "sleep",
                "input": {"seconds": 5, "on_attempts": [1]},
                "timeout_seconds": 1,
                "max_retries": 1,
            }
        )
    )
    tries = attempts(wf, "slow")
    assert [(a.status, a.cause) for a in tries] == [(A.TIMED_OUT, "soft_timeout"), (A.SUCCEEDED, None)]
    assert tries[0].timeout_seconds == 1
    # Cut at the 1 s soft limit, not after the 5 s sleep. The limit's clock starts when the pool
    # process takes the message, the attempt's after its claim: under load the claim alone
    # took over 100 ms, so the lower bound leaves room for it.
    assert 500 <= tries[0].duration_ms < 3000
    assert "task_timed_out" in event_types(task(wf, "slow").execution_id)
    assert wf.status == Workflow.Status.COMPLETED


def test_hard_timeout_kills_the_attempt_and_the_reaper_records_it(engine, settings):
    worker = engine()
    wf = submit(
        {
            "name": "stuck",
            "agent": "sleep",
            "input": {"seconds": 30, "on_attempts": [1], "ignore_soft_timeout": True},
            "timeout_seconds": 1,
            "max_retries": 1,
        }
    )
    first = running_attempt(wf, "stuck")
    # hard limit = 1 s + 1 s grace; the reaper waits 1 s more before it closes the attempt
    wait_for(lambda: attempts_reap().timed_out, timeout=20, interval=0.5, what="the reaper to close the attempt")
    first.refresh_from_db()
    assert (first.status, first.cause) == (A.TIMED_OUT, "hard_timeout")
    assert "hard time limit of 2 s" in first.error
    assert f"worker {worker.name} killed its pool process {first.pool_pid}" in first.error
    assert first.worker_pid == worker.process.pid
    wf = finished(wf)
    assert [(a.attempt_number, a.status) for a in attempts(wf, "stuck")] == [(1, A.TIMED_OUT), (2, A.SUCCEEDED)]
    assert wf.status == Workflow.Status.COMPLETED
    events = event_types(task(wf, "stuck").execution_id)
    assert events.count("task_timed_out") == 1 and events.count("task_retrying") == 1


@pytest.mark.parametrize("limited", [False, True], ids=["unlimited", "agent-concurrency-1"])
def test_sigkill_of_the_worker_process_mid_task_records_a_lost_attempt_and_completes(engine, limited):
    """With the agent limited to one running task, the redelivered message finds the lost
    attempt's task still counted as running: it must not defer behind itself forever."""
    if limited:
        Agent.objects.filter(pk="sleep").update(max_concurrency=1)
    worker = engine(concurrency=1)
    wf = submit({"name": "victim", "agent": "sleep", "input": {"seconds": 4, "on_attempts": [1]}, "max_retries": 2})
    running_attempt(wf, "victim")
    assert worker.kill_children()
    wf = finished(wf)
    tries = attempts(wf, "victim")
    assert [(a.attempt_number, a.status, a.cause) for a in tries] == [
        (1, A.LOST, "worker_lost"),
        (2, A.SUCCEEDED, None),
    ]
    # the redelivered message asked the worker, which lives on: its pool process died
    assert f"pool process {tries[0].pool_pid} of worker {worker.name} died during attempt 1" in tries[0].error
    assert (tries[1].redelivered, tries[1].delivery_count) == (True, 2)
    assert task(wf, "victim").retry_count == 1
    assert "task_lost" in event_types(task(wf, "victim").execution_id)


def test_sigkill_with_no_retries_left_fails_the_task(engine):
    worker = engine(concurrency=1)
    wf = submit({"name": "victim", "agent": "sleep", "input": {"seconds": 4}, "max_retries": 0})
    running_attempt(wf, "victim")
    worker.kill_children()
    wf = finished(wf)
    assert wf.status == Workflow.Status.FAILED
    assert [(a.status, a.cause) for a in attempts(wf, "victim")] == [(A.LOST, "worker_lost")]
    assert task(wf, "victim").status == T.FAILED


def test_whole_worker_killed_the_reaper_recovers_and_a_new_worker_completes(engine):
    first = engine(concurrency=1)
    wf = submit(
        {"name": "victim", "agent": "sleep", "input": {"seconds": 30, "on_attempts": [1]}, "timeout_seconds": 2}
    )
    lost = running_attempt(wf, "victim")
    first.kill()
    second = engine(concurrency=1)
    wait_for(lambda: attempts_reap().lost, timeout=20, interval=0.5, what="the reaper to close the lost attempt")
    lost.refresh_from_db()
    assert (lost.status, lost.cause, lost.worker) == (A.LOST, "worker_lost", first.name)
    wf = finished(wf)
    assert wf.status == Workflow.Status.COMPLETED
    done = attempts(wf, "victim")[-1]
    assert (done.attempt_number, done.status, done.worker) == (2, A.SUCCEEDED, second.name)


# A try that runs on after its soft limit (2 s): only a kill stops it, or the hard limit (3 s).
STUCK_ONCE = {
    "name": "victim",
    "agent": "sleep",
    "input": {"seconds": 60, "on_attempts": [1], "ignore_soft_timeout": True},
    "timeout_seconds": 2,
    "max_retries": 1,
}


def reaped() -> list[int]:
    result = attempts_reap()
    return [*result.lost, *result.timed_out]


@pytest.mark.parametrize("fast_path", ["true", "false"], ids=["fast-path", "general-path"])
def test_a_worker_killed_and_restarted_under_its_name_loses_the_attempt(engine, fast_path):
    """systemd and Kubernetes restart a killed worker under the same node name: the new process
    answers for the name, but the process that ran the attempt died long before its time limit.
    The reaper records the attempt lost (worker_lost), not a hard time-out, and the task runs
    again."""
    env = {"ENGINE_FAST_PATH": fast_path}
    first = engine(concurrency=1, env=env)
    wf = submit(STUCK_ONCE)
    lost = running_attempt(wf, "victim")
    pool = first.children()
    first.kill()
    second = engine(concurrency=1, env=env, name=first.name)
    wait_for(reaped, timeout=20, interval=0.5, what="the reaper to close the attempt")
    lost.refresh_from_db()
    assert (lost.status, lost.cause) == (A.LOST, "worker_lost"), lost.error
    assert f"worker {first.name} was restarted" in lost.error
    assert (lost.worker, lost.worker_pid, lost.pool_pid in pool) == (first.name, first.process.pid, True)
    wf = finished(wf)
    assert wf.status == Workflow.Status.COMPLETED
    tries = attempts(wf, "victim")
    assert [(a.attempt_number, a.status, a.worker) for a in tries] == [
        (1, A.LOST, first.name),
        (2, A.SUCCEEDED, first.name),
    ]
    assert tries[1].worker_pid == second.process.pid
    assert tries[1].worker_started_at > tries[0].worker_started_at
    assert task(wf, "victim").retry_count == 1
    events = event_types(task(wf, "victim").execution_id)
    assert "task_lost" in events and "task_timed_out" not in events


@pytest.mark.parametrize("recorded", ["pid-reused", "identity-unknown"])
def test_a_restarted_worker_is_told_by_its_start_time_and_unknown_identities_keep_the_old_rule(engine, recorded):
    """In a container the restarted worker often gets the same pid (1): the start time tells the
    processes apart. An attempt recorded without the identity (before it was recorded) cannot
    be told apart: a worker answering for its name is taken to have killed it at its hard limit,
    as before."""
    first = engine(concurrency=1)
    wf = submit(STUCK_ONCE)
    attempt = running_attempt(wf, "victim")
    first.kill()
    second = engine(concurrency=1, name=first.name)
    running = TaskAttempt.objects.filter(pk=attempt.pk, status=A.RUNNING)
    if recorded == "pid-reused":
        assert running.update(worker_pid=second.process.pid) == 1
    else:
        assert running.update(worker_pid=None, worker_started_at=None, pool_pid=None) == 1
    wait_for(reaped, timeout=20, interval=0.5, what="the reaper to close the attempt")
    attempt.refresh_from_db()
    expected = (A.LOST, "worker_lost") if recorded == "pid-reused" else (A.TIMED_OUT, "hard_timeout")
    assert (attempt.status, attempt.cause) == expected, attempt.error
    assert finished(wf).status == Workflow.Status.COMPLETED


def test_a_pool_process_killed_in_a_live_worker_is_lost_when_the_reaper_closes_it(engine):
    """The OOM killer SIGKILLs a pool process; the worker lives on and answers for its name. The
    message goes back to the end of its queue (reject_on_worker_lost), here behind a long task,
    so the reaper reaches the attempt before the redelivery does: the worker says that process
    died under it, not that it killed it at the hard limit. Lost, not a hard time-out."""
    worker = engine(concurrency=1)
    wf = submit(STUCK_ONCE)
    victim = running_attempt(wf, "victim")
    # Queued now, behind nothing: it takes the process that replaces the killed one.
    blocker = submit({"name": "blocker", "agent": "sleep", "input": {"seconds": 60}, "timeout_seconds": 120})
    [pid] = worker.kill_children()
    wait_for(reaped, timeout=20, interval=0.5, what="the reaper to close the attempt")
    victim.refresh_from_db()
    assert (victim.status, victim.cause) == (A.LOST, "worker_lost"), victim.error
    assert f"pool process {pid} of worker {worker.name} died" in victim.error
    # Celery's WorkerLostError names the signal; on a loaded host the hard limit may come before
    # the pool noticed the death, and the worker then says the process had already exited.
    assert "SIGKILL" in victim.error or "the process had exited before its hard time limit" in victim.error
    assert victim.pool_pid == pid
    t = task(wf, "victim")
    assert (t.status, t.retry_count) == (T.RETRYING, 1)
    assert "task_lost" in event_types(t.execution_id)
    # what the redelivered message waits behind: it reaches the process that replaces the killed
    # one, which may still be starting when the reaper has closed the attempt (a loaded host)
    wait_for(lambda: task(blocker, "blocker").status == T.RUNNING, timeout=10, what="the blocker to start")
    worker.kill()


@pytest.mark.parametrize(
    ("fast_path", "dependent"),
    [("true", True), ("true", False), ("false", True)],
    ids=["fast-path", "fast-path-alone", "general-path"],
)
def test_a_success_whose_write_lost_the_connection_is_written_again_not_run_again(engine, fast_path, dependent):
    """PostgreSQL restarts, fails over or ends the worker's session while the agent runs: the
    first write of its result fails on the dead connection. It is written again on a new one
    (TASK_RESULT_WRITE_RETRY_SECONDS): the attempt succeeds, once, and the agent (paid for, in
    real use) does not run again. Before, the message was sent again, and its next delivery
    recorded the attempt lost and ran the agent a second time. `alone`: the task's success is
    one statement in autocommit (no dependents to advance)."""
    worker = engine(concurrency=1, env={"ENGINE_FAST_PATH": fast_path})
    tasks = [{"name": "cut", "agent": "sleep", "input": {"seconds": 2}, "timeout_seconds": 30}]
    if dependent:
        tasks.append({"name": "after", "agent": "echo", "depends_on": ["cut"]})
    wf = submit(*tasks)
    first = running_attempt(wf, "cut")
    assert worker.database_connections_cut(), "no connection of the worker's to cut"
    wf = finished(wf, timeout=25)
    assert wf.status == Workflow.Status.COMPLETED, wf.error
    tries = attempts(wf, "cut")
    assert [(a.pk, a.attempt_number, a.status) for a in tries] == [(first.pk, 1, A.SUCCEEDED)]
    cut = task(wf, "cut")
    assert cut.retry_count == 0 and cut.output_data["slept_seconds"] >= 2
    events = event_types(cut.execution_id)
    assert (events.count("task_started"), events.count("task_lost"), events.count("task_completed")) == (1, 0, 1)
    log = worker.log()
    assert "the database connection was lost while its result was recorded" in log, log
    assert "retry: Retry in" not in log
    if dependent:
        assert [a.status for a in attempts(wf, "after")] == [A.SUCCEEDED]


@pytest.mark.parametrize("fast_path", ["true", "false"], ids=["fast-path", "general-path"])
def test_a_failure_whose_write_lost_the_connection_is_written_again_with_its_error_and_spend(engine, fast_path):
    """As a success's (above): the database ends the worker's session while the agent runs, and
    the agent then fails (retryably), reporting what it paid (120 tokens, $0.0123, of which its
    meter had added 10 tokens, $0.001, as it ran). The failure's write is tried again on a new
    connection: the attempt is recorded failed with its error and its whole spend, and retried
    after its backoff. Before, the message was sent again, and its next delivery closed the
    attempt lost (connection_lost) with only what had been metered: the failure's error was
    gone from the record, and $0.0113 of what the provider charged from every total."""
    edge_agent("metered", "metered")
    worker = engine(concurrency=1, env={"ENGINE_FAST_PATH": fast_path})
    spec = {"seconds": 2, "fail_times": 1}
    wf = submit({"name": "cut", "agent": "metered", "input": spec, "timeout_seconds": 30, "max_retries": 1})
    running_attempt(wf, "cut")
    assert worker.database_connections_cut(), "no connection of the worker's to cut"
    wf = finished(wf, timeout=25)
    assert wf.status == Workflow.Status.COMPLETED, wf.error
    tries = attempts(wf, "cut")
    assert [(a.attempt_number, a.status, a.cause, a.error) for a in tries] == [
        (1, A.FAILED, "error", "RetryableError: metered: planned failure 1"),
        (2, A.SUCCEEDED, None, None),
    ]
    assert [(a.tokens_used, a.cost_usd) for a in tries] == [(120, Decimal("0.0123"))] * 2
    cut = task(wf, "cut")
    assert (cut.tokens_used, cut.cost_usd) == (240, Decimal("0.0246"))
    assert (wf.total_tokens_used, wf.total_cost_usd) == (240, Decimal("0.0246"))
    assert event_types(cut.execution_id).count("task_lost") == 0
    log = worker.log()
    assert "the database connection was lost while its result was recorded" in log, log
    assert "retry: Retry in" not in log


def test_a_failure_whose_meter_read_lost_the_connection_keeps_what_was_metered(engine):
    """The agent pays (metered: 120 tokens, $0.0123), the database ends the worker's session,
    and the agent fails for good without attaching that usage to its error. The failure is
    recorded with what its meter had added (read, like the write, again on a new connection),
    not with the nothing its error reports: the spend stays on the attempt, its task and its
    workflow. Not retried: the failure is permanent."""
    edge_agent("payer", "paid_slept_then_failed")
    worker = engine(concurrency=1)
    wf = submit({"name": "cut", "agent": "payer", "input": {"seconds": 2}, "timeout_seconds": 30, "max_retries": 2})
    wait_for(
        lambda: TaskAttempt.objects.filter(execution__workflow=wf, status=A.RUNNING, tokens_used=120).exists(),
        what="the agent's payment to be metered",
    )
    assert worker.database_connections_cut(), "no connection of the worker's to cut"
    wf = finished(wf, timeout=25)
    assert wf.status == Workflow.Status.FAILED
    [only] = attempts(wf, "cut")
    assert (only.status, only.cause) == (A.FAILED, "error")
    assert only.error == "PermanentError: the provider's answer made no sense"
    assert (only.tokens_used, only.cost_usd) == (120, Decimal("0.0123"))
    cut = task(wf, "cut")
    assert (cut.retry_count, cut.tokens_used, cut.cost_usd) == (0, 120, Decimal("0.0123"))
    assert (wf.total_tokens_used, wf.total_cost_usd) == (120, Decimal("0.0123"))
    assert "the database connection was lost while its result was recorded" in worker.log()


def test_a_success_whose_write_is_not_back_before_the_hard_limit_is_sent_again_not_killed_there(engine, settings):
    """The database stays away (refusing connections, as while PostgreSQL restarts) from just
    before the agent ends until past its hard time limit: the result's write is tried again only
    while a try can end before that limit, then the message is sent again, and the attempt is
    closed lost (connection_lost), as for any write that lost its connection. Before, the write
    was tried again for the whole of TASK_RESULT_WRITE_RETRY_SECONDS (10 s, past the hard limit
    of 3 + 8 s): the pool killed the process asleep between tries, the message was acknowledged
    as failed, and the attempt, whose agent had succeeded, was left to the reaper, which
    recorded it a hard time-out (timed_out, hard_timeout)."""
    worker = engine(concurrency=1, env={**longer_hard_grace(settings, 8), "TASK_RESULT_WRITE_RETRY_SECONDS": "10"})
    spec = {"seconds": 2.5, "on_attempts": [1]}
    wf = submit({"name": "cut", "agent": "sleep", "input": spec, "timeout_seconds": 3, "max_retries": 1})
    first = running_attempt(wf, "cut")
    with database_connections_refused():
        assert worker.database_connections_cut(), "no connection of the worker's to cut"
        time.sleep(max(first.started_at.timestamp() + 13 - time.time(), 0))  # past the hard limit

    def done() -> Workflow | None:
        attempts_reap()  # as the beat's reaper would, every few seconds
        return finished(wf, timeout=0.5) if Workflow.objects.get(pk=wf.pk).is_terminal else None

    wf = wait_for(done, timeout=40, interval=0.5, what="the workflow to finish")
    assert wf.status == Workflow.Status.COMPLETED, wf.error
    tries = attempts(wf, "cut")
    assert [(a.attempt_number, a.status, a.cause) for a in tries] == [
        (1, A.LOST, "connection_lost"),
        (2, A.SUCCEEDED, None),
    ], tries[0].error
    log = worker.log()
    assert "the database connection was lost while its result was recorded" in log, log
    assert "Hard time limit" not in log, log


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_a_success_whose_write_lost_the_connection_is_written_again_where_no_hard_limit_is_enforced(engine, pool):
    """The solo and threads pools kill nothing at the hard time limit: the write of a success
    that lost its connection is tried again for TASK_RESULT_WRITE_RETRY_SECONDS whatever the
    limit. Before, it was cut at the limit all the same (here 3 + 1 s, less the connect
    timeout of 5 s and the margin: no second try at all), and an agent that had succeeded in
    2 s, its result paid for, was recorded lost (connection_lost) and run again."""
    worker = engine(concurrency=1, pool=pool, env={"TASK_RESULT_WRITE_RETRY_SECONDS": "10"})
    spec = {"seconds": 2, "on_attempts": [1]}
    wf = submit({"name": "cut", "agent": "sleep", "input": spec, "timeout_seconds": 3, "max_retries": 1})
    running_attempt(wf, "cut")
    assert worker.database_connections_cut(), "no connection of the worker's to cut"
    wf = finished(wf, timeout=25)
    assert wf.status == Workflow.Status.COMPLETED, wf.error
    tries = attempts(wf, "cut")
    assert [(a.attempt_number, a.status, a.cause) for a in tries] == [(1, A.SUCCEEDED, None)], tries[0].error
    assert event_types(task(wf, "cut").execution_id).count("task_lost") == 0
    log = worker.log()
    assert "the database connection was lost while its result was recorded" in log, log
    assert "retry: Retry in" not in log


def test_database_connection_cut_mid_task_is_retried_and_the_attempt_recorded_lost(engine):
    """The database stays away longer than the result's write is tried again (here not at all:
    TASK_RESULT_WRITE_RETRY_SECONDS=0)."""
    from django.db import connection

    worker = engine(concurrency=1, env=RESULT_WRITE_NOT_RETRIED)
    wf = submit(
        {"name": "cut", "agent": "sleep", "input": {"seconds": 2, "on_attempts": [1]}, "timeout_seconds": 30},
        {"name": "after", "agent": "echo", "depends_on": ["cut"]},
    )
    first = running_attempt(wf, "cut")
    with connection.cursor() as cursor:  # the worker's connections, from outside, while the agent sleeps
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
        )
        assert any(killed for (killed,) in cursor.fetchall())
    # Recording the success fails on the dead connection: run_task drops it and sends the
    # message again (same id). That delivery closes the abandoned attempt as lost, with the
    # cause, and runs the next one at once: no waiting for the 30 s limit and the reaper.
    wf = finished(wf, timeout=25)
    assert "retry: Retry in" in worker.log()
    assert wf.status == Workflow.Status.COMPLETED and wf.completed_steps == 2
    tries = attempts(wf, "cut")
    assert [(a.attempt_number, a.status, a.cause) for a in tries] == [
        (1, A.LOST, "connection_lost"),
        (2, A.SUCCEEDED, None),
    ]
    assert tries[0].pk == first.pk and "lost its database connection during attempt 1" in tries[0].error
    cut = task(wf, "cut")
    assert cut.retry_count == 1
    assert event_types(cut.execution_id).count("task_started") == 2
    assert event_types(cut.execution_id).count("task_lost") == 1
    assert event_types(cut.execution_id).count("task_completed") == 1
    assert len(attempts(wf, "after")) == 1 and task(wf, "after").status == T.COMPLETED


@pytest.mark.parametrize("pool", ["prefork", "solo", "threads"])
def test_a_completion_refused_by_a_lock_timeout_is_recorded_with_that_error_not_as_a_lost_connection(engine, pool):
    """An operator's lock_timeout on the worker's connections, and a lock held on the attempt's
    row (an admin's transaction, say) past the agent's end: the completion's write fails with
    LockNotAvailable while the connection stays up. run_task sends the message again, as for a
    lost connection; its next delivery closes the attempt lost, with the error the database
    answered (its class and message), cause database_error: not connection_lost, which says
    the database was away. In every pool: the solo and threads pools hand the retry's exception
    to the worker's main process as the trace left it, the Retry wrapped with its traceback (the
    prefork pool's pipe unwraps it), and the delivery is remembered as a database error all the
    same, for the reaper and a redelivery's claim."""
    from django.db import transaction

    from orchestration.workers import workers_ask

    worker = engine(concurrency=1, pool=pool, env={"DATABASE_URL": f"{database_url()}?options=-c%20lock_timeout%3D300"})
    wf = submit({"name": "held", "agent": "sleep", "input": {"seconds": 1.5, "on_attempts": [1]}, "max_retries": 2})
    first = running_attempt(wf, "held")
    with transaction.atomic():
        TaskAttempt.objects.select_for_update().get(pk=first.pk)
        wait_for(lambda: "retry: Retry in" in worker.log(), timeout=15, what="run_task to send its message again")
    wf = finished(wf, timeout=30)
    assert wf.status == Workflow.Status.COMPLETED
    tries = attempts(wf, "held")
    assert [(a.attempt_number, a.status, a.cause) for a in tries] == [
        (1, A.LOST, "database_error"),
        (2, A.SUCCEEDED, None),
    ], tries[0].error
    assert tries[0].pk == first.pk and tries[0].retryable is True
    assert tries[0].error_class == "psycopg.errors.LockNotAvailable"
    assert tries[0].error.startswith(f"worker {worker.name} met a database error during attempt 1")
    assert "LockNotAvailable: canceling statement due to lock timeout" in tries[0].error
    assert "lost its database connection" not in tries[0].error
    held = task(wf, "held")
    assert held.retry_count == 1
    [lost] = Event.objects.filter(entity_id=held.execution_id, event_type="task_lost")
    assert lost.payload["cause"] == "database_error"
    # What the worker says of that delivery, for the reaper and a redelivery's claim.
    ended = workers_ask({worker.name}, {held.celery_task_id})[worker.name][0].ended[held.celery_task_id]
    assert (ended.how, ended.error_class) == ("database_error", "psycopg.errors.LockNotAvailable")
    assert ended.detail.startswith("LockNotAvailable: canceling statement due to lock timeout")


def test_an_attempt_whose_message_is_away_after_a_lost_database_connection_is_reaped_lost_not_timed_out(engine):
    """PostgreSQL fails over while the agent runs: its success cannot be recorded, and run_task
    sends its message again with a countdown that grows while the database stays away (up to
    30 s). The reaper may reach the attempt before the message comes back to close it; the
    worker says the delivery lost its database connection: lost (connection_lost), as the
    claim would have recorded it, not a hard time-out of a process it killed. Here the message
    waits behind a task that took the only pool process (and the result's write is not tried
    again on a new connection: TASK_RESULT_WRITE_RETRY_SECONDS=0, the database away longer)."""
    worker = engine(concurrency=1, env=RESULT_WRITE_NOT_RETRIED)
    wf = submit({"name": "cut", "agent": "sleep", "input": {"seconds": 2, "on_attempts": [1]}, "timeout_seconds": 3})
    first = running_attempt(wf, "cut")
    assert worker.database_connections_cut()
    blocker = submit({"name": "blocker", "agent": "sleep", "input": {"seconds": 8}, "timeout_seconds": 30})
    wait_for(lambda: "retry: Retry in" in worker.log(), timeout=10, what="run_task to send its message again")
    wait_for(lambda: task(blocker, "blocker").status == T.RUNNING, timeout=10, what="the blocker to start")
    wait_for(reaped, timeout=20, interval=0.5, what="the reaper to close the attempt")
    first.refresh_from_db()
    assert (first.status, first.cause) == (A.LOST, "connection_lost"), first.error
    assert f"worker {worker.name} lost its database connection during attempt 1" in first.error
    wf = finished(wf, timeout=30)
    assert wf.status == Workflow.Status.COMPLETED
    assert [(a.attempt_number, a.status) for a in attempts(wf, "cut")] == [(1, A.LOST), (2, A.SUCCEEDED)]
    events = event_types(task(wf, "cut").execution_id)
    assert (events.count("task_lost"), events.count("task_timed_out"), events.count("task_completed")) == (1, 0, 1)


def test_duplicate_delivery_runs_nothing_and_records_nothing_new(engine):
    from orchestration.tasks import run_task

    engine()
    wf = finished(submit({"name": "once", "agent": "echo"}))
    t = task(wf, "once")
    events_before = Event.objects.count()
    # the broker delivers the same message again, twice
    for _ in range(2):
        run_task.apply_async(args=[t.execution_id], task_id=t.celery_task_id, queue=t.priority)
    time.sleep(2)
    assert len(attempts(wf, "once")) == 1
    assert Event.objects.count() == events_before
    wf.refresh_from_db()
    assert wf.completed_steps == 1


def test_parents_finishing_together_on_two_workers_dispatch_the_child_once(engine):
    engine(concurrency=1)
    engine(concurrency=1)
    workflows = [
        submit(
            {"name": "p1", "agent": "sleep", "input": {"seconds": 0.5}},
            {"name": "p2", "agent": "sleep", "input": {"seconds": 0.5}},
            {"name": "child", "agent": "echo", "depends_on": ["p1", "p2"]},
        )
        for _ in range(4)
    ]
    for wf in workflows:
        wf = finished(wf)
        assert wf.status == Workflow.Status.COMPLETED
        child = task(wf, "child")
        assert event_types(child.execution_id) == ["task_queued", "task_started", "task_completed"]
        assert len(attempts(wf, "child")) == 1
    workers = {a.worker for a in TaskAttempt.objects.filter(execution__task_name__in=["p1", "p2"])}
    assert len(workers) == 2, "both workers took part"


def test_independent_tasks_finishing_together_on_two_workers_complete_the_workflow_once(engine):
    """Completions that need no advancing commit in one statement of their own (succeed_alone);
    when two finish the last tasks at the same moment, exactly one of them finishes the workflow."""
    engine(concurrency=1)
    engine(concurrency=1)
    pairs = [
        submit(
            {"name": "p1", "agent": "sleep", "input": {"seconds": 0.5}},
            {"name": "p2", "agent": "sleep", "input": {"seconds": 0.5}},
        )
        for _ in range(4)
    ]
    wide = submit(*({"name": f"t{i}", "agent": "echo", "input": {"i": i}} for i in range(30)))
    for wf in [*pairs, wide]:
        wf = finished(wf)
        n = wf.total_steps
        assert (wf.status, wf.completed_steps, wf.failed_steps, wf.error_count) == (Workflow.Status.COMPLETED, n, 0, 0)
        assert event_types(wf.workflow_id) == ["workflow_created", "workflow_started", "workflow_completed"]
        names = set(TaskExecution.objects.filter(workflow=wf).values_list("task_name", flat=True))
        assert set(wf.step_results) == names
        for t in TaskExecution.objects.filter(workflow=wf):
            assert (t.status, t.completed_at is not None, t.error) == (T.COMPLETED, True, None)
            assert [(a.attempt_number, a.status) for a in attempts(wf, t.task_name)] == [(1, A.SUCCEEDED)]
            assert event_types(t.execution_id) == ["task_queued", "task_started", "task_completed"]
    assert task(wide, "t7").output_data["echo"] == {"i": 7}
    workers = {a.worker for a in TaskAttempt.objects.filter(execution__task_name__in=["p1", "p2"])}
    assert len(workers) == 2, "both workers took part"


def test_cancelling_a_workflow_stops_running_work_and_cancels_the_rest(engine):
    engine()
    wf = submit(
        {"name": "long", "agent": "sleep", "input": {"seconds": 20}},
        {"name": "next", "agent": "echo", "depends_on": ["long"]},
    )
    attempt = running_attempt(wf, "long")
    workflow_cancel(workflow_id=wf.workflow_id, reason="operator said stop")
    wf.refresh_from_db()
    attempt.refresh_from_db()
    assert wf.status == Workflow.Status.CANCELLED
    assert (attempt.status, attempt.cause) == (A.CANCELLED, "cancelled")
    assert {task(wf, "long").status, task(wf, "next").status} == {T.CANCELLED}
    assert "workflow_cancelled" in event_types(wf.workflow_id)
    time.sleep(2)
    attempt.refresh_from_db()
    assert attempt.status == A.CANCELLED, "the terminated process recorded nothing afterwards"


def test_deadline_fails_the_workflow(engine):
    import datetime as dt

    from django.utils import timezone

    engine()
    wf = submit(
        {"name": "long", "agent": "sleep", "input": {"seconds": 20}},
        deadline=(timezone.now() + dt.timedelta(seconds=2)).isoformat(),
    )
    cut = running_attempt(wf, "long")
    wait_for(lambda: attempts_reap().workflows_failed, timeout=15, interval=0.5, what="the deadline to be enforced")
    wf.refresh_from_db()
    assert wf.status == Workflow.Status.FAILED
    assert "deadline" in wf.error
    assert task(wf, "long").status == T.CANCELLED
    cut.refresh_from_db()
    assert (cut.status, cut.cause) == (A.CANCELLED, "deadline"), "cut by the deadline, not by a user"


@pytest.mark.parametrize("ends_it", ["completion", "reaper"])
def test_a_deadline_passing_while_a_failed_workflow_waits_for_its_running_task_keeps_the_failure(engine, ends_it):
    """A workflow that stopped at its first failure ends failed with that failure as its error
    whatever ends the task it waits for; a deadline passing meanwhile (the task completing past
    it, or the reaper's pass cutting it) is named in the workflow_failed event, not written
    over the failure, as a cancel is (before, the error became "deadline ... passed")."""
    import datetime as dt

    from django.utils import timezone

    engine(concurrency=3)
    wf = submit(
        {"name": "long", "agent": "sleep", "input": {"seconds": 4 if ends_it == "completion" else 30}},
        {"name": "bad", "agent": "fail", "input": {"message": "no such table"}, "max_retries": 0},
        deadline=(timezone.now() + dt.timedelta(seconds=2.5)).isoformat(),
    )
    running_attempt(wf, "long")
    wait_for(lambda: task(wf, "bad").status == T.FAILED, what="bad to fail")
    failure = Workflow.objects.get(pk=wf.pk).error
    assert failure.startswith("task bad failed") and "no such table" in failure
    if ends_it == "reaper":
        wait_for(lambda: attempts_reap().workflows_failed, timeout=15, interval=0.5, what="the deadline to be enforced")
    ended = finished(wf)
    assert (ended.status, ended.error) == (Workflow.Status.FAILED, failure)
    [event] = Event.objects.filter(entity_id=wf.pk, event_type="workflow_failed")
    assert event.payload["error"] == failure and "deadline" in event.payload["deadline"], event.payload
    assert event.payload["state"]["error"] == failure
    long = task(wf, "long")
    if ends_it == "completion":  # what it did stays recorded, and the deadline ended the workflow
        assert long.status == T.COMPLETED and set(ended.step_results) == {"long"}
    else:  # cut by the deadline, which its record says
        assert long.status == T.CANCELLED and "deadline" in long.error
        assert [(a.status, a.cause) for a in attempts(wf, "long")] == [(A.CANCELLED, "deadline")]


@pytest.mark.parametrize("fast_path", ["true", "false"], ids=["fast-path", "general-path"])
def test_a_task_of_an_agent_in_maintenance_waits_and_runs_once_it_is_active(engine, fast_path):
    """An operator drains an agent: work already queued for it waits, is not failed, and runs
    when the agent is back."""
    engine(env={"ENGINE_FAST_PATH": fast_path})
    Agent.objects.create(id="echo-2", name="Echo 2", executor="python", entrypoint="orchestration.runtime.builtin.echo")
    wf = submit(
        {"name": "first", "agent": "sleep", "input": {"seconds": 1}},
        {"name": "then", "agent": "echo-2", "depends_on": ["first"]},
    )
    running_attempt(wf, "first")
    Agent.objects.filter(pk="echo-2").update(status=Agent.Status.MAINTENANCE)
    wait_for(lambda: task(wf, "first").status == T.COMPLETED, what="first to complete")
    time.sleep(3)
    assert task(wf, "then").status == T.QUEUED and attempts(wf, "then") == []
    Agent.objects.filter(pk="echo-2").update(status=Agent.Status.ACTIVE)
    done = finished(wf, timeout=30)
    assert done.status == Workflow.Status.COMPLETED
    assert [a.status for a in attempts(wf, "then")] == [A.SUCCEEDED]


def test_a_task_of_an_agent_made_inactive_fails_naming_it(engine):
    engine()
    Agent.objects.create(id="echo-3", name="Echo 3", executor="python", entrypoint="orchestration.runtime.builtin.echo")
    wf = submit(
        {"name": "first", "agent": "sleep", "input": {"seconds": 1}},
        {"name": "then", "agent": "echo-3", "depends_on": ["first"]},
    )
    running_attempt(wf, "first")
    Agent.objects.filter(pk="echo-3").update(status=Agent.Status.INACTIVE)
    done = finished(wf)
    assert done.status == Workflow.Status.FAILED
    [attempt] = attempts(wf, "then")
    assert (attempt.status, attempt.retryable) == (A.FAILED, False)
    assert "agent echo-3 is inactive" in attempt.error and "agent echo-3 is inactive" in done.error


def test_per_agent_concurrency_limit_makes_excess_tasks_wait(engine):
    from orchestration.models import Agent

    Agent.objects.filter(pk="sleep").update(max_concurrency=1)
    engine(concurrency=3)
    wf = finished(submit(*({"name": f"s{i}", "agent": "sleep", "input": {"seconds": 0.7}} for i in range(3))))
    assert wf.status == Workflow.Status.COMPLETED
    spans = sorted((a.started_at, a.finished_at) for a in TaskAttempt.objects.filter(execution__workflow=wf))
    assert len(spans) == 3, "excess tasks waited instead of failing or making extra attempts"
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end, "two attempts of the agent overlapped"


def test_a_worker_takes_urgent_work_before_a_backlog_of_bulk_work(engine):
    """A worker consuming every priority queue takes a critical task before the low ones
    queued before it. Before, kombu's Redis transport took the queues in turn (round robin):
    behind a backlog, every other task a worker started was a low one, so 60 critical tasks
    took twice as long to start as with the low backlog gone."""
    engine(concurrency=1)
    bulk = ({"name": f"l{i}", "agent": "sleep", "input": {"seconds": 0.1}} for i in range(30))
    backlog = submit(*bulk, priority="low")
    running_attempt(backlog, "l0")
    urgent = submit(*({"name": f"c{i}", "agent": "echo"} for i in range(6)), priority="critical")
    assert finished(urgent).status == Workflow.Status.COMPLETED
    started = list(
        TaskAttempt.objects.filter(execution__workflow__in=[backlog, urgent])
        .order_by("started_at")
        .values_list("execution__priority", flat=True)
    )
    first = started.index("critical")
    assert started[first : first + 6] == ["critical"] * 6, started
    low_after_submission = started[:first].count("low") - 1  # l0 was running
    assert low_after_submission <= 2, f"{low_after_submission} low tasks started before the first critical one"
    finished(backlog)


def test_tasks_waiting_for_a_limited_agent_do_not_spin_and_take_a_freed_slot_at_once(engine):
    """Before, every waiting task's message came back about once a second, each time taking a
    pool process for a claim that deferred it again (a backlog of 300 tasks of an agent limited
    to 2 ran 27 such claims a second, half a core, and every free pool process spun on them),
    and a freed slot stayed idle until some waiting message happened to come back. Now the
    task that ends hands its slot to the longest waiting task, and the others look again at
    intervals that grow with the line."""
    Agent.objects.filter(pk="sleep").update(max_concurrency=1)
    worker = engine(concurrency=2)
    n = 8
    wf = submit(*({"name": f"s{i}", "agent": "sleep", "input": {"seconds": 1}} for i in range(n)))
    assert finished(wf, timeout=60).status == Workflow.Status.COMPLETED
    spans = sorted((a.started_at, a.finished_at) for a in TaskAttempt.objects.filter(execution__workflow=wf))
    assert len(spans) == n, "excess tasks waited instead of failing or making extra attempts"
    gaps = [(start - end).total_seconds() for (_, end), (start, _) in itertools.pairwise(spans)]
    assert min(gaps) >= 0, "two attempts of the agent overlapped"
    assert max(gaps) < 0.4, f"the freed slot stayed idle: {gaps}"
    deferrals = worker.log().count("'deferred'")
    assert deferrals <= 2 * n, f"{deferrals} deferrals for {n - 1} waiting tasks"


def test_slots_added_by_raising_an_agents_limit_are_taken_by_its_line_at_the_next_end(engine):
    """An agent's max_concurrency raised while tasks wait for it: the attempt that ends next
    wakes a task for each free slot. Before, it woke one (the slot it freed), and the other new
    slots stayed idle until deferred messages came back, up to 30 s later: raised from 1 to 8
    under a line of 17 one-second tasks, one kept running alone for 3 s more and the line took
    9.2 s instead of 3. Here the line runs one at a time for 8 s first, so that its deferrals
    are long ones (about a second for each task waiting) when the limit is raised."""
    Agent.objects.filter(pk="sleep").update(max_concurrency=1)
    engine(concurrency=6)
    wf = submit(*({"name": f"s{i:02}", "agent": "sleep", "input": {"seconds": 1}} for i in range(30)))
    running_attempt(wf, "s00")
    time.sleep(8)
    # Raised while a try claimed under the old limit runs (not while the task its predecessor
    # woke is on its way: claimed under the new limit, that one's end wakes one, a gap left open).
    wait_for(
        lambda: TaskAttempt.objects.filter(execution__workflow=wf, status=A.RUNNING).exists(),
        what="a try of the line to be running",
        interval=0.02,
    )
    Agent.objects.filter(pk="sleep").update(max_concurrency=6)
    raised = time.monotonic()
    left = TaskExecution.objects.filter(workflow=wf).exclude(status=T.COMPLETED).count()
    wf = finished(wf, timeout=60)
    took = time.monotonic() - raised
    assert wf.status == Workflow.Status.COMPLETED
    assert TaskAttempt.objects.filter(execution__workflow=wf).count() == 30, "extra attempts were made"
    # At most a second for the running one to end, then six at a time.
    assert took < 2 + left / 6 + 1.5, f"{left} tasks took {took:.1f} s on six slots after the limit was raised"


def test_a_line_whose_agents_limit_was_removed_is_taken_at_the_next_end(engine):
    """An agent's max_concurrency removed (blank: no limit) while tasks wait for it: the attempt
    that ends next wakes the whole line. Before, it woke one, the limit read at its claim taken
    for the current one, and the attempts of the tasks woken since, claimed without a limit, wake
    none: the rest of the line waited for its deferred messages, up to 30 s later."""
    Agent.objects.filter(pk="sleep").update(max_concurrency=1)
    engine(concurrency=6)
    wf = submit(*({"name": f"s{i:02}", "agent": "sleep", "input": {"seconds": 1}} for i in range(30)))
    running_attempt(wf, "s00")
    time.sleep(8)
    # Removed while a try claimed under the limit runs (not while the task its predecessor woke
    # is on its way: claimed without a limit, that one's end wakes nobody, a gap left open).
    wait_for(
        lambda: TaskAttempt.objects.filter(execution__workflow=wf, status=A.RUNNING).exists(),
        what="a try of the line to be running",
        interval=0.02,
    )
    Agent.objects.filter(pk="sleep").update(max_concurrency=None)
    raised = time.monotonic()
    left = TaskExecution.objects.filter(workflow=wf).exclude(status=T.COMPLETED).count()
    wf = finished(wf, timeout=60)
    took = time.monotonic() - raised
    assert wf.status == Workflow.Status.COMPLETED
    assert TaskAttempt.objects.filter(execution__workflow=wf).count() == 30, "extra attempts were made"
    # At most a second for the running one to end, then six at a time (the worker's processes).
    assert took < 2 + left / 6 + 1.5, f"{left} tasks took {took:.1f} s on six processes after the limit was removed"


def test_a_freed_slot_of_a_limited_agent_goes_to_its_urgent_task_before_its_backlog_of_bulk_work(engine, tmp_path):
    """The line of tasks waiting for an agent's max_concurrency is in priority order, as a
    worker takes the queues. Before, a freed slot went to the task of the agent that had waited
    longest whatever its priority: a critical task behind eight low tasks of 0.5 s started
    after all of them, 4 s late. The first, submitted alone, holds the slot until every other
    one, the critical included, waits for it (held for a fixed time, a loaded machine freed the
    slot before the last were taken: one ran without waiting, and the test waited for ever)."""
    release = tmp_path / "release"
    Agent.objects.create(
        id="held",
        name="Held",
        executor=Agent.Executor.PYTHON,
        entrypoint="tests.orchestration.edge_agents.held",
        max_concurrency=1,
    )
    engine(concurrency=3)

    def held_task(name: str, *, hold: bool = False) -> dict:
        return {"name": name, "agent": "held", "input": {"release": str(release), "hold_attempts": [1] if hold else []}}

    # The slot's holder first, alone: submitted with the backlog, any of them may take the slot.
    holder = submit(held_task("l0", hold=True), priority="low")
    running_attempt(holder, "l0")
    backlog = submit(*(held_task(f"l{i}") for i in range(1, 8)), priority="low")
    wait_for(
        lambda: TaskExecution.objects.filter(workflow=backlog, deferred_at__isnull=False).count() == 7,
        timeout=90,
        what="the rest of the backlog to wait for the agent",
    )
    urgent = submit(held_task("c"), priority="critical")
    wait_for(lambda: task(urgent, "c").deferred_at is not None, timeout=90, what="the critical task to wait")
    release.touch()
    assert finished(urgent).status == Workflow.Status.COMPLETED
    [c] = attempts(urgent, "c")
    low_before = TaskAttempt.objects.filter(
        execution__workflow=backlog, started_at__gt=task(urgent, "c").queued_at, started_at__lt=c.started_at
    ).count()
    # One may take a freed slot before it (its deferred message come back at that moment), on a
    # loaded machine two; before, all seven did.
    assert low_before <= 2, f"{low_before} low tasks of the agent started before the critical one"
    assert finished(backlog).status == Workflow.Status.COMPLETED
    assert finished(holder).status == Workflow.Status.COMPLETED


@pytest.mark.parametrize("fast_path", ["true", "false"], ids=["fast-path", "general-path"])
def test_a_sibling_completing_in_a_failed_workflow_joins_its_results_whatever_ends_last(engine, fast_path):
    """Tasks left running when a sibling failed for good: one completes, the last one fails.
    The workflow ends with the last of them, and the completed one's result is in its
    step_results whatever ended last."""
    engine(concurrency=3, env={"ENGINE_FAST_PATH": fast_path})
    wf = submit(
        {"name": "bad", "agent": "sleep", "input": {"seconds": 5}, "timeout_seconds": 1, "max_retries": 0},
        {"name": "good", "agent": "sleep", "input": {"seconds": 2.5}},
        {"name": "slow_bad", "agent": "sleep", "input": {"seconds": 8}, "timeout_seconds": 4},
    )
    for name in ("bad", "good", "slow_bad"):
        running_attempt(wf, name)
    assert finished(wf).status == Workflow.Status.FAILED
    wait_for(lambda: task(wf, "slow_bad").is_terminal, what="slow_bad to end")
    assert task(wf, "good").status == T.COMPLETED
    wf.refresh_from_db()
    assert (wf.completed_steps, wf.failed_steps) == (1, 2)
    assert set(wf.step_results) == {"good"}
    assert [c["task"] for c in wf.checkpoints] == ["good"]


def test_a_soft_limit_that_fires_while_a_success_is_recorded_does_not_lose_it(engine):
    """The agent finished well within its limit, but its completion waited on the workflow row
    (held by another transaction: a cancel, a resume, a sibling's completion) until the soft
    limit fired inside the recording transaction. Before, that transaction was rolled back and
    the attempt stayed running until the reaper recorded a hard time-out of a process that was
    never killed, and the agent ran again."""
    from tests.orchestration.test_lock_races import waiting_on_lock
    from tests.pg import other_connection

    worker = engine(concurrency=1)
    other = other_connection()
    other.execute("BEGIN")
    spec = {"name": "slow-record", "tasks": [{"name": "a", "agent": "echo", "timeout_seconds": 1}]}
    wf, _ = workflow_submit(spec=spec)
    other.execute("SELECT 1 FROM workflows WHERE workflow_id = %s FOR UPDATE", [wf.pk])  # the row is busy
    a = TaskExecution.objects.get(workflow=wf, task_name="a")
    assert any("task_attempts" in query for query in waiting_on_lock()), "the completion waits on the workflow row"
    started = TaskAttempt.objects.get(execution=a).started_at.timestamp()
    time.sleep(max(0.0, started + 1.6 - time.time()))  # past the 1 s soft limit, before the 2 s hard limit
    other.execute("COMMIT")
    other.close()
    time.sleep(3.5)  # past the hard limit and the reaper's grace: a running attempt would be reaped now
    attempts_reap()
    wf = wait_for(lambda: (w := Workflow.objects.get(pk=wf.pk)).is_terminal and w, timeout=30, what="the end")
    tries = list(TaskAttempt.objects.filter(execution=a).values_list("attempt_number", "status", "cause", "error"))
    # Before the fix: [(1, timed_out, hard_timeout, "hard time limit of 2 s exceeded (process
    # killed)"), (2, succeeded, None, None)].
    assert tries == [(1, A.SUCCEEDED, None, None)], (tries, worker.log()[-4000:])
    assert (wf.status, wf.completed_steps, wf.error_count) == (Workflow.Status.COMPLETED, 1, 0)
    events = Event.objects.filter(entity_id=a.pk).order_by("sequence").values_list("event_type", flat=True)
    assert list(events) == ["task_queued", "task_started", "task_completed"]


def _finished_alone(wf: Workflow, worker) -> Workflow:
    """The workflow once it ends, with no reaper and no sweeper run: the worker alone.
    Otherwise the state it was left in."""
    try:
        return finished(wf, timeout=20)
    except AssertionError as exc:
        tasks = list(TaskExecution.objects.filter(workflow=wf).values_list("task_name", "status"))
        tries = list(
            TaskAttempt.objects.filter(execution__workflow=wf).values_list(
                "execution__task_name", "attempt_number", "status", "cause"
            )
        )
        raise AssertionError(f"{exc}: tasks {tasks}, attempts {tries}\n{worker.log()[-3000:]}") from exc


def _soft_limit_sent(worker) -> None:
    """Wait until the worker's main process has sent its pool child the soft limit (it logs
    this just before the signal), then a moment for the child to take it."""
    wait_for(lambda: "Soft time limit (1s) exceeded" in worker.log(), timeout=10, what="the soft limit to fire")
    time.sleep(0.2)


@pytest.mark.parametrize(
    ("fast_path", "max_retries"),
    [("true", 1), ("false", 1), ("true", 0)],
    ids=["fast-path", "general-path", "no-retries-left"],
)
def test_a_soft_limit_during_the_claim_times_the_attempt_out_at_once(engine, fast_path, max_retries):
    """The claim waited on the task row (held by another transaction: a cancel, the sweeper)
    until the soft limit fired. Before, the limit interrupted the claim: the general path's
    transaction was rolled back and the task stayed queued for the sweeper (60 s); the fast
    path's statement, left in flight, committed later, and its attempt stayed running, with no
    agent, for the reaper. Now the claim completes and the try is recorded timed out, as if the
    agent had hit the limit, and retried at once (or failed when no retries remain), without
    running the agent (which would sleep past the hard limit here)."""
    from tests.orchestration.test_lock_races import waiting_on_lock
    from tests.pg import other_connection

    wf = submit(
        {
            "name": "a",
            "agent": "sleep",
            "input": {"seconds": 5, "on_attempts": [1]},
            "timeout_seconds": 1,
            "max_retries": max_retries,
        }
    )
    a = task(wf, "a")
    other = other_connection()
    try:
        other.execute("BEGIN")
        other.execute("SELECT 1 FROM task_executions WHERE execution_id = %s FOR UPDATE", [a.pk])
        worker = engine(concurrency=1, env={"ENGINE_FAST_PATH": fast_path})
        # (30 s: under load the check once found no claim waiting within 10 s)
        blocked = waiting_on_lock(timeout=30)
        assert any("task_executions" in query for query in blocked), f"the claim waits on the task row: {blocked}"
        _soft_limit_sent(worker)
        other.execute("COMMIT")
    finally:
        other.close()
    wf = _finished_alone(wf, worker)
    tries = attempts(wf, "a")
    timed_out = (1, A.TIMED_OUT, "soft_timeout", "soft time limit of 1 s exceeded")
    recorded = [(t.attempt_number, t.status, t.cause, t.error) for t in tries]
    a = task(wf, "a")
    if max_retries:
        assert recorded == [timed_out, (2, A.SUCCEEDED, None, None)], worker.log()[-4000:]
        assert (wf.status, a.status, a.retry_count) == (Workflow.Status.COMPLETED, T.COMPLETED, 1)
        assert event_types(a.pk) == [
            "task_queued",
            "task_started",
            "task_timed_out",
            "task_retrying",
            "task_started",
            "task_completed",
        ]
    else:
        assert recorded == [timed_out], worker.log()[-4000:]
        assert (wf.status, a.status, a.retry_count) == (Workflow.Status.FAILED, T.TIMED_OUT, 0)
        assert event_types(a.pk) == ["task_queued", "task_started", "task_timed_out", "task_failed"]
    # as an agent that ran out of time records it (test_soft_timeout_is_recorded_then_the_retry_succeeds)
    assert (tries[0].error_class, tries[0].retryable, tries[0].timeout_seconds) == (
        "billiard.exceptions.SoftTimeLimitExceeded",  # the class celery.exceptions re-exports
        True,
        1,
    )
    # ended as the agent was to start (the limit held off since the claim), the agent not entered
    assert "orchestration/soft_limit.py" in tries[0].traceback and "builtin.py" not in tries[0].traceback
    assert wf.error_count == 1


@pytest.fixture
def commit_waits_on_lock(transactional_db):
    """While the returned session holds advisory lock 4242, the COMMIT of a transaction that
    closed an attempt succeeded or failed waits for it (a deferred constraint trigger)."""
    from tests.pg import other_connection

    other = other_connection()
    other.execute(
        "CREATE FUNCTION test_commit_waits() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN PERFORM pg_advisory_xact_lock(4242); RETURN NULL; END $$"
    )
    other.execute(
        "CREATE CONSTRAINT TRIGGER test_commit_waits AFTER UPDATE ON task_attempts "
        "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.status IN ('succeeded', 'failed')) "
        "EXECUTE FUNCTION test_commit_waits()"
    )
    try:
        yield other
    finally:
        other.execute("SELECT pg_advisory_unlock_all()")
        other.execute("DROP TRIGGER test_commit_waits ON task_attempts")
        other.execute("DROP FUNCTION test_commit_waits()")
        other.close()


@pytest.mark.parametrize(
    ("fast_path", "first"),
    [("true", "succeeds"), ("false", "succeeds"), ("false", "fails")],
    ids=["success-fast-path", "success-general-path", "failure-retried"],
)
def test_a_soft_limit_during_the_commit_of_an_outcome_keeps_it_and_its_dispatches(
    engine, commit_waits_on_lock, fast_path, first
):
    """The COMMIT that records a's outcome waits (here on a deferred trigger; in production on
    a slow disk, a synchronous standby) until the soft limit fires. Before, the limit
    interrupted the COMMIT, which went through on the server all the same, but the messages
    it was to send after commit (b, now ready; or a's retry) never left: the task stayed
    queued for the sweeper. Now the outcome is recorded once, its messages are sent, and the
    delivery ends normally."""
    from tests.orchestration.test_lock_races import waiting_on_lock

    holder = commit_waits_on_lock
    holder.execute("SELECT pg_advisory_lock(4242)")
    worker = engine(concurrency=1, env={"ENGINE_FAST_PATH": fast_path})
    a_input = {"fail_times": 1 if first == "fails" else 0}
    wf = submit(
        {"name": "a", "agent": "flaky", "input": a_input, "timeout_seconds": 1, "max_retries": 1},
        {"name": "b", "agent": "echo", "depends_on": ["a"]},
    )
    assert "COMMIT" in waiting_on_lock(), "the outcome's COMMIT waits"
    _soft_limit_sent(worker)
    holder.execute("SELECT pg_advisory_unlock(4242)")
    wf = _finished_alone(wf, worker)
    assert (wf.status, wf.completed_steps) == (Workflow.Status.COMPLETED, 2), worker.log()[-4000:]
    recorded = [(t.attempt_number, t.status) for t in attempts(wf, "a")]
    if first == "fails":
        assert recorded == [(1, A.FAILED), (2, A.SUCCEEDED)]
        assert event_types(task(wf, "a").pk).count("task_retrying") == 1
    else:
        assert recorded == [(1, A.SUCCEEDED)]
        assert event_types(task(wf, "a").pk) == ["task_queued", "task_started", "task_completed"]
    assert [t.status for t in attempts(wf, "b")] == [A.SUCCEEDED]
    log = worker.log()
    assert "the soft time limit fired outside the agent's run, while held off" in log, "it fired in the COMMIT"
    # the delivery ended as it would have without the limit, returning its outcome
    first_delivery = attempts(wf, "a")[0].celery_task_id
    outcome = "failed" if first == "fails" else "succeeded"
    assert re.search(rf"run_task\[{first_delivery}\] succeeded in [0-9.]+s: '{outcome}'", log), log[-4000:]


def test_an_agent_failing_with_a_base_exception_of_its_own_is_recorded_failed_not_lost(engine):
    """asyncio's CancelledError is a BaseException, not an Exception. The attempt took it for
    the worker going away (as SystemExit or KeyboardInterrupt) and recorded nothing: it escaped
    Celery's task, its pool process died, the message came back and the attempt was recorded
    lost, the agent's error nowhere. It is the agent's failure: recorded failed, with its error,
    and retried as any other."""
    edge_agent("cancelled-inside", "cancelled_inside")
    engine(concurrency=1)
    wf = submit({"name": "c", "agent": "cancelled-inside", "input": {"succeed_on": 2}, "max_retries": 1})
    wf = finished(wf, timeout=60)
    assert wf.status == Workflow.Status.COMPLETED
    first, second = attempts(wf, "c")
    assert (first.status, first.cause, first.error_class) == (
        TaskAttempt.Status.FAILED,
        "error",
        "asyncio.exceptions.CancelledError",
    ), first.error
    assert first.error == "CancelledError: the provider's stream was cancelled"
    assert (second.status, second.redelivered) == (TaskAttempt.Status.SUCCEEDED, False)
    assert wf.error_count == 1


def test_an_agent_calling_sys_exit_is_recorded_failed_and_its_pool_process_lives_on(engine):
    """An agent's own sys.exit() (a wrapped command-line tool's) was taken for the worker going
    away: it ended the pool process, each try was recorded lost ("lives on and no longer runs
    it"), the exit nowhere, and retried until none were left, each killing a process. It is the
    agent's failure, not retried (its code would exit again), and the process runs on."""
    edge_agent("exits", "exits")
    engine(concurrency=1)
    wf = submit({"name": "x", "agent": "exits", "input": {"code": 2}, "max_retries": 2})
    wf = finished(wf, timeout=60)
    assert wf.status == Workflow.Status.FAILED
    (only,) = attempts(wf, "x")
    assert (only.status, only.cause, only.error_class, only.retryable) == (
        TaskAttempt.Status.FAILED,
        "error",
        "builtins.SystemExit",
        False,
    ), only.error
    assert only.error == "SystemExit: 2"
    # The same pool process runs the next task: the exit did not end it.
    wf2 = finished(submit({"name": "e", "agent": "echo", "input": {"n": 1}}), timeout=60)
    assert wf2.status == Workflow.Status.COMPLETED
    assert attempts(wf2, "e")[0].pool_pid == only.pool_pid


@pytest.mark.parametrize("long_agent", ["sleep", "cleans-up"])
def test_a_cancelled_try_ends_its_pool_process_and_the_next_agents_exit_is_its_own(engine, long_agent):
    """A cancel's SIGTERM: billiard's handler raises SystemExit in the agent and sets its flag;
    the try is recorded cancelled and the process ends, also when the agent's cleanup raises
    another exception on its way out (`cleans-up`). That one lived on (Celery took the cleanup's
    error for the task's failure), its handler's flag set: the next agent's own sys.exit() there
    was taken for a stop, and that try was left running, unrecorded, its process gone. The
    process that replaces a cancelled one starts with the flag clear: an agent's own sys.exit()
    there is its failure, not a stop."""
    edge_agent("cleans-up", "cleanup_raises")
    edge_agent("exits", "exits")
    engine(concurrency=1)
    wf = submit({"name": "long", "agent": long_agent, "input": {"seconds": 20}})
    attempt = running_attempt(wf, "long")
    workflow_cancel(workflow_id=wf.workflow_id, reason="operator said stop")
    attempt.refresh_from_db()
    assert (attempt.status, attempt.cause) == (A.CANCELLED, "cancelled")
    wf2 = finished(submit({"name": "x", "agent": "exits", "input": {"code": 2}, "max_retries": 2}), timeout=60)
    (only,) = attempts(wf2, "x")
    assert (only.status, only.cause, only.error) == (A.FAILED, "error", "SystemExit: 2")
    assert only.pool_pid != attempt.pool_pid, "the cancelled try's process ended"
    time.sleep(1)
    attempt.refresh_from_db()
    assert attempt.status == A.CANCELLED
