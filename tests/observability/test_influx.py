"""The InfluxDB writer against a local server implementing /api/v2/write, and against
endpoints that refuse connections or never answer."""

from __future__ import annotations

import datetime as dt
import gc
import os
import threading
import time
from collections.abc import Iterator
from decimal import Decimal

import pytest
from django.db.models import Sum
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from observability import influx
from observability.influx import InfluxWriter, attempt_point
from orchestration.models import Agent, TaskAttempt, Workflow
from orchestration.services.workflows import workflow_cancel, workflow_submit
from tests.engine import longer_hard_grace, wait_for
from tests.fakes.servers import InfluxDBServer, Reply, parse_line_protocol
from tests.observability.conftest import free_port, scrape, value

TOKEN = "influx-test-token-0123456789"


def dropped(reason: str) -> float:
    return REGISTRY.get_sample_value("agentledger_influxdb_points_dropped_total", {"reason": reason}) or 0.0


def written() -> float:
    return REGISTRY.get_sample_value("agentledger_influxdb_points_written_total") or 0.0


def make_writer(url: str, **overrides: int) -> InfluxWriter:
    options = {
        "batch_size": 100,
        "flush_interval_ms": 50,
        "max_buffered_points": 1000,
        "timeout_ms": 500,
        "max_retries": 0,
        "exit_wait_ms": 500,
        **overrides,
    }
    return InfluxWriter(url=url, token=TOKEN, org="agentledger", bucket="tasks", **options)


def point(n: int = 1, **fields: object):
    values = {
        "agent_id": "echo",
        "status": "succeeded",
        "cause": "success",
        "attempt_id": 1000 + n,
        "execution_id": f"exec {n}",
        "workflow_id": 'wf "quoted"',
        "attempt_number": n,
        "duration_ms": 12.5,
        "input_tokens": 1200,
        "output_tokens": 350,
        "cost_usd": Decimal("0.00039"),
        "at": dt.datetime(2026, 11, 22, 4, 0, tzinfo=dt.UTC),
    }
    values.update(fields)
    return attempt_point(**values)


@pytest.fixture
def server() -> Iterator[InfluxDBServer]:
    with InfluxDBServer(token=TOKEN, org="agentledger", bucket="tasks") as fake:
        yield fake


def test_line_protocol_parser_checks_what_influxdb_checks():
    (p,) = parse_line_protocol('m\\ 1,t\\,a=x\\ y f="a \\"b\\"",i=3i,b=t 1700000000000')
    assert (p.measurement, p.tags, p.fields, p.timestamp) == (
        "m 1",
        {"t,a": "x y"},
        {"f": 'a "b"', "i": 3, "b": True},
        1700000000000,
    )
    for bad in ("m", "m,t= f=1", "m f=", 'm f="open'):
        with pytest.raises(ValueError):
            parse_line_protocol(bad)


def test_points_are_batched_and_written_as_valid_line_protocol(server):
    before = written()
    writer = make_writer(server.url)
    try:
        for n in range(1, 4):
            assert writer.write(point(n))
        wait_for(lambda: len(server.points) == 3, timeout=10, what="three points at the server")
    finally:
        writer.close()
    assert len(server.requests) == 1  # one batch
    assert server.precisions == ["ns"]
    first = server.points[0]
    assert first.measurement == "task_attempt"
    assert first.tags == {"agent_id": "echo", "status": "succeeded", "cause": "success"}
    assert first.fields == {
        "duration_ms": 12.5,
        "input_tokens": 1200,
        "output_tokens": 350,
        "cost_usd": 0.00039,
        "attempt": 1,
        "execution_id": "exec 1",
        "workflow_id": 'wf "quoted"',
    }
    assert isinstance(first.fields["input_tokens"], int) and isinstance(first.fields["duration_ms"], float)
    # the finish time to the millisecond, plus the attempt's id in nanoseconds
    assert first.timestamp == int(dt.datetime(2026, 11, 22, 4, 0, tzinfo=dt.UTC).timestamp() * 1000) * 10**6 + 1001
    assert written() == before + 3
    assert writer.pending == 0


def test_a_refused_write_is_counted_as_dropped(server):
    writer = InfluxWriter(
        url=server.url, token="wrong", org="agentledger", bucket="tasks",
        batch_size=10, flush_interval_ms=50, max_buffered_points=100, timeout_ms=500, max_retries=0,
        exit_wait_ms=500,
    )  # fmt: skip
    before = dropped("write_failed")
    try:
        writer.write(point(1))
        writer.write(point(2))
        wait_for(lambda: dropped("write_failed") == before + 2, timeout=10, what="the failed batch to be counted")
    finally:
        writer.close()
    assert server.points == [] and writer.pending == 0


def test_a_closed_port_drops_points_after_the_retries_without_blocking_writes(dead_port):
    # Retried after 1 s: five writes that waited for their batch would take 5 s or more.
    writer = make_writer(f"http://127.0.0.1:{dead_port}", max_retries=1, timeout_ms=5000)
    before = dropped("write_failed")
    try:
        started = time.monotonic()
        for n in range(5):
            writer.write(point(n))
        assert time.monotonic() - started < 2
        wait_for(lambda: dropped("write_failed") == before + 5, timeout=15, what="the points to be dropped")
    finally:
        writer.close()


def test_a_retry_after_longer_than_the_longest_retry_delay_is_not_waited_for(server):
    """InfluxDB's 429 and 503 ask for a wait (Retry-After): the retry waits at most the
    longest retry delay (1 s here), not the 30 s asked, with the writer's one thread, while the
    points written meanwhile fill the buffer and are dropped, InfluxDB answering again."""
    server.script(Reply(status=503, body={"code": "unavailable", "message": "busy"}, headers={"Retry-After": "30"}))
    writer = make_writer(server.url, max_retries=3, timeout_ms=500)
    try:
        started = time.monotonic()
        writer.write(point(1))
        wait_for(lambda: len(server.points) == 1, timeout=10, what="the batch to be written again")
        assert time.monotonic() - started < 5
        assert len(server.requests) == 2
    finally:
        writer.close()
    assert writer.pending == 0


def test_a_server_that_never_answers_fills_the_bounded_buffer_then_drops(silent_port):
    # Each request waits 5 s for an answer: ten writes that waited would take 50 s.
    writer = make_writer(f"http://127.0.0.1:{silent_port}", max_buffered_points=3, timeout_ms=5000, max_retries=0)
    before, before_exit = dropped("buffer_full"), dropped("process_exit")
    try:
        started = time.monotonic()
        accepted = [writer.write(point(n)) for n in range(10)]
        assert time.monotonic() - started < 2
        assert accepted == [True] * 3 + [False] * 7
        assert dropped("buffer_full") == before + 7
        assert writer.pending == 3
    finally:
        started = time.monotonic()
        writer.close()
        assert time.monotonic() - started < 2  # closing is bounded too (by exit_wait_ms here)
        assert dropped("process_exit") == before_exit + 3  # the three InfluxDB never answered for


def test_points_dropped_by_a_full_buffer_are_logged_as_it_fills_and_as_it_drains(server, caplog):
    """Points dropped because InfluxDB is slow were only counted: the log said nothing of
    them. One line as the buffer fills, and one with how many were dropped as it takes points
    again: not a line per point."""
    server.script(Reply(delay=1.5))  # the first batch's answer
    writer = make_writer(server.url, max_buffered_points=3, timeout_ms=5000)
    try:
        with caplog.at_level("WARNING", logger="observability.influx"):
            accepted = [writer.write(point(n)) for n in range(8)]
            wait_for(lambda: writer.pending == 0, timeout=10, what="InfluxDB to answer")
            assert writer.write(point(9))
    finally:
        writer.close()
    assert accepted == [True] * 3 + [False] * 5
    lines = [r.getMessage() for r in caplog.records if r.name == "observability.influx"]
    assert len(lines) == 2, lines
    assert "holds 3 points not yet written" in lines[0] and "dropped" in lines[0]
    assert "5 were dropped" in lines[1]


def test_writer_is_off_without_influxdb_url(settings):
    settings.INFLUXDB_URL = None
    assert influx.writer() is None
    assert influx.attempt_point_write(**{"agent_id": "x"}) is False


# --- through a real worker --------------------------------------------------------------


def influx_env(url: str, **extra: str) -> dict[str, str]:
    return {
        "INFLUXDB_URL": url,
        "INFLUXDB_TOKEN": TOKEN,
        "INFLUXDB_ORG": "agentledger",
        "INFLUXDB_BUCKET": "tasks",
        "INFLUXDB_FLUSH_INTERVAL_MS": "50",
        **extra,
    }


def chain(length: int) -> Workflow:
    tasks = [{"name": "t0", "agent": "echo", "input": {"n": 0}}]
    tasks += [{"name": f"t{n}", "agent": "echo", "depends_on": [f"t{n - 1}"]} for n in range(1, length)]
    workflow, _ = workflow_submit(spec={"name": "chain", "tasks": tasks})
    return workflow


def run_to_completion(workflow: Workflow, timeout: float = 40) -> float:
    started = time.monotonic()
    wait_for(
        lambda: Workflow.objects.get(pk=workflow.pk).is_terminal,
        timeout=timeout,
        interval=0.05,
        what=f"workflow {workflow.pk} to finish",
    )
    assert Workflow.objects.get(pk=workflow.pk).status == Workflow.Status.COMPLETED
    return time.monotonic() - started


@pytest.mark.django_db(transaction=True)
def test_worker_writes_one_point_per_attempt(engine, server):
    engine(env=influx_env(server.url))
    workflow, _ = workflow_submit(
        spec={
            "name": "influx",
            "tasks": [
                {"name": "a", "agent": "echo", "input": {}},
                {"name": "b", "agent": "flaky", "input": {"fail_times": 1}, "max_retries": 1, "depends_on": ["a"]},
            ],
        }
    )
    run_to_completion(workflow)
    wait_for(lambda: len(server.points) == 3, timeout=10, what="three points at the fake InfluxDB")
    recorded = {
        (a.execution_id, a.attempt_number): a
        for a in TaskAttempt.objects.filter(execution__workflow=workflow).select_related("execution")
    }
    for p in server.points:
        attempt = recorded[(p.fields["execution_id"], p.fields["attempt"])]
        assert p.measurement == "task_attempt"
        assert p.tags["agent_id"] == attempt.execution.agent_id
        assert p.tags["status"] == attempt.status
        assert p.tags["cause"] == (attempt.cause or "success")
        assert p.fields["workflow_id"] == workflow.pk
        assert p.fields["duration_ms"] == pytest.approx(attempt.duration_ms, abs=0.01)
        assert abs(p.timestamp / 10**9 - attempt.finished_at.timestamp()) < 5
    assert sorted(p.tags["status"] for p in server.points) == ["failed", "succeeded", "succeeded"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("endpoint", ["closed", "silent"])
def test_a_dead_influxdb_does_not_slow_tasks(engine, endpoint, dead_port, silent_port, tmp_path):
    port = dead_port if endpoint == "closed" else silent_port
    metrics_port = free_port()
    (tmp_path / "prometheus").mkdir()
    # Each write waits up to 5 s for an answer: six tasks writing in line would take 30 s or more.
    engine(
        concurrency=1,
        env=influx_env(
            f"http://127.0.0.1:{port}",
            INFLUXDB_TIMEOUT_MS="5000",
            INFLUXDB_MAX_RETRIES="1",
            INFLUXDB_MAX_BUFFERED_POINTS="2",
            PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prometheus"),
            WORKER_METRICS_PORT=str(metrics_port),
            WORKER_METRICS_ADDR="127.0.0.1",
        ),
    )
    elapsed = run_to_completion(chain(6))
    assert elapsed < 15, f"six tasks took {elapsed:.1f} s"
    samples = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
    assert value(samples, "agentledger_task_attempts_total", agent="echo", status="succeeded", cause="success") == 6
    assert value(samples, "agentledger_influxdb_points_written_total") == 0
    # At most two points wait for the dead endpoint; the rest were dropped and counted.
    lost = value(samples, "agentledger_influxdb_points_dropped_total", reason="buffer_full") + value(
        samples, "agentledger_influxdb_points_dropped_total", reason="write_failed"
    )
    assert lost >= 4


def cancel_a_running_task() -> None:
    """Cancel a task while it runs: its pool process is terminated, and replaced."""
    workflow, _ = workflow_submit(
        spec={"name": "cancelled", "tasks": [{"name": "s", "agent": "sleep", "input": {"seconds": 30}}]}
    )
    running = TaskAttempt.objects.filter(execution__workflow=workflow, status=TaskAttempt.Status.RUNNING)
    wait_for(running.exists, what="the task to run")
    workflow_cancel(workflow_id=workflow.pk)


@pytest.mark.django_db(transaction=True)
def test_a_pool_process_replaced_while_influxdb_is_slow_frees_its_slot_at_once(engine):
    """The process a cancel terminates closes its writer, a write still waiting for InfluxDB:
    its slot (the only one) is not free until that returns. It waits the exit wait (0.5 s),
    not the write's timeout (20 s here)."""
    with InfluxDBServer(token=TOKEN) as slow:
        slow.script(*[Reply(delay=60) for _ in range(10)])
        engine(concurrency=1, env=influx_env(slow.url, INFLUXDB_TIMEOUT_MS="20000", INFLUXDB_MAX_RETRIES="0"))
        run_to_completion(chain(1))
        wait_for(lambda: len(slow.requests) == 1, timeout=10, what="its point to be sent")
        cancel_a_running_task()
        started = time.monotonic()
        run_to_completion(chain(1))
        elapsed = time.monotonic() - started
    assert elapsed < 12, f"the next task took {elapsed:.1f} s"


@pytest.mark.django_db(transaction=True)
def test_a_pool_process_replaced_sends_the_points_it_held_to_a_healthy_influxdb(engine, server):
    """Not waiting for a failing InfluxDB must not lose what a healthy one would take: the
    point of the last task a terminated process ran, held for a flush a minute away, is sent
    as the process exits."""
    engine(concurrency=1, env=influx_env(server.url, INFLUXDB_FLUSH_INTERVAL_MS="60000"))
    workflow = chain(1)
    run_to_completion(workflow)
    assert server.requests == []  # its point waits for the next flush, a minute away
    cancel_a_running_task()
    wait_for(lambda: len(server.points) == 1, timeout=15, what="the point to be sent as its process exits")
    assert server.points[0].fields["workflow_id"] == workflow.pk


@pytest.mark.django_db
def test_rollup_points_carry_every_metric_of_each_agent_for_the_period(server, settings):
    from tests.factories import AgentFactory, MetricFactory

    settings.INFLUXDB_URL, settings.INFLUXDB_TOKEN = server.url, TOKEN
    settings.INFLUXDB_ORG, settings.INFLUXDB_BUCKET = "agentledger", "tasks"
    settings.INFLUXDB_FLUSH_INTERVAL_MS = 50
    start = dt.datetime(2026, 11, 22, 3, 0, tzinfo=dt.UTC)
    for agent_id, tasks, cost in (("alpha", 4, 0.5), ("beta", 2, 0.25)):
        agent = AgentFactory(id=agent_id)
        for metric_type, metric_value in (("tasks", tasks), ("cost", cost), ("success_rate", 75.0)):
            MetricFactory(
                agent=agent, metric_type=metric_type, metric_value=metric_value, period="hour", period_start=start
            )
    MetricFactory(
        agent=agent, metric_type="tasks", metric_value=9, period="hour", period_start=start - dt.timedelta(hours=1)
    )
    try:
        assert influx.rollup_points_write(period="hour", period_start=start) == 2
        wait_for(lambda: len(server.points) == 2, timeout=10, what="two rollup points")
    finally:
        influx.writer_close()
    alpha, beta = sorted(server.points, key=lambda p: p.tags["agent_id"])
    assert alpha.measurement == "agent_rollup"
    assert alpha.tags == {"agent_id": "alpha", "period": "hour"}
    assert alpha.fields == {"tasks": 4.0, "cost": 0.5, "success_rate": 75.0}
    assert beta.fields["tasks"] == 2.0
    assert alpha.timestamp == int(start.timestamp())


@pytest.mark.django_db
def test_reaped_attempts_are_written_with_what_they_spent(server, settings):
    """An attempt closed outside attempt_run keeps the tokens and cost metered while it ran:
    its point carries them, as the Prometheus counters do."""
    from observability.attempts import attempts_reaped
    from tests.factories import TaskAttemptFactory

    settings.INFLUXDB_URL, settings.INFLUXDB_TOKEN = server.url, TOKEN
    settings.INFLUXDB_ORG, settings.INFLUXDB_BUCKET = "agentledger", "tasks"
    settings.INFLUXDB_FLUSH_INTERVAL_MS = 50
    finished_at = dt.datetime(2026, 11, 22, 4, 0, tzinfo=dt.UTC)
    lost = TaskAttemptFactory(
        status="lost",
        cause="worker_lost",
        finished_at=finished_at,
        duration_ms=31000.0,
        input_tokens=900,
        output_tokens=120,
        cost_usd=Decimal("0.0125"),
    )
    try:
        attempts_reaped(attempts=[lost])
        wait_for(lambda: len(server.points) == 1, timeout=10, what="the reaped attempt's point")
    finally:
        influx.writer_close()
    (written_point,) = server.points
    assert written_point.tags == {"agent_id": lost.execution.agent_id, "status": "lost", "cause": "worker_lost"}
    assert (written_point.fields["input_tokens"], written_point.fields["output_tokens"]) == (900, 120)
    assert written_point.fields["cost_usd"] == 0.0125
    assert written_point.fields["duration_ms"] == 31000.0


@pytest.mark.django_db(transaction=True)
def test_attempts_the_reaper_closes_in_one_pass_are_each_kept_by_influxdb(engine, server, settings):
    """A killed worker's attempts are closed by one reaper pass, all at the pass's time. InfluxDB
    keeps one point per measurement, tag set and timestamp: the points of two attempts of one
    agent closed alike must not share a timestamp, or the second overwrites the first."""
    from orchestration.tasks import reap_stale_tasks

    settings.INFLUXDB_URL, settings.INFLUXDB_TOKEN = server.url, TOKEN
    settings.INFLUXDB_ORG, settings.INFLUXDB_BUCKET = "agentledger", "tasks"
    settings.INFLUXDB_FLUSH_INTERVAL_MS = 50
    worker = engine(concurrency=2)
    sleeper = {"agent": "sleep", "input": {"seconds": 30}, "timeout_seconds": 1, "max_retries": 0}
    tasks = [{"name": "a", **sleeper}, {"name": "b", **sleeper}]
    workflow, _ = workflow_submit(spec={"name": "killed", "tasks": tasks})
    running = TaskAttempt.objects.filter(execution__workflow=workflow, status=TaskAttempt.Status.RUNNING)
    wait_for(lambda: running.count() == 2, what="both attempts to run")
    worker.kill()
    # past both attempts' hard limit (2 s) and the reaper's grace (1 s): one pass closes both
    time.sleep(max(a.started_at for a in running).timestamp() + 3.5 - time.time())
    try:
        assert reap_stale_tasks()["lost"] == 2
        wait_for(lambda: len(server.points) == 2, timeout=10, what="the two reaped attempts' points")
    finally:
        influx.writer_close()
    closed = TaskAttempt.objects.filter(execution__workflow=workflow)
    assert {(a.status, a.cause) for a in closed} == {("lost", "worker_lost")}
    assert len({a.finished_at for a in closed}) == 1
    kept = {fields["execution_id"] for (measurement, _, _), fields in server.stored.items()}
    assert kept == {a.execution_id for a in closed}


@pytest.mark.subprocess
@pytest.mark.django_db(transaction=True)
def test_attempts_manage_py_reap_stale_tasks_closes_are_counted_and_written(server, settings, tmp_path):
    """`manage.py reap_stale_tasks` run by hand closed attempts and reported nothing: no count,
    no point (the beat's task reported its closes). Its InfluxDB writer's own close at exit
    came after the interpreter had stopped its threads, and dropped what it held: the command
    sends it before it ends."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    from tests.engine import database_url, manage
    from tests.factories import AgentFactory
    from tests.observability.test_attempts import _claimed_five_minutes_ago

    _, claim = _claimed_five_minutes_ago(AgentFactory(id="reaped-by-hand"), max_retries=0)
    environment = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": database_url(),
        "REDIS_URL": settings.REDIS_URL,
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
        # A flush interval longer than the command: only its close sends the point.
        **influx_env(server.url, INFLUXDB_FLUSH_INTERVAL_MS="60000"),
    }
    out = manage("reap_stale_tasks", env=environment, timeout=120).stdout
    assert out.startswith("timed out: 0  lost: 1  "), out

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    labels = {"agent": "reaped-by-hand", "status": "lost", "cause": "worker_lost"}
    assert registry.get_sample_value("agentledger_task_attempts_total", labels) == 1
    (written_point,) = server.points  # sent before the command ended
    assert written_point.tags == {"agent_id": "reaped-by-hand", "status": "lost", "cause": "worker_lost"}
    assert written_point.fields["execution_id"] == str(claim.attempt.execution_id)


# What a process that writes points runs, then ends the way a short-lived one does (a
# management command, a gunicorn worker past max_requests): by returning, with the writer
# still holding them. It prints when it ends, to time the interpreter's exit.
EXITING_PROCESS = """
import datetime as dt, time
from observability import influx
for n in range(3):
    influx.attempt_point_write(
        agent_id="exiting", status="succeeded", cause="success", attempt_id=n, execution_id=f"exec {{n}}",
        workflow_id=None, attempt_number=1, duration_ms=1.0, at=dt.datetime(2026, 12, 7, tzinfo=dt.UTC),
    )
time.sleep({sleep})
print("ending at", time.time())
"""


def exiting_process(server_url: str, tmp_path, *, sleep: float = 0, **extra: str) -> tuple[float, CollectorRegistry]:
    """Run EXITING_PROCESS under `manage.py shell`; how long its exit took (after its last
    line), and the metrics it left."""
    from tests.engine import manage

    environment = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
        **influx_env(server_url, **extra),
    }
    result = manage("shell", "-c", EXITING_PROCESS.format(sleep=sleep), env=environment, timeout=180)
    ended = time.time()
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("ending at ")]
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    return ended - float(line.split()[-1]), registry


@pytest.mark.subprocess
def test_a_process_that_exits_sends_the_points_it_holds(server, tmp_path):
    """A process that ends between two flushes (a management command, a gunicorn worker
    recycled) sends what it holds as it exits. Its writer's close used to come after the
    interpreter had stopped its threads: the points were dropped (as write_failed), and only
    after the exit had waited for the flush interval, a minute here."""
    took, registry = exiting_process(server.url, tmp_path, INFLUXDB_FLUSH_INTERVAL_MS="60000")
    assert sorted(p.fields["execution_id"] for p in server.points) == ["exec 0", "exec 1", "exec 2"]
    assert registry.get_sample_value("agentledger_influxdb_points_written_total") == 3
    assert took < 15, took  # the interpreter's own teardown, on a loaded machine


@pytest.mark.subprocess
def test_a_process_that_exits_while_influxdb_is_slow_waits_at_most_the_exit_wait(server, tmp_path):
    """InfluxDB takes a minute to answer the batch a process sent before it ended: the exit
    waits INFLUXDB_EXIT_WAIT_MS for it, not the write's timeout, and counts the points it
    leaves. The client's threads were joined at exit: it waited for the answer."""
    server.script(Reply(delay=60))
    took, registry = exiting_process(
        server.url,
        tmp_path,
        sleep=2,  # the batch is sent (50 ms flush interval) and waits for its answer
        INFLUXDB_TIMEOUT_MS="60000",
        INFLUXDB_MAX_RETRIES="0",
        INFLUXDB_EXIT_WAIT_MS="300",
    )
    assert len(server.requests) == 1
    assert took < 15, took  # 60 s before
    assert registry.get_sample_value("agentledger_influxdb_points_dropped_total", {"reason": "process_exit"}) == 3


def test_points_still_waiting_for_a_retry_at_close_are_counted_as_dropped(dead_port):
    """A pool process that exits (max-tasks-per-child, a shutdown) closes its writer: what
    InfluxDB did not take by then goes with the process, and must show in the dropped count."""
    writer = make_writer(f"http://127.0.0.1:{dead_port}", max_retries=3, timeout_ms=1000)
    before = {reason: dropped(reason) for reason in ("process_exit", "write_failed")}
    for n in range(3):
        assert writer.write(point(n))
    writer.close()
    assert dropped("process_exit") == before["process_exit"] + 3
    assert writer.pending == 0
    time.sleep(3)  # the client's retries, still running in its thread, end: nothing counted twice
    assert {reason: dropped(reason) for reason in before} == {**before, "process_exit": before["process_exit"] + 3}


def test_closing_sends_what_the_writer_held_to_a_healthy_influxdb(server):
    """A pool process recycled between two flushes holds points no batch has carried yet:
    closing sends them, and a healthy InfluxDB answers within the exit wait."""
    writer = make_writer(server.url, flush_interval_ms=60_000)
    before = written()
    for n in range(3):
        assert writer.write(point(n))
    assert server.requests == []  # the next flush would be a minute away
    started = time.monotonic()
    writer.close()
    assert time.monotonic() - started < 1
    assert len(server.points) == 3
    assert written() == before + 3 and writer.pending == 0


def test_closing_waits_no_longer_than_the_exit_wait_for_a_slow_influxdb(server):
    """InfluxDB answers, but slowly: a pool process that exits holds its worker's slot while
    it waits, so it waits exit_wait_ms, not the write's timeout, and counts what it leaves."""
    server.script(Reply(delay=3))
    writer = make_writer(server.url, timeout_ms=10_000, exit_wait_ms=300)
    before = {"written": written(), "process_exit": dropped("process_exit")}
    assert writer.write(point(1)) and writer.write(point(2))
    wait_for(lambda: len(server.requests) == 1, timeout=10, what="the batch to be sent")
    started = time.monotonic()
    writer.close()
    assert time.monotonic() - started < 1.5  # the answer comes 3 s after the request
    assert {"written": written(), "process_exit": dropped("process_exit")} == {
        "written": before["written"],
        "process_exit": before["process_exit"] + 2,
    }
    assert writer.pending == 0


def test_closing_does_not_wait_for_an_influxdb_whose_last_answer_was_a_failure(silent_port):
    """Once a write timed out, the next one most likely will too: a process that exits then
    drops what it holds at once, whatever its exit wait."""
    writer = make_writer(f"http://127.0.0.1:{silent_port}", timeout_ms=2000, exit_wait_ms=10_000)
    before = {reason: dropped(reason) for reason in ("process_exit", "write_failed")}
    assert writer.write(point(1))
    wait_for(lambda: dropped("write_failed") == before["write_failed"] + 1, timeout=10, what="the write to time out")
    assert writer.write(point(2))
    started = time.monotonic()
    writer.close()
    assert time.monotonic() - started < 0.7  # the write it would wait for times out after 2 s
    assert dropped("process_exit") == before["process_exit"] + 1
    assert writer.pending == 0


def writer_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name == "influxdb-writer"}


def test_the_threads_of_a_writer_closed_and_gone_end(server):
    """As a ThreadPoolExecutor's do, a writer's threads end once it is closed and no longer
    referred to: each writer made again in a process (a test, a process whose writer was
    closed) kept one waiting for work for the life of the process."""
    before = writer_threads()
    for n in range(5):
        writer = make_writer(server.url)
        assert writer.write(point(n))
        wait_for(lambda count=n + 1: len(server.points) == count, timeout=10, what="the point to be written")
        writer.close()
    del writer

    def ended() -> bool:
        gc.collect()
        return not writer_threads() - before

    wait_for(ended, timeout=10, what="the closed writers' threads to end")


@pytest.mark.django_db(transaction=True)
def test_a_charge_that_arrives_after_its_attempt_was_closed_is_in_its_point(engine, server, tmp_path):
    """A try presumed lost when its message was redelivered (its worker could not say it still
    ran it) finishes later: what it reported spending is added to its lost attempt. The points
    InfluxDB keeps then add up to the attempts' tokens and cost, as the database's totals do."""
    Agent.objects.create(
        id="held", name="Held", executor=Agent.Executor.PYTHON, entrypoint="tests.orchestration.edge_agents.held"
    )
    release = tmp_path / "release"
    worker = engine(
        concurrency=2, env=influx_env(server.url, CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS="false")
    )
    workflow, _ = workflow_submit(
        spec={
            "name": "late",
            "tasks": [{"name": "t", "agent": "held", "input": {"release": str(release)}, "max_retries": 1}],
        }
    )
    first = wait_for(
        lambda: TaskAttempt.objects.filter(execution__workflow=workflow, status=TaskAttempt.Status.RUNNING).first(),
        what="the first try to run",
    )
    # Recorded before worker processes were: the redelivered message cannot ask whether it still runs.
    unknown = {"worker_pid": None, "worker_started_at": None, "pool_pid": None}
    assert TaskAttempt.objects.filter(pk=first.pk).update(**unknown) == 1
    assert worker.broker_connections_cut()
    run_to_completion(workflow, timeout=60)
    release.touch()
    ended = f"orchestration.run_task[{first.celery_task_id}] succeeded"
    wait_for(lambda: worker.log().count(ended) == 2, timeout=30, what="the first try to end")

    attempts = TaskAttempt.objects.filter(execution__workflow=workflow)
    assert sorted(attempts.values_list("status", "tokens_used")) == [("lost", 120), ("succeeded", 120)]
    paid = attempts.aggregate(input=Sum("input_tokens"), output=Sum("output_tokens"), cost=Sum("cost_usd"))
    assert (paid["input"], paid["output"], paid["cost"]) == (200, 40, Decimal("0.0246"))

    def kept() -> tuple[int, int, float]:
        fields = [f for (measurement, _, _), f in server.stored.items() if measurement == "task_attempt"]
        return (
            sum(f["input_tokens"] for f in fields),
            sum(f["output_tokens"] for f in fields),
            round(sum(f["cost_usd"] for f in fields), 6),
        )

    wait_for(lambda: kept() == (200, 40, 0.0246), timeout=10, what="the points to add up to the attempts' spend")


@pytest.mark.django_db(transaction=True)
def test_a_charge_after_a_soft_time_out_is_not_a_second_point(engine, server, tmp_path, settings):
    """A try recorded timed out at its soft limit has its point written as it ends; a call it
    had left running in a thread of its own is paid later, and added to the attempt as late
    usage. InfluxDB then keeps one point of that attempt, with its whole spend: the points add
    up to what the attempts cost, as the database's totals do."""
    Agent.objects.create(
        id="late-thread",
        name="Late thread",
        executor=Agent.Executor.PYTHON,
        entrypoint="tests.orchestration.edge_agents.paid_after_its_soft_limit",
    )
    release = tmp_path / "release"
    # Its record and point are written after the soft limit: not cut short by the hard one.
    engine(env=influx_env(server.url, **longer_hard_grace(settings)))
    workflow, _ = workflow_submit(
        spec={
            "name": "soft",
            "tasks": [
                {
                    "name": "t",
                    "agent": "late-thread",
                    "input": {"release": str(release)},
                    "timeout_seconds": 1,
                    "max_retries": 0,
                }
            ],
        }
    )
    wait_for(lambda: Workflow.objects.get(pk=workflow.pk).is_terminal, timeout=60, what="the workflow to fail")
    attempt = TaskAttempt.objects.get(execution__workflow=workflow)
    assert (attempt.status, attempt.cause, attempt.input_tokens) == ("timed_out", "soft_timeout", 10)
    wait_for(lambda: len(server.points) == 1, timeout=30, what="the timed-out attempt's point")
    release.touch()
    wait_for(lambda: len(server.points) == 2, timeout=30, what="the point written with the late charge")
    assert TaskAttempt.objects.get(pk=attempt.pk).input_tokens == 110

    kept = [f for (measurement, _, _), f in server.stored.items() if measurement == "task_attempt"]
    assert [(f["input_tokens"], f["output_tokens"], f["cost_usd"]) for f in kept] == [(110, 20, 0.0133)]
