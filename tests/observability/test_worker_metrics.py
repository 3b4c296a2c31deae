"""Worker metrics through a real Celery worker: multiprocess mode, served on the worker's
metrics port, parsed with prometheus_client's parser, checked against the recorded attempts."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from orchestration.models import Agent, TaskAttempt, TaskExecution, Workflow
from orchestration.services.workflows import workflow_submit
from tests.engine import wait_for
from tests.factories import AgentFactory
from tests.fakes.servers import OpenAIServer
from tests.observability.conftest import free_port, parse_samples, scrape, value

LLM_KEY = "sk-obs-" + "k3y" * 8


def finished(workflow: Workflow, timeout: float = 40) -> Workflow:
    return wait_for(
        lambda: (w := Workflow.objects.get(pk=workflow.pk)).is_terminal and w,
        timeout=timeout,
        what=f"workflow {workflow.pk} to finish",
    )


@pytest.mark.django_db(transaction=True)
def test_worker_metrics_move_with_real_tasks_and_logs_carry_the_task_context(engine, tmp_path):
    port = free_port()
    with OpenAIServer(api_key=LLM_KEY) as openai:
        AgentFactory(
            id="writer",
            executor=Agent.Executor.LLM,
            entrypoint="",
            provider="openai",
            model="gpt-4o-mini",
            url=openai.base_url,
            api_key_env="OBS_TEST_LLM_API_KEY",
        )
        (tmp_path / "prometheus").mkdir()
        worker = engine(
            env={
                "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prometheus"),
                "WORKER_METRICS_PORT": str(port),
                "WORKER_METRICS_ADDR": "127.0.0.1",
                "LOG_FORMAT": "json",
                "OBS_TEST_LLM_API_KEY": LLM_KEY,
                "AGENT_HTTP_ALLOW_PRIVATE": "true",
                "AGENT_API_KEY_HOSTS": openai.url,  # a key goes only to a listed origin
            }
        )
        url = f"http://127.0.0.1:{port}/metrics"
        before = scrape(url)
        assert value(before, "agentledger_task_attempts_total", agent="echo", status="succeeded", cause="success") == 0

        workflow, _ = workflow_submit(
            spec={
                "name": "observed",
                "continue_on_failure": True,
                "tasks": [
                    {"name": "a", "agent": "echo", "input": {"n": 1}},
                    {"name": "b", "agent": "flaky", "input": {"fail_times": 1}, "max_retries": 2, "depends_on": ["a"]},
                    {"name": "c", "agent": "writer", "input": {"prompt": "hi"}},
                    {"name": "d", "agent": "fail", "input": {}, "max_retries": 0},
                ],
            }
        )
        finished(workflow)
    samples = scrape(url)

    def attempts(agent: str, status: str, cause: str) -> float:
        return value(samples, "agentledger_task_attempts_total", agent=agent, status=status, cause=cause)

    assert attempts("echo", "succeeded", "success") == 1
    assert attempts("flaky", "failed", "error") == 1
    assert attempts("flaky", "succeeded", "success") == 1
    assert attempts("writer", "succeeded", "success") == 1
    assert attempts("fail", "failed", "error") == 1
    assert value(samples, "agentledger_task_retries_total", agent="flaky") == 1
    assert value(samples, "agentledger_task_retries_total", agent="echo") == 0
    assert value(samples, "agentledger_tasks_finished_total", agent="flaky", status="completed") == 1
    assert value(samples, "agentledger_tasks_finished_total", agent="fail", status="failed") == 1
    assert value(samples, "agentledger_task_duration_seconds_count", agent="flaky", status="failed") == 1
    assert value(samples, "agentledger_task_duration_seconds_count", agent="echo", status="succeeded") == 1
    echo_ms = TaskAttempt.objects.get(execution__workflow=workflow, execution__task_name="a").duration_ms
    assert value(samples, "agentledger_task_duration_seconds_sum", agent="echo", status="succeeded") == pytest.approx(
        echo_ms / 1000, abs=1e-3
    )
    # Five attempts started from five messages on the default queue.
    assert value(samples, "agentledger_task_queue_wait_seconds_count", queue="normal") == 5
    assert value(samples, "agentledger_tokens_total", agent="writer", direction="input") == 1200
    assert value(samples, "agentledger_tokens_total", agent="writer", direction="output") == 350
    writer = TaskExecution.objects.get(workflow=workflow, task_name="c")
    assert writer.cost_usd > 0
    assert Decimal(str(value(samples, "agentledger_cost_usd_total", agent="writer"))) == pytest.approx(writer.cost_usd)
    assert value(samples, "agentledger_observability_errors_total", component="attempt_finished") == 0

    # Every log line written while run_task ran carries the task's context.
    failing = TaskExecution.objects.get(workflow=workflow, task_name="d")
    lines = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("execution_id") == failing.pk]
    assert any("failed" in line["message"] and line["logger"] == "orchestration.services.execution" for line in mine)
    assert any(line["logger"] == "celery.app.trace" for line in mine)
    assert all(line["workflow_id"] == workflow.pk and line["attempt"] == 1 for line in mine if line["attempt"])
    assert LLM_KEY not in worker.log()


def test_metrics_port_without_multiprocess_dir_is_refused_with_a_clear_error(settings, caplog):
    from observability import worker

    settings.WORKER_METRICS_PORT = free_port()
    settings.PROMETHEUS_MULTIPROC_DIR = None
    assert worker.metrics_server_start() is None
    assert "PROMETHEUS_MULTIPROC_DIR is not" in caplog.text


def test_a_metrics_port_in_use_leaves_the_worker_running_without_it(settings, caplog, tmp_path):
    import socket

    from observability import worker

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        settings.WORKER_METRICS_PORT = taken.getsockname()[1]
        settings.WORKER_METRICS_ADDR = "127.0.0.1"
        settings.PROMETHEUS_MULTIPROC_DIR = str(tmp_path)
        assert worker.metrics_server_start() is None
    assert "cannot listen" in caplog.text


POOL_PROCESS = """
import sys
from prometheus_client import Counter, Histogram
Counter("pool_test_attempts", "attempts", ["agent"]).labels("echo").inc(int(sys.argv[1]))
Histogram("pool_test_seconds", "durations", buckets=(1, 10)).observe(float(sys.argv[2]))
"""


def _pool_process(directory, count: int, seconds: float) -> None:
    """A process that records like a pool process (multiprocess mode) and exits."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    subprocess.run([sys.executable, "-c", POOL_PROCESS, str(count), str(seconds)], env=env, check=True)


def test_files_of_exited_pool_processes_are_merged_and_their_counts_kept(settings, tmp_path):
    """Every recycled pool process (--max-tasks-per-child, a hard time limit, a cancellation)
    leaves its files behind; without merging, the directory and each scrape's cost grow with
    every process the worker ever ran."""
    from observability import worker

    directory = tmp_path / "prometheus"
    directory.mkdir()
    settings.WORKER_METRICS_PORT = free_port()
    settings.WORKER_METRICS_ADDR = "127.0.0.1"
    settings.PROMETHEUS_MULTIPROC_DIR = str(directory)
    for count, seconds in ((1, 0.5), (2, 5.0), (3, 50.0)):
        _pool_process(directory, count, seconds)
    assert len(list(directory.glob("*.db"))) == 6
    port = worker.metrics_server_start()
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        samples = scrape(url)
        assert value(samples, "pool_test_attempts_total", agent="echo") == 6
        assert value(samples, "pool_test_seconds_count") == 3
        assert value(samples, "pool_test_seconds_bucket", le="1.0") == 1
        assert value(samples, "pool_test_seconds_bucket", le="10.0") == 2
        assert sorted(p.name for p in directory.glob("*.db")) == ["counter_archive.db", "histogram_archive.db"]

        # More processes come and go: merged into the same files, nothing counted twice.
        for count, seconds in ((4, 0.1), (5, 0.2)):
            _pool_process(directory, count, seconds)
        assert scrape(url) == scrape(url)
        samples = scrape(url)
        assert value(samples, "pool_test_attempts_total", agent="echo") == 15
        assert value(samples, "pool_test_seconds_count") == 5
        assert value(samples, "pool_test_seconds_bucket", le="1.0") == 3
        assert value(samples, "pool_test_seconds_sum") == pytest.approx(55.8)
        assert len(list(directory.glob("*.db"))) == 2
    finally:
        worker.metrics_server_stop()


def test_files_of_live_processes_are_left_alone(tmp_path):
    from observability.worker import dead_process_files_merge

    _pool_process(tmp_path, 2, 1.0)
    names = sorted(p.name for p in tmp_path.glob("*.db"))
    assert dead_process_files_merge(str(tmp_path), alive=lambda pid: True) == 0
    assert sorted(p.name for p in tmp_path.glob("*.db")) == names


def test_the_web_merges_the_files_of_exited_gunicorn_processes(db, client, settings, tmp_path):
    """gunicorn replaces its processes at every reload (SIGHUP), crash or timeout; each left
    its two files in the web's directory until the container restarted, read at every scrape."""
    directory = tmp_path / "prometheus"
    directory.mkdir()
    settings.PROMETHEUS_MULTIPROC_DIR = str(directory)
    for count, seconds in ((1, 0.5), (2, 5.0), (3, 50.0)):
        _pool_process(directory, count, seconds)
    assert len(list(directory.glob("*.db"))) == 6

    samples = parse_samples(client.get("/metrics").content.decode())

    assert value(samples, "pool_test_attempts_total", agent="echo") == 6
    assert value(samples, "pool_test_seconds_count") == 3
    assert sorted(p.name for p in directory.glob("*.db")) == ["counter_archive.db", "histogram_archive.db"]
    _pool_process(directory, 4, 0.1)  # another reload
    samples = parse_samples(client.get("/metrics").content.decode())
    assert value(samples, "pool_test_attempts_total", agent="echo") == 10
    assert value(samples, "pool_test_seconds_bucket", le="1.0") == 2
    assert len(list(directory.glob("*.db"))) == 2
