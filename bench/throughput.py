"""Throughput of the platform against bare Celery and django-celery-results, side by side.

One worker (prefork, same concurrency), one Redis broker, one PostgreSQL database, three
kinds of run, repeated and interleaved:

- bare:     N no-op Celery tasks, nothing recorded;
- dcr:      N no-op tasks recorded by django-celery-results (django-db backend,
            result_extended, track_started), the peer a user would otherwise pick;
- platform: one workflow of N independent `echo` tasks with full bookkeeping (task row,
            attempt row, events, workflow counters, dispatch).

Each run: publish, then wait until the queue is empty and no message is unacknowledged
(acks_late: a message is acknowledged after its task finished). Commits and statements per
task come from pg_stat_database and, when preloaded, pg_stat_statements; CPU per task by
process (worker main, pool, this database's PostgreSQL backends, this process) from /proc.

    .venv/bin/pip install -r bench/requirements.txt
    .venv/bin/python -m bench.throughput --tasks 2000 --repeat 3

BENCH_SYNCHRONOUS_COMMIT=off runs it with commits that do not wait for the disk (an experiment
that gives up the record's exactness; see bench/settings.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

os.environ["DJANGO_SETTINGS_MODULE"] = "bench.settings"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import django  # noqa: E402

django.setup()

import redis  # noqa: E402
from django.conf import settings  # noqa: E402
from django.db import connection  # noqa: E402

from bench.database import database_ensure  # noqa: E402
from config.celery import app  # noqa: E402

QUEUE = "normal"
LOG = ROOT / "var" / "bench-worker.log"
STATS_SETTLE_SECONDS = 11  # PostgreSQL 15 backends flush their counters when idle, within ~10 s


@dataclass
class Run:
    kind: str
    seconds: float
    commits: int
    statements: int | None
    latencies_ms: list[float] = field(default_factory=list)
    cpu_ms: dict[str, float] = field(default_factory=dict)

    def rate(self, n: int) -> float:
        return n / self.seconds


def has_pg_stat_statements() -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SHOW shared_preload_libraries")
        if "pg_stat_statements" not in cursor.fetchone()[0]:
            return False
        cursor.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    return True


def counters(statements: bool) -> tuple[int, int | None]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
        commits = cursor.fetchone()[0]
        calls = None
        if statements:
            cursor.execute(
                "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
                "WHERE d.datname = current_database()"
            )
            calls = int(cursor.fetchone()[0])
    return int(commits), calls


# The tables the runs write (the platform's and django-celery-results'). Vacuumed before each
# round: a server with autovacuum off (this machine's) otherwise carries every earlier round's
# dead row versions into the next one, and later rounds of both recording runs slow down.
VACUUMED = ("workflows", "task_executions", "task_attempts", "events", "django_celery_results_taskresult")


def vacuum() -> None:
    """VACUUM (ANALYZE) the written tables, outside any measured window (one transaction per
    table: at most a few thousandths of a commit per task if its statistics arrive late)."""
    with connection.cursor() as cursor:
        for table in VACUUMED:
            cursor.execute(f"VACUUM (ANALYZE) {connection.ops.quote_name(table)}")


def waiting(client: redis.Redis) -> int:
    """Messages not yet finished: in the queue, else delivered and not yet acknowledged."""
    return client.llen(QUEUE) or client.hlen("unacked")


# While messages wait, the queue cannot drain faster than this per message (10,000 tasks/s,
# well above any run here), so the poll sleeps that long per waiting message (at most
# POLL_MAX_SECONDS): polling every 2 ms throughout cost the benchmark process about 90 ms
# of CPU per second of run (0.25 ms per task at 370 tasks/s, 0.65 at 140), taken from the
# worker on a two-core machine; now about 10 ms per second while many messages wait.
# Near the end (a few messages left) it polls every POLL_MIN_SECONDS, as before.
POLL_SECONDS_PER_MESSAGE = 0.0001
POLL_MIN_SECONDS = 0.002
POLL_MAX_SECONDS = 0.05


TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
CPU_SAMPLE_SECONDS = 0.2


def _cpu_ticks(pid: int) -> int | None:
    """utime + stime of one process, in clock ticks (None once it has exited)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


class CpuMeter:
    """CPU time by process group during a run: the worker's main process, its pool processes,
    the PostgreSQL backends connected to the benchmark database (other databases' load on
    the shared server is left out, as are PostgreSQL's background processes) and this
    process (submission, publishing, polling). Processes are sampled every
    CPU_SAMPLE_SECONDS, so a backend that exits (a worker reconnects every
    CELERY_DB_REUSE_MAX tasks) is counted up to its last sample."""

    def __init__(self, worker_pid: int) -> None:
        self.worker_pid = worker_pid
        self.first: dict[int, tuple[str, int]] = {}
        self.last: dict[int, int] = {}
        self.next_sample = 0.0
        self.queries = 0  # transactions the meter runs on this database, left out of the commits
        self._backends_sql = (
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        self.sample(force=True)

    def _groups(self) -> list[tuple[str, int]]:
        with connection.cursor() as cursor:
            cursor.execute(self._backends_sql)
            self.queries += 1
            backends = [row[0] for row in cursor.fetchall()]
        return [
            ("worker main", self.worker_pid),
            *(("worker pool", pid) for pid in _children(self.worker_pid)),
            *(("postgres", pid) for pid in backends),
            ("bench", os.getpid()),
        ]

    def sample(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self.next_sample:
            return
        self.next_sample = now + CPU_SAMPLE_SECONDS
        for group, pid in self._groups():
            ticks = _cpu_ticks(pid)
            if ticks is None:
                continue
            self.first.setdefault(pid, (group, ticks))
            self.last[pid] = ticks

    def result(self, n: int) -> dict[str, float]:
        """Milliseconds of CPU per task, by group. The benchmark's own connection is left out
        of "postgres" (it polls and reads the counters, in every kind of run alike)."""
        self.sample(force=True)
        totals: dict[str, float] = {}
        for pid, (group, first) in self.first.items():
            totals[group] = totals.get(group, 0.0) + (self.last[pid] - first) / TICKS_PER_SECOND * 1000 / n
        return totals


def wait_drained(client: redis.Redis, timeout: float = 600, meter: CpuMeter | None = None) -> float:
    deadline = time.monotonic() + timeout
    while left := waiting(client):
        if time.monotonic() > deadline:
            raise RuntimeError("the worker did not finish in time")
        if meter is not None:
            meter.sample()
        time.sleep(min(POLL_MAX_SECONDS, max(POLL_MIN_SECONDS, left * POLL_SECONDS_PER_MESSAGE)))
    return time.monotonic()


def start_worker(concurrency: int) -> subprocess.Popen:
    LOG.parent.mkdir(exist_ok=True)
    name = f"bench-{uuid.uuid4().hex[:6]}@localhost"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "bench.settings"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "config",
            "worker",
            "-P",
            "prefork",
            "-c",
            str(concurrency),
            "-Q",
            QUEUE,
            "-n",
            name,
            "--include",
            "bench.tasks",
            "--without-mingle",
            "--without-gossip",
            "--without-heartbeat",
            "-l",
            "warning",
        ],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=LOG.open("w"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while not app.control.ping(destination=[name], timeout=0.5):
        if time.monotonic() > deadline or process.poll() is not None:
            raise RuntimeError("benchmark worker did not start")
    return process


def run_bare(n: int, client: redis.Redis, statements: bool, task_name: str, kind: str, worker: subprocess.Popen) -> Run:
    from bench.tasks import noop, noop_recorded

    task = noop if task_name == "noop" else noop_recorded
    before = counters(statements)
    meter = CpuMeter(worker.pid)
    start = time.monotonic()
    for _ in range(n):
        task.apply_async(queue=QUEUE)
    end = wait_drained(client, meter=meter)
    cpu = meter.result(n)
    time.sleep(STATS_SETTLE_SECONDS)
    after = counters(statements)
    commits = after[0] - before[0] - meter.queries
    return Run(kind, end - start, commits, None if after[1] is None else after[1] - before[1], cpu_ms=cpu)


def run_platform(n: int, client: redis.Redis, statements: bool, worker: subprocess.Popen) -> Run:
    from orchestration.models import TaskAttempt, TaskExecution, Workflow
    from orchestration.services.workflows import workflow_submit

    spec = {"name": "bench", "tasks": [{"name": f"t{i}", "agent": "echo", "input": {"i": i}} for i in range(n)]}
    before = counters(statements)
    meter = CpuMeter(worker.pid)
    start = time.monotonic()
    workflow, _ = workflow_submit(spec=spec)
    end = wait_drained(client, meter=meter)
    cpu = meter.result(n)
    time.sleep(STATS_SETTLE_SECONDS)
    after = counters(statements)
    workflow.refresh_from_db()
    if workflow.status != Workflow.Status.COMPLETED or workflow.completed_steps != n:
        raise RuntimeError(f"platform run incomplete: {workflow.status} {workflow.completed_steps}/{n}")
    latencies = [
        (started - queued).total_seconds() * 1000
        for queued, started in TaskAttempt.objects.filter(execution__workflow=workflow).values_list(
            "execution__queued_at", "started_at"
        )
    ]
    assert TaskExecution.objects.filter(workflow=workflow, status="completed").count() == n
    return Run(
        "platform",
        end - start,
        after[0] - before[0] - meter.queries,
        None if after[1] is None else after[1] - before[1],
        latencies,
        cpu,
    )


def run_latency(samples: int) -> list[float]:
    """submit->start with an idle worker: one single-task workflow at a time."""
    from orchestration.models import TaskAttempt, Workflow
    from orchestration.services.workflows import workflow_submit

    ids = []
    for _ in range(samples):
        workflow, _ = workflow_submit(spec={"name": "latency", "tasks": [{"name": "a", "agent": "echo"}]})
        deadline = time.monotonic() + 30
        while Workflow.objects.filter(pk=workflow.pk, status=Workflow.Status.RUNNING).exists():
            if time.monotonic() > deadline:
                raise RuntimeError("latency probe did not finish")
            time.sleep(0.002)
        ids.append(workflow.pk)
    return [
        (started - queued).total_seconds() * 1000
        for queued, started in TaskAttempt.objects.filter(execution__workflow_id__in=ids).values_list(
            "execution__queued_at", "started_at"
        )
    ]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--latency-samples", type=int, default=200)
    args = parser.parse_args()
    n = args.tasks

    database_ensure()
    statements = has_pg_stat_statements()
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.flushdb()
    worker = start_worker(args.concurrency)
    try:
        run_bare(200, client, False, "noop", "warm-up", worker)
        runs: dict[str, list[Run]] = {"bare": [], "dcr": [], "platform": []}
        for i in range(args.repeat):
            vacuum()
            runs["bare"].append(run_bare(n, client, statements, "noop", "bare", worker))
            runs["dcr"].append(run_bare(n, client, statements, "noop_recorded", "dcr", worker))
            runs["platform"].append(run_platform(n, client, statements, worker))
            print(f"round {i + 1}: " + ", ".join(f"{k} {v[-1].rate(n):.0f}/s" for k, v in runs.items()), flush=True)
        latency = run_latency(args.latency_samples)
    finally:
        worker.terminate()
        worker.wait(30)

    def median_run(kind: str) -> Run:
        return sorted(runs[kind], key=lambda r: r.seconds)[len(runs[kind]) // 2]

    bare, dcr, platform = median_run("bare"), median_run("dcr"), median_run("platform")
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        synchronous_commit = cursor.fetchone()[0]
    print()
    print(
        f"N={n} tasks, {args.repeat} rounds (median shown), worker prefork concurrency {args.concurrency}, "
        f"Redis broker, PostgreSQL {connection.pg_version // 10000}, synchronous_commit {synchronous_commit}"
        + ("" if synchronous_commit == "on" else " (an experiment: the record is not exact this way)")
    )
    print(f"{'run':<10} {'tasks/s':>9} {'ms/task':>8} {'commits/task':>13} {'statements/task':>16}")
    for run in (bare, dcr, platform):
        stmts = "n/a" if run.statements is None else f"{run.statements / n:.2f}"
        print(f"{run.kind:<10} {run.rate(n):>9.0f} {run.seconds / n * 1000:>8.3f} {run.commits / n:>13.2f} {stmts:>16}")
    print()
    groups = ("worker main", "worker pool", "postgres", "bench")
    print("CPU ms per task by process (median over rounds; postgres: this database's backends only)")
    print(f"{'run':<10} " + " ".join(f"{g:>12}" for g in groups) + f" {'total':>8}")
    totals: dict[str, float] = {}
    for kind in ("bare", "dcr", "platform"):
        medians = [statistics.median(r.cpu_ms.get(g, 0.0) for r in runs[kind]) for g in groups]
        print(f"{kind:<10} " + " ".join(f"{m:>12.2f}" for m in medians) + f" {sum(medians):>8.2f}")
        totals[kind] = sum(medians)
    # However well the processes overlap, a run cannot go faster than the machine's cores can
    # do the CPU work of its tasks (Redis's own CPU, not measured, only lowers that ceiling).
    cores = len(os.sched_getaffinity(0))
    ceiling = {kind: cores / total * 1000 for kind, total in totals.items()}
    print(
        f"CPU ceiling ({cores} cores / total CPU per task): "
        + ", ".join(f"{kind} {rate:.0f}/s" for kind, rate in ceiling.items())
        + f"; the platform's is {ceiling['platform'] / bare.rate(n):.2f}x bare Celery's measured rate"
    )
    print()

    # Ratios and differences are taken within each round (the runs of a round are seconds
    # apart, so they share the machine's load), then the median over rounds is shown.
    def per_round(fn) -> float:
        return statistics.median(
            fn(b, d, p) for b, d, p in zip(runs["bare"], runs["dcr"], runs["platform"], strict=True)
        )

    vs_bare = per_round(lambda b, d, p: b.seconds / p.seconds)
    vs_dcr = per_round(lambda b, d, p: d.seconds / p.seconds)
    dcr_bare = per_round(lambda b, d, p: b.seconds / d.seconds)
    added = per_round(lambda b, d, p: (p.seconds - b.seconds) / n * 1000)
    print("ratios: median of the per-round ratios")
    print(f"platform / bare Celery          {vs_bare:.2f}x   (target >= 0.6x)")
    print(f"platform / django-celery-results {vs_dcr:.2f}x   (target >= 1.2x)")
    print(f"dcr / bare Celery               {dcr_bare:.2f}x")
    print(f"added wall time per task        {added:.3f} ms   (target <= 2 ms)")
    print(f"commits per attempt (platform)  {platform.commits / n:.2f}   (target <= 2)")
    print(
        f"submit->start, idle worker      p50 {percentile(latency, 0.5):.1f} ms, p99 {percentile(latency, 0.99):.1f} ms"
        f"   ({len(latency)} single-task workflows; target p50 <= 25 ms)"
    )
    lat = platform.latencies_ms
    print(
        f"submit->start, {n} queued at once: p50 {percentile(lat, 0.5):.0f} ms, p99 {percentile(lat, 0.99):.0f} ms"
        "   (waiting behind the batch)"
    )
    if not statements:
        print("statements per task: n/a (add pg_stat_statements to shared_preload_libraries to measure them)")


if __name__ == "__main__":
    main()
