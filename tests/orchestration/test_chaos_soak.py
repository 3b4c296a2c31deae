"""The chaos soak: the whole execution engine under random faults, then its whole record checked.

For CHAOS_SOAK_SECONDS (60 by default) a submitter stores workflows of the built-in agents
(echo, sleep, flaky, fail) and of one that pays (tests/orchestration/edge_agents.metered), in
DAGs that fan out and in, some continuing on failure, some with a deadline a few seconds
away; it cancels some while they run and retries or resumes some that ended. Two prefork
workers run them, one on the fast path and one on the general path (ENGINE_FAST_PATH=false);
the reaper and the dispatch sweeper run in a loop beside them, and the event relay
(`manage.py relay_events --follow`) publishes to the Synapse stream. Meanwhile faults come at
random: a pool process or a whole worker SIGKILLed (restarted under its name, as systemd
would), the relay SIGKILLed, Redis killed and started again on its data (a durable AOF) or
empty (its queues and the stream lost: the sweeper sends the messages again, the relay
publishes the events again), or pausing writes for a few seconds (as a failover does), every
client connection cut (CLIENT KILL TYPE normal), the workers' PostgreSQL connections
terminated. Redis is a server of the test's own (broker and stream).

Then the faults stop, everything drains (bounded), and the record is checked as a whole
(`_violations`): every workflow ended; counters, retry counts, totals and wasted spend agree
with the task and attempt rows; no task ran two attempts at once or completed twice; times are
ordered; each task's and workflow's events follow their life cycle; the stream holds every
event exactly once, in order. A failure prints which invariant, which ids, their rows and
events, and the seed: CHAOS_SOAK_SEED=<seed> replays the same fault and submission schedule
(the timing, and so the interleavings, differ from run to run).
"""

from __future__ import annotations

import datetime as dt
import io
import itertools
import logging
import os
import random
import shutil
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import pytest
import redis
from django.conf import settings
from django.core.management import call_command
from django.utils import timezone

from orchestration.errors import SpecError, TransitionError
from orchestration.models import Agent, Event, TaskAttempt, TaskExecution, Workflow
from tests.engine import (
    Loop,
    ManageProcess,
    PrivateRedis,
    Worker,
    broker_messages,
    database_url,
    event_text,
    record_lines,
    use_broker,
    wait_for,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.subprocess]

logger = logging.getLogger(__name__)

SOAK_SECONDS = float(os.environ.get("CHAOS_SOAK_SECONDS", "60"))
DRAIN_SECONDS = 120
# Every task's limit: an attempt whose worker was killed is reaped this long (plus the hard
# limit's grace and the reaper's) after it began, so the soak and its drain stay short.
TASK_TIMEOUT_SECONDS = 6
# Workflows running at once: beyond it the submitter waits (the backlog, and the drain, stay bounded).
MAX_RUNNING = 12
SWEEP_AFTER_SECONDS = 3

T = TaskExecution.Status
A = TaskAttempt.Status
ENDED_TASK = {T.COMPLETED, T.FAILED, T.TIMED_OUT, T.CANCELLED}


@dataclass
class Chaos:
    """What the soak did, for its report."""

    seed: int
    faults: Counter = field(default_factory=Counter)
    exits: list[str] = field(default_factory=list)  # processes that ended on their own
    errors: Counter = field(default_factory=Counter)  # of the loops beside the workers
    submitted: list[str] = field(default_factory=list)
    operations: Counter = field(default_factory=Counter)
    phases: dict[str, float] = field(default_factory=dict)  # seconds each took

    def phase(self, name: str, started: float) -> float:
        now = time.monotonic()
        self.phases[name] = round(now - started, 1)
        return now


# --- the workload ----------------------------------------------------------------------


def _agent_task(rng: random.Random, name: str, depends_on: list[str]) -> dict[str, Any]:
    kind = rng.choices(["echo", "sleep", "flaky", "fail", "metered"], weights=[5, 3, 2, 1, 3])[0]
    task: dict[str, Any] = {
        "name": name,
        "agent": kind,
        "depends_on": depends_on,
        "timeout_seconds": TASK_TIMEOUT_SECONDS,
        "max_retries": rng.choice([0, 1, 2, 3]),
    }
    if kind == "echo":
        task["input"] = {"n": rng.randrange(1000)}
    elif kind == "sleep":
        task["input"] = {"seconds": round(rng.uniform(0.1, 2.5), 2)}
    elif kind == "flaky":
        task["input"] = {"fail_times": rng.choice([1, 2])}
    elif kind == "fail":
        task["input"] = {"retryable": rng.random() < 0.5}
    else:
        task["input"] = {"seconds": round(rng.uniform(0.0, 1.5), 2), "fail_times": rng.choice([0, 0, 1])}
    if kind in ("flaky", "metered"):  # mostly enough retries to succeed
        task["max_retries"] = max(task["input"]["fail_times"] + rng.choice([-1, 0, 1, 1, 2]), 0)
    return task


def workflow_spec(rng: random.Random, number: int) -> dict[str, Any]:
    """A random DAG: a chain, a fan-out and fan-in, or a diamond of diamonds."""
    shape = rng.choice(["chain", "fan", "layers"])
    tasks: list[dict[str, Any]] = []
    if shape == "chain":
        for i in range(rng.randint(1, 4)):
            tasks.append(_agent_task(rng, f"c{i}", [f"c{i - 1}"] if i else []))
    elif shape == "fan":
        width = rng.randint(2, 5)
        tasks.append(_agent_task(rng, "root", []))
        tasks += [_agent_task(rng, f"b{i}", ["root"]) for i in range(width)]
        tasks.append(_agent_task(rng, "join", [f"b{i}" for i in range(width)]))
    else:
        previous = [""]
        for layer in range(rng.randint(2, 3)):
            names = [f"l{layer}_{i}" for i in range(rng.randint(1, 3))]
            for task_name in names:
                parents = [p for p in previous if p]
                tasks.append(
                    _agent_task(rng, task_name, rng.sample(parents, rng.randint(1, len(parents))) if parents else [])
                )
            previous = names
    spec: dict[str, Any] = {
        "name": f"chaos-{number}-{shape}",
        "priority": rng.choice(["high", "normal", "normal", "low"]),
        "continue_on_failure": rng.random() < 0.3,
        "tasks": tasks,
    }
    if rng.random() < 0.15:
        spec["deadline"] = (timezone.now() + dt.timedelta(seconds=rng.uniform(1.5, 6))).isoformat()
    return spec


class Submitter:
    """Submits workflows, and acts on some: cancels a running workflow or one of its running
    tasks, retries a failed task of one that continues on failure, resumes one that ended."""

    def __init__(self, rng: random.Random, chaos: Chaos) -> None:
        self.rng, self.chaos = rng, chaos
        self.number = itertools.count()
        self.resumed: Counter = Counter()

    def __call__(self) -> None:
        from orchestration.services.workflows import (
            task_cancel,
            task_retry,
            workflow_cancel,
            workflow_resume,
            workflow_submit,
        )

        rng = self.rng
        running = list(
            Workflow.objects.filter(pk__in=self.chaos.submitted, status=Workflow.Status.RUNNING).values_list(
                "workflow_id", flat=True
            )
        )
        action = rng.random()
        try:
            if action < 0.06 and running:
                workflow_cancel(workflow_id=rng.choice(running), reason="chaos: cancelled")
                self.chaos.operations["workflow_cancel"] += 1
            elif action < 0.12 and running:
                busy = list(
                    TaskExecution.objects.filter(workflow_id__in=running, status=T.RUNNING).values_list(
                        "execution_id", flat=True
                    )
                )
                if busy:
                    task_cancel(execution_id=rng.choice(busy), reason="chaos: task cancelled")
                    self.chaos.operations["task_cancel"] += 1
            elif action < 0.20:
                self._retry_or_resume(task_retry, workflow_resume)
            elif len(running) < MAX_RUNNING:
                workflow, _ = workflow_submit(spec=workflow_spec(rng, next(self.number)), initiator="chaos")
                self.chaos.submitted.append(workflow.workflow_id)
        except (TransitionError, SpecError) as exc:  # raced with the engine: as a user is told
            self.chaos.operations[f"refused: {type(exc).__name__}"] += 1

    def _retry_or_resume(self, task_retry: Any, workflow_resume: Any) -> None:
        rng = self.rng
        failed = list(
            TaskExecution.objects.filter(
                workflow_id__in=self.chaos.submitted,
                workflow__continue_on_failure=True,
                workflow__deadline__isnull=True,
                status__in=[T.FAILED, T.TIMED_OUT],
            ).values_list("execution_id", "workflow_id")
        )
        ended = [
            workflow_id
            for workflow_id in Workflow.objects.filter(
                pk__in=self.chaos.submitted,
                status__in=[Workflow.Status.FAILED, Workflow.Status.CANCELLED],
                deadline__isnull=True,
            ).values_list("workflow_id", flat=True)
            if self.resumed[workflow_id] < 2
        ]
        if failed and rng.random() < 0.5:
            execution_id, workflow_id = rng.choice(failed)
            if self.resumed[workflow_id] < 2:
                self.resumed[workflow_id] += 1
                task_retry(execution_id=execution_id)
                self.chaos.operations["task_retry"] += 1
        elif ended:
            workflow_id = rng.choice(ended)
            self.resumed[workflow_id] += 1
            workflow_resume(workflow_id=workflow_id)
            self.chaos.operations["workflow_resume"] += 1


def recover() -> None:
    """One pass of the reaper and of the dispatch sweeper, as `reap_stale_tasks` runs them."""
    from orchestration.services.reaper import attempts_reap, queued_sweep

    attempts_reap()
    queued_sweep()


# --- the faults ------------------------------------------------------------------------


class Faults:
    """Injects one fault at random at a time, and starts again what a fault, or a crash, ended."""

    def __init__(
        self,
        rng: random.Random,
        chaos: Chaos,
        broker: PrivateRedis,
        workers: list[Worker],
        relay: ManageProcess,
        **worker_kwargs,
    ) -> None:
        self.rng, self.chaos, self.broker, self.workers, self.relay = rng, chaos, broker, workers, relay
        self.worker_kwargs = worker_kwargs
        self.killed: set[int] = set()  # pids of the processes the soak killed itself

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.broker.url, socket_timeout=5, socket_connect_timeout=5)

    def inject(self) -> None:
        rng = self.rng
        fault = rng.choices(
            [
                "pool",
                "worker",
                "relay",
                "redis_restart",
                "redis_restart_empty",
                "redis_pause",
                "client_kill",
                "pg_terminate",
            ],
            weights=[4, 2, 1, 1, 1, 2, 2, 3],
        )[0]
        worker = rng.choice(self.workers)
        if fault == "pool":
            if worker.kill_children():
                self.chaos.faults[fault] += 1
        elif fault == "worker":
            self.killed.add(worker.process.pid)
            worker.kill()
            self.chaos.faults[fault] += 1
        elif fault == "relay":
            self.relay.kill()
            self.chaos.faults[fault] += 1
        elif fault.startswith("redis_restart"):
            self.broker.stop()
            if fault == "redis_restart_empty":  # its queues, unacknowledged messages and the stream lost
                shutil.rmtree(self.broker.directory / "appendonlydir", ignore_errors=True)
            time.sleep(rng.uniform(0.2, 2.5))
            self.broker.start()
            self.chaos.faults[fault] += 1
        elif fault == "redis_pause":
            self.client().client_pause(int(rng.uniform(1000, 4000)), all=False)
            self.chaos.faults[fault] += 1
        elif fault == "client_kill":
            self.chaos.faults[fault] += 1
            self.client().client_kill_filter(_type="normal")
        elif fault == "pg_terminate" and worker.database_connections_cut():
            self.chaos.faults[fault] += 1

    def supervise(self) -> None:
        """Start again what ended: a worker (under its name), the relay."""
        for i, worker in enumerate(self.workers):
            if worker.process.poll() is None:
                continue
            if worker.process.pid not in self.killed:
                log = worker.log()
                kombu = "AttributeError" in log and "'hostname'" in log
                self.chaos.exits.append(
                    f"worker {worker.name} exited with {worker.process.returncode}"
                    + (" (kombu's AttributeError 'hostname')" if kombu else f": {log[-1500:]}")
                )
            worker.stop()
            self.workers[i] = self._worker(worker)
        if not self.relay.alive():
            self.relay.start()

    def _worker(self, old: Worker) -> Worker:
        """A worker started again under the name of `old`, answering pings; or one that exited
        while it started, which the next supervise() starts again."""
        worker = Worker(name=old.name, env=old.env, wait=False, **self.worker_kwargs)
        for _ in range(5):
            try:
                worker.wait_ready()
                return worker
            except Exception as exc:  # the ping cut by a fault, or not answered in time (Redis paused)
                if worker.process.poll() is not None:
                    return worker
                self.chaos.errors[f"worker restart: {type(exc).__name__}"] += 1
        worker.stop()
        raise AssertionError(f"worker {old.name} did not answer pings after it was started again:\n{worker.log()}")


# --- the test --------------------------------------------------------------------------


@pytest.fixture
def process_log(tmp_path, monkeypatch):
    """This process's warnings (the submitter's, the reaper's and the sweeper's, by the hundred
    under the faults) in a file of their own, with their times and threads, beside the workers'
    and the relay's logs."""
    path = tmp_path / "test-process.log"
    handler = logging.FileHandler(path)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s"))
    for name in ("orchestration", "observability", "celery", "kombu", "training_export"):
        named = logging.getLogger(name)
        monkeypatch.setattr(named, "propagate", False)
        monkeypatch.setattr(named, "handlers", [handler])
    yield path
    handler.close()


@pytest.fixture
def soak_broker(transactional_db, monkeypatch, tmp_path):
    """A Redis server of the test's own, keeping its data across a kill, as the broker and the
    Synapse stream of this process and of every process it starts."""

    broker = PrivateRedis(tmp_path, keep_data=True)
    use_broker(monkeypatch, broker.url, also_redis=True)
    monkeypatch.setattr(settings, "DISPATCH_SWEEP_AFTER_SECONDS", SWEEP_AFTER_SECONDS)
    yield broker
    broker.stop()


def test_the_engine_keeps_an_exact_record_under_random_faults(soak_broker, tmp_path, process_log):
    seed = int(os.environ.get("CHAOS_SOAK_SEED") or random.SystemRandom().randrange(2**32))
    print(f"chaos soak: seed {seed}, {SOAK_SECONDS:.0f} s (replay: CHAOS_SOAK_SEED={seed})")
    chaos = Chaos(seed=seed)
    began = time.monotonic()
    call_command("load_agents", stdout=io.StringIO())
    Agent.objects.create(
        id="metered",
        name="Metered",
        executor=Agent.Executor.PYTHON,
        entrypoint="tests.orchestration.edge_agents.metered",
    )
    env = {"REDIS_URL": soak_broker.url, "CELERY_BROKER_URL": soak_broker.url}
    # The general path's worker lets a try run on when its broker connection breaks, on half the
    # seeds: its redelivered message then finds it still running (services/redelivery.py).
    cancels = "false" if random.Random(seed).random() < 0.5 else "true"
    print(f"chaos soak: the general path's worker cancels its tries on a lost broker connection: {cancels}")
    with ThreadPoolExecutor(2) as starting:
        workers = list(
            starting.map(
                lambda kwargs: Worker(log_dir=tmp_path, **kwargs),
                [
                    {"env": {**env, "ENGINE_FAST_PATH": "true"}, "name": "chaos-fast@localhost"},
                    {
                        "env": {
                            **env,
                            "ENGINE_FAST_PATH": "false",
                            "CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS": cancels,
                        },
                        "name": "chaos-general@localhost",
                    },
                ],
            )
        )
    relay = ManageProcess(
        ["relay_events", "--follow", "--interval", "0.2"],
        {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.test", "DATABASE_URL": database_url(), **env},
        tmp_path / "relay.log",
    )
    faults = Faults(random.Random(seed), chaos, soak_broker, workers, relay, log_dir=tmp_path)
    loops = [
        Loop("submitter", Submitter(random.Random(seed + 1), chaos), interval=0.3, errors=chaos.errors),
        Loop("reaper", recover, interval=0.5, errors=chaos.errors),
    ]
    try:
        began = chaos.phase("start", began)
        for loop in loops:
            loop.start()
        end = time.monotonic() + SOAK_SECONDS
        while time.monotonic() < end:
            time.sleep(faults.rng.uniform(0.5, 3.0))
            faults.supervise()
            faults.inject()
        assert all(loop.is_alive() for loop in loops), "a loop beside the workers ended"
        loops[0].stop()
        began = chaos.phase("soak", began)
        drained = _drain(chaos, faults)
        began = chaos.phase("drain", began)
        loops[1].stop()
        for worker in faults.workers:
            worker.stop()
        began = chaos.phase("stop", began)
        streamed = _relay_caught_up(relay, faults)
        began = chaos.phase("relay", began)
    finally:
        for loop in loops:
            loop.stopping.set()
        for loop in loops:
            loop.join(timeout=60)
        for worker in faults.workers:
            worker.stop()
        relay.stop()

    print(_summary(chaos))
    print(f"chaos soak: logs in {tmp_path} (this process's: {process_log.name})")
    problems = _violations(chaos.submitted, soak_broker, streamed)
    if not drained:
        problems.insert(0, Violation("every workflow ends (within the drain)", [], "see below"))
    if problems:
        pytest.fail(f"chaos soak, seed {seed} (replay: CHAOS_SOAK_SEED={seed}):\n{_diagnosis(problems)}", pytrace=False)


@pytest.mark.django_db
def test_the_soak_finds_what_breaks_the_record():
    """The invariants hold for a workflow run as the engine runs one, and name what was broken
    in its rows and events."""
    from orchestration.runtime.context import AgentResult
    from orchestration.services.events import task_event
    from orchestration.services.execution import attempt_claim, attempt_succeed
    from orchestration.services.workflows import workflow_submit

    call_command("load_agents", stdout=io.StringIO())
    workflow, _ = workflow_submit(spec={"name": "checked", "tasks": [{"name": "a", "agent": "echo"}]})
    task = TaskExecution.objects.get(workflow=workflow)
    claim = attempt_claim(execution_id=task.pk, celery_task_id=task.celery_task_id, worker="w@h")
    attempt_succeed(attempt=claim.attempt, result=AgentResult(output={}), duration_ms=1.0, now=timezone.now())
    assert Workflow.objects.get(pk=workflow.pk).status == Workflow.Status.COMPLETED
    assert _record_violations([workflow.pk]) == []

    Workflow.objects.filter(pk=workflow.pk).update(completed_steps=0, total_tokens_used=7)
    task.refresh_from_db()
    TaskAttempt.objects.create(
        execution=task,
        attempt_number=2,
        status=A.SUCCEEDED,
        started_at=claim.attempt.started_at,
        finished_at=claim.attempt.started_at - dt.timedelta(seconds=1),
        duration_ms=1.0,
    )
    task_event(task, "task_started", attempt=claim.attempt)

    assert {v.invariant for v in _record_violations([workflow.pk])} == {
        "counters equal the task rows",
        "workflow totals equal the sum of its tasks'",
        "no task has two attempts running at once",
        "an ended attempt has finished_at >= started_at and duration_ms >= 0",
        "a completed task has exactly one succeeded attempt, any other none",
        "a task's events follow its life cycle",
        "each attempt that started has one task_started event, in attempt order",
        "retry_count matches the retries and the attempts since the last reset",
        "execution_time_ms sums the attempts that ran to an outcome",
    }


def _drain(chaos: Chaos, faults: Faults) -> bool:
    """No more faults: Redis up and taking writes, every process running; wait (bounded) until
    every workflow has ended."""
    if faults.broker.process is None or faults.broker.process.poll() is not None:
        faults.broker.start()
    client = faults.client()
    wait_for(lambda: _answers(client), timeout=30, what="the private Redis to take writes")
    began = time.monotonic()
    shown = began
    while time.monotonic() < began + DRAIN_SECONDS:
        faults.supervise()
        if not Workflow.objects.filter(pk__in=chaos.submitted).exclude(status__in=Workflow.TERMINAL_STATUSES).exists():
            return True
        if time.monotonic() - shown > 10:
            shown = time.monotonic()
            print(
                f"drain, {shown - began:.0f} s (sweep lock ttl {client.ttl('agentledger:queued_sweep')}): still "
                "waiting for\n" + "\n".join(_waiting(chaos, client))
            )
        time.sleep(0.5)
    return False


def _waiting(chaos: Chaos, client: redis.Redis) -> list[str]:
    """The unfinished tasks of the unfinished workflows, and where their messages are."""
    messages = broker_messages(client)
    lines = []
    for task in TaskExecution.objects.filter(
        workflow_id__in=chaos.submitted, workflow__status=Workflow.Status.RUNNING
    ).exclude(status__in=ENDED_TASK)[:20]:
        last = Event.objects.filter(entity_id=task.pk).order_by("-sequence").first()
        where = messages.get(task.celery_task_id, "-")
        lines.append(
            f"  {task.workflow_id} {task.task_name} {task.pk} {task.status} queued {task.queued_at} message {where}; "
            f"last event {event_text(last) if last else None} at {last.created_at if last else None}"
        )
    return lines


def _answers(client: redis.Redis) -> bool:
    try:
        client.set("chaos:probe", "1")
    except redis.RedisError:
        return False
    return True


def _relay_caught_up(relay: ManageProcess, faults: Faults) -> bool:
    newest = Event.objects.order_by("-sequence").values_list("sequence", flat=True).first()
    client = faults.client()

    def caught_up() -> bool:
        if not relay.alive():
            relay.start()
        try:
            entries = client.xrevrange(settings.SYNAPSE_STREAM, count=1)
        except redis.RedisError:
            return False
        return bool(entries) and int(entries[0][0].decode().split("-")[0]) >= newest

    try:
        wait_for(caught_up, timeout=60, interval=0.3, what="the relay to publish every event")
    except AssertionError:
        return False
    return True


def _summary(chaos: Chaos) -> str:
    statuses = Counter(Workflow.objects.filter(pk__in=chaos.submitted).values_list("status", flat=True))
    attempts = Counter(
        TaskAttempt.objects.filter(execution__workflow_id__in=chaos.submitted).values_list("status", "cause")
    )
    return (
        f"chaos soak, seed {chaos.seed}: {len(chaos.submitted)} workflows {dict(statuses)}; "
        f"attempts {dict(attempts)}; faults {dict(chaos.faults)}; operations {dict(chaos.operations)}; "
        f"loop errors {dict(chaos.errors)}; processes that exited on their own: {chaos.exits or 'none'}; "
        f"phases (s) {chaos.phases}"
    )


# --- the invariants --------------------------------------------------------------------


@dataclass
class Violation:
    invariant: str
    ids: list[str]  # workflow or task ids
    detail: str


@dataclass
class Record:
    workflows: dict[str, Workflow]
    tasks: dict[str, TaskExecution]
    tasks_of: dict[str, list[TaskExecution]]
    attempts_of: dict[str, list[TaskAttempt]]
    events_of: dict[str, list[Event]]


def _record(workflow_ids: list[str]) -> Record:
    workflows = {w.pk: w for w in Workflow.objects.filter(pk__in=workflow_ids)}
    tasks = {t.pk: t for t in TaskExecution.objects.filter(workflow_id__in=workflow_ids)}
    tasks_of: dict[str, list[TaskExecution]] = defaultdict(list)
    for task in tasks.values():
        tasks_of[task.workflow_id].append(task)
    attempts_of: dict[str, list[TaskAttempt]] = defaultdict(list)
    for attempt in TaskAttempt.objects.filter(execution_id__in=list(tasks)).order_by("execution_id", "attempt_number"):
        attempts_of[attempt.execution_id].append(attempt)
    events_of: dict[str, list[Event]] = defaultdict(list)
    for event in Event.objects.filter(workflow_id__in=workflow_ids).order_by("sequence"):
        events_of[event.entity_id].append(event)
    return Record(workflows, tasks, tasks_of, attempts_of, events_of)


def _violations(workflow_ids: list[str], broker: PrivateRedis, streamed: bool) -> list[Violation]:
    return _record_violations(workflow_ids) + _stream_violations(broker, streamed)


def _record_violations(workflow_ids: list[str]) -> list[Violation]:
    record = _record(workflow_ids)
    found: list[Violation] = []
    for workflow in record.workflows.values():
        found += _workflow_violations(workflow, record)
    for task in record.tasks.values():
        found += _task_violations(task, record)
    return found


WASTED = set(TaskAttempt.WASTED_STATUSES)
_ABANDONED = {A.CANCELLED, A.LOST, A.TIMED_OUT}


def _workflow_violations(workflow: Workflow, record: Record) -> list[Violation]:
    found = []
    ids = [workflow.pk]
    tasks = record.tasks_of[workflow.pk]
    attempts = [a for t in tasks for a in record.attempts_of[t.pk]]

    def check(ok: bool, invariant: str, detail: str) -> None:
        if not ok:
            found.append(Violation(invariant, ids, detail))

    check(workflow.is_terminal, "every workflow ends in a terminal status", f"status {workflow.status}")
    statuses = Counter(t.status for t in tasks)
    check(
        (workflow.total_steps, workflow.completed_steps, workflow.failed_steps, workflow.cancelled_steps)
        == (len(tasks), statuses[T.COMPLETED], statuses[T.FAILED] + statuses[T.TIMED_OUT], statuses[T.CANCELLED]),
        "counters equal the task rows",
        f"total/completed/failed/cancelled_steps {workflow.total_steps}/{workflow.completed_steps}/"
        f"{workflow.failed_steps}/{workflow.cancelled_steps}, tasks {dict(statuses)}",
    )
    if workflow.is_terminal:
        # All its tasks completed, it still fails when the last ended past its deadline.
        all_completed = statuses[T.COMPLETED] == len(tasks)
        late = workflow.deadline is not None and workflow.completed_at > workflow.deadline
        check(
            (workflow.status == Workflow.Status.COMPLETED) == all_completed
            or (all_completed and workflow.status == Workflow.Status.FAILED and late),
            "a workflow completes exactly when all its tasks did (in time)",
            f"status {workflow.status}, tasks {dict(statuses)}, deadline {workflow.deadline}",
        )
        unfinished = [t.pk for t in tasks if t.status not in ENDED_TASK]
        check(not unfinished, "an ended workflow has no unfinished task", f"unfinished {unfinished}")
    check(
        workflow.total_tokens_used == sum(t.tokens_used for t in tasks)
        and workflow.total_cost_usd == sum((t.cost_usd for t in tasks), Decimal(0)),
        "workflow totals equal the sum of its tasks'",
        f"workflow {workflow.total_tokens_used} tokens ${workflow.total_cost_usd}, tasks "
        f"{sum(t.tokens_used for t in tasks)} tokens ${sum((t.cost_usd for t in tasks), Decimal(0))}",
    )
    wasted = [a for a in attempts if a.status in WASTED]
    check(
        workflow.wasted_cost_usd == sum((a.cost_usd for a in wasted), Decimal(0)),
        "wasted spend is the cost of the failed, timed-out and lost attempts",
        f"wasted ${workflow.wasted_cost_usd}, those attempts ${sum((a.cost_usd for a in wasted), Decimal(0))}",
    )
    check(
        workflow.error_count == len(wasted),
        "error_count counts the failed, timed-out and lost attempts",
        f"error_count {workflow.error_count}, such attempts {len(wasted)}",
    )
    if workflow.completed_at is not None:
        check(
            workflow.started_at is not None and workflow.completed_at >= workflow.started_at,
            "workflow completed_at >= started_at",
            f"started {workflow.started_at}, completed {workflow.completed_at}",
        )
        later = [t for t in tasks if t.completed_at and t.completed_at > workflow.completed_at]
        check(
            not later,
            "workflow completed_at >= every task's completed_at",
            f"workflow completed {workflow.completed_at}; "
            + ", ".join(f"{t.task_name} ({t.pk}) {t.status} at {t.completed_at}" for t in later),
        )
        if workflow.started_at is not None:
            check(
                workflow.duration_ms == _milliseconds(workflow.completed_at - workflow.started_at),
                "workflow duration_ms is completed_at - started_at",
                f"duration_ms {workflow.duration_ms}, {workflow.started_at} - {workflow.completed_at}",
            )
    if workflow.is_terminal:
        completed = {t.task_name: t.output_data for t in tasks if t.status == T.COMPLETED}
        check(
            workflow.step_results == completed
            and [c["task"] for c in workflow.checkpoints]
            == [
                t.task_name
                for t in sorted((t for t in tasks if t.status == T.COMPLETED), key=lambda t: (t.completed_at, t.pk))
            ],
            "step_results and checkpoints hold the completed tasks",
            f"step_results {sorted(workflow.step_results)}, checkpoints {[c['task'] for c in workflow.checkpoints]}, "
            f"completed {sorted(completed)}",
        )
    found += _workflow_event_violations(workflow, record.events_of[workflow.pk])
    return found


def _milliseconds(span: dt.timedelta) -> int:
    """As PostgreSQL's round() gives them (half away from zero; Python's round() halves to even)."""
    microseconds = span // dt.timedelta(microseconds=1)
    return int((Decimal(microseconds) / 1000).to_integral_value(rounding=ROUND_HALF_UP))


def _workflow_event_violations(workflow: Workflow, events: list[Event]) -> list[Violation]:
    """created, started, then (an end, resumed)* and an end matching the status."""
    types = [e.event_type for e in events]
    ends = {"workflow_completed", "workflow_failed", "workflow_cancelled"}
    problem = None
    if types[:2] != ["workflow_created", "workflow_started"]:
        problem = "does not begin with workflow_created, workflow_started"
    else:
        expect_end = True
        for event_type in types[2:]:
            if expect_end and event_type in ends:
                expect_end = False
            elif not expect_end and event_type == "workflow_resumed":
                expect_end = True
            else:
                problem = f"{event_type} where {'an end' if expect_end else 'workflow_resumed'} was due"
                break
        if problem is None and workflow.is_terminal and types[-1] != f"workflow_{workflow.status}":
            problem = f"the last event is {types[-1]} for a {workflow.status} workflow"
    if problem is None:
        return []
    return [Violation("a workflow's events follow its life cycle", [workflow.pk], f"{problem}: {types}")]


# A task's life cycle as its events tell it: pending (P), waiting in the broker (W), running (R),
# an attempt just closed as lost or timed out (R_CLOSED, W_CLOSED for a try that never started),
# completed (C), failed (F), cancelled (X).
TRANSITIONS = {
    ("P", "task_queued"): "W",
    ("W", "task_started"): "R",
    ("R", "task_lost"): "R_CLOSED",
    ("R", "task_timed_out"): "R_CLOSED",
    ("W", "task_timed_out"): "W_CLOSED",
    ("R", "task_retrying"): "W",
    ("R_CLOSED", "task_retrying"): "W",
    ("R", "task_failed"): "F",
    ("R_CLOSED", "task_failed"): "F",
    ("W_CLOSED", "task_failed"): "F",
    ("W", "task_failed"): "F",
    ("R", "task_completed"): "C",
    ("P", "task_cancelled"): "X",
    ("W", "task_cancelled"): "X",
    ("R", "task_cancelled"): "X",
    ("F", "reset"): "P",
    ("X", "reset"): "P",
}
FINAL_STATE = {T.COMPLETED: "C", T.FAILED: "F", T.TIMED_OUT: "F", T.CANCELLED: "X"}


def _is_reset(event: Event) -> bool:
    """A retry or resume by a user (services.workflows._tasks_reset), not the engine's retry."""
    return event.event_type == "task_retrying" and "reason" in event.payload


def _task_violations(task: TaskExecution, record: Record) -> list[Violation]:
    found = []
    ids = [task.pk, task.workflow_id]
    attempts = record.attempts_of[task.pk]
    events = record.events_of[task.pk]

    def check(ok: bool, invariant: str, detail: str) -> None:
        if not ok:
            found.append(Violation(invariant, ids, detail))

    numbers = [a.attempt_number for a in attempts]
    check(numbers == list(range(1, len(attempts) + 1)), "attempt numbers run 1..n", f"numbers {numbers}")
    running = [a.attempt_number for a in attempts if a.status == A.RUNNING]
    check(not running, "no attempt is left running", f"running {running}")
    for earlier, later in itertools.pairwise(attempts):
        check(
            earlier.finished_at is not None and later.started_at >= earlier.finished_at,
            "no task has two attempts running at once",
            f"attempt {earlier.attempt_number} {earlier.status} {earlier.started_at} - {earlier.finished_at}, "
            f"attempt {later.attempt_number} started {later.started_at}",
        )
    for attempt in attempts:
        if attempt.finished_at is not None:
            check(
                attempt.finished_at >= attempt.started_at and (attempt.duration_ms or 0) >= 0,
                "an ended attempt has finished_at >= started_at and duration_ms >= 0",
                f"attempt {attempt.attempt_number} {attempt.status} ({attempt.cause}) started {attempt.started_at}, "
                f"finished {attempt.finished_at}, duration_ms {attempt.duration_ms}",
            )
    succeeded = [a.attempt_number for a in attempts if a.status == A.SUCCEEDED]
    check(
        len(succeeded) == (1 if task.status == T.COMPLETED else 0),
        "a completed task has exactly one succeeded attempt, any other none",
        f"status {task.status}, succeeded attempts {succeeded}",
    )
    if task.completed_at is not None and task.started_at is not None:
        check(
            task.completed_at >= task.started_at,
            "task completed_at >= started_at",
            f"{task.status}: started {task.started_at}, completed {task.completed_at}",
        )
    sums = (
        sum(a.input_tokens for a in attempts),
        sum(a.output_tokens for a in attempts),
        sum(a.tokens_used for a in attempts),
        sum((a.cost_usd for a in attempts), Decimal(0)),
    )
    check(
        (task.input_tokens, task.output_tokens, task.tokens_used, task.cost_usd) == sums,
        "task usage equals the sum of its attempts'",
        f"task {(task.input_tokens, task.output_tokens, task.tokens_used, task.cost_usd)}, attempts {sums}",
    )
    ran = [a for a in attempts if a.status in (A.SUCCEEDED, A.FAILED) or a.cause == TaskAttempt.Cause.SOFT_TIMEOUT]
    ran_ms = sum(a.duration_ms or 0 for a in ran)
    check(
        abs((task.execution_time_ms or 0) - ran_ms) < 0.01 * max(len(ran), 1),
        "execution_time_ms sums the attempts that ran to an outcome",
        f"execution_time_ms {task.execution_time_ms}, attempts "
        f"{[(a.attempt_number, a.status, a.duration_ms) for a in ran]}",
    )
    found += _task_event_violations(task, attempts, events)
    return found


def _task_event_violations(task: TaskExecution, attempts: list[TaskAttempt], events: list[Event]) -> list[Violation]:
    found = []
    ids = [task.pk, task.workflow_id]
    state, problem = "P", None
    for event in events:
        if event.event_type in ("task_ended_late", "task_paid_late"):
            continue
        key = "reset" if _is_reset(event) else event.event_type
        following = TRANSITIONS.get((state, key))
        if following is None:
            problem = f"{key} in state {state} (#{event.sequence})"
            break
        state = following
    if problem is None and task.status in FINAL_STATE and state != FINAL_STATE[task.status]:
        problem = f"the events end in state {state} for a {task.status} task"
    if problem:
        found.append(
            Violation(
                "a task's events follow its life cycle",
                ids,
                f"{problem}: {[event_text(e) for e in events]}",
            )
        )
    closed = {a.attempt_number: a.status for a in attempts}
    wrong = [
        (e.sequence, e.payload.get("attempt"), closed.get(e.payload.get("attempt")))
        for e in events
        if e.event_type in ("task_ended_late", "task_paid_late")
        and closed.get(e.payload.get("attempt")) not in _ABANDONED
    ]
    if wrong:
        found.append(
            Violation(
                "task_ended_late and task_paid_late are only for an attempt closed without its try",
                ids,
                f"(sequence, attempt, its status): {wrong}",
            )
        )
    started = [e.payload.get("attempt") for e in events if e.event_type == "task_started"]
    unstarted = {a.attempt_number for a in attempts if a.cause == TaskAttempt.Cause.QUEUE_TIMEOUT}
    expected = [a.attempt_number for a in attempts if a.attempt_number not in unstarted]
    if started != expected:
        found.append(
            Violation(
                "each attempt that started has one task_started event, in attempt order",
                ids,
                f"task_started attempts {started}, attempts {expected}",
            )
        )
    # retry_count counts the engine's retries since the last reset by a user (retry, resume),
    # which gives the task a fresh budget; each retry is followed by one more attempt.
    resets = [i for i, e in enumerate(events) if _is_reset(e)]
    since = events[resets[-1] + 1 :] if resets else events
    before = events[: resets[-1]] if resets else []
    baseline = max((e.payload.get("attempt") or 0 for e in before), default=0)
    made = len(attempts) - baseline
    retries = sum(1 for e in since if e.event_type == "task_retrying")
    low, high = (task.retry_count, task.retry_count + 1) if task.status == T.CANCELLED else (task.retry_count + 1,) * 2
    if task.retry_count != retries or not low <= made <= high:
        found.append(
            Violation(
                "retry_count matches the retries and the attempts since the last reset",
                ids,
                f"{task.status}: retry_count {task.retry_count}, task_retrying events since the reset {retries}, "
                f"attempts since the reset {made} (expected {low}..{high})",
            )
        )
    return found


def _stream_violations(broker: PrivateRedis, streamed: bool) -> list[Violation]:
    """The stream holds every committed event once, as entry <sequence>-1 with its event_id, in
    sequence order, and nothing else."""
    client = redis.Redis.from_url(broker.url)
    entries: list[tuple[int, str]] = []
    start = "-"
    while True:
        chunk = client.xrange(settings.SYNAPSE_STREAM, min=start, count=5000)
        if not chunk:
            break
        for entry_id, fields in chunk:
            entries.append((int(entry_id.decode().split("-")[0]), fields[b"event_id"].decode()))
        start = "(" + chunk[-1][0].decode()
    events = list(Event.objects.order_by("sequence").values_list("sequence", "event_id"))
    found = []
    if not streamed:
        found.append(Violation("the relay publishes every committed event", [], "it did not catch up in 60 s"))
    if entries != events:
        on_stream, in_table = dict(entries), dict(events)
        missing = sorted(set(in_table) - set(on_stream))
        extra = sorted(set(on_stream) - set(in_table))
        other = sorted(s for s in set(in_table) & set(on_stream) if in_table[s] != on_stream[s])
        duplicated = [s for s, n in Counter(s for s, _ in entries).items() if n > 1]
        out_of_order = [b for (a, _), (b, _) in itertools.pairwise(entries) if b <= a]
        found.append(
            Violation(
                "the stream holds every event exactly once, in order",
                [],
                f"{len(entries)} entries, {len(events)} events; missing {missing[:20]}, not in the table "
                f"{extra[:20]}, another event_id {other[:20]}, duplicated {duplicated[:20]}, out of order "
                f"{out_of_order[:20]}",
            )
        )
    return found


# --- the diagnosis ---------------------------------------------------------------------


def _diagnosis(problems: list[Violation], limit: int = 8) -> str:
    by_invariant: dict[str, list[Violation]] = defaultdict(list)
    for problem in problems:
        by_invariant[problem.invariant].append(problem)
    lines = [f"{len(problems)} violation(s) of {len(by_invariant)} invariant(s):"]
    for invariant, found in by_invariant.items():
        lines.append(f"- {invariant}: {len(found)}, e.g. {found[0].ids}: {found[0].detail}")
    shown: set[tuple[str, ...]] = set()
    for invariant, found in by_invariant.items():
        for problem in found[:2]:
            if len(shown) >= limit or not problem.ids or tuple(problem.ids) in shown:
                continue
            shown.add(tuple(problem.ids))
            lines.append(f"\n== {invariant} ({', '.join(problem.ids)}) ==\n{problem.detail}")
            lines += record_lines(problem.ids)
    return "\n".join(lines)
