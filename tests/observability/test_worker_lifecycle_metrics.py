"""Worker metrics across a lost pool process and a cancellation, through a real Celery worker."""

from __future__ import annotations

import time

import pytest

from orchestration.models import TaskAttempt, Workflow
from orchestration.services.workflows import workflow_cancel, workflow_submit
from tests.engine import wait_for
from tests.observability.conftest import free_port, scrape, value


def _worker(engine, tmp_path):
    port = free_port()
    (tmp_path / "prometheus").mkdir()
    worker = engine(
        concurrency=1,
        env={
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prometheus"),
            "WORKER_METRICS_PORT": str(port),
            "WORKER_METRICS_ADDR": "127.0.0.1",
        },
    )
    return worker, f"http://127.0.0.1:{port}/metrics"


def _submit(name: str, task: dict) -> Workflow:
    workflow, _ = workflow_submit(spec={"name": name, "tasks": [task]})
    return workflow


def _running(workflow: Workflow) -> TaskAttempt:
    return wait_for(
        lambda: TaskAttempt.objects.filter(execution__workflow=workflow, status=TaskAttempt.Status.RUNNING).first(),
        what="the attempt to be running",
    )


def _finished(workflow: Workflow) -> Workflow:
    return wait_for(
        lambda: (w := Workflow.objects.get(pk=workflow.pk)).is_terminal and w, timeout=40, what="the workflow to end"
    )


@pytest.mark.django_db(transaction=True)
def test_a_redelivered_message_is_not_observed_again_as_queue_wait(engine, tmp_path):
    """The broker redelivers the message of a killed pool process with its original publication
    stamp: the lost run is not time the message waited in its queue."""
    worker, url = _worker(engine, tmp_path)
    workflow = _submit(
        "redelivered", {"name": "v", "agent": "sleep", "input": {"seconds": 4, "on_attempts": [1]}, "max_retries": 2}
    )
    _running(workflow)
    time.sleep(2)
    assert worker.kill_children()
    assert _finished(workflow).status == Workflow.Status.COMPLETED
    samples = scrape(url)
    assert value(samples, "agentledger_task_attempts_total", agent="sleep", status="lost", cause="worker_lost") == 1
    assert value(samples, "agentledger_task_retries_total", agent="sleep") == 1
    # one message, published once, waited once
    assert value(samples, "agentledger_task_queue_wait_seconds_count", queue="normal") == 1
    assert value(samples, "agentledger_task_queue_wait_seconds_sum", queue="normal") < 1.5


@pytest.mark.django_db(transaction=True)
def test_a_cancelled_running_attempt_is_counted_once(engine, tmp_path):
    """Cancelling revokes the message and SIGTERMs the pool process running it: the attempt
    never gets back to attempt_run, so the cancellation (here, this process) reports it."""
    from observability.metrics import TASK_ATTEMPTS, TASK_DURATION

    worker, url = _worker(engine, tmp_path)
    local = TASK_ATTEMPTS.labels(agent="sleep", status="cancelled", cause="cancelled")
    durations = TASK_DURATION.labels(agent="sleep", status="cancelled")
    before, before_seconds = local._value.get(), durations._sum.get()
    workflow = _submit("cancelled", {"name": "v", "agent": "sleep", "input": {"seconds": 20}})
    _running(workflow)
    time.sleep(1)
    workflow_cancel(workflow_id=workflow.pk)
    wait_for(lambda: "Terminating" in worker.log(), what="the worker to terminate the attempt's process")
    worker.wait_ready()
    remote = value(scrape(url), "agentledger_task_attempts_total", agent="sleep", status="cancelled", cause="cancelled")
    assert local._value.get() - before + remote == 1
    assert durations._sum.get() - before_seconds >= 1
