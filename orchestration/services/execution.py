"""Attempts: claiming a delivered message, running the agent, recording the outcome.

Every transition claims its row (a row lock, or a conditional UPDATE checked for exactly
one changed row), so a duplicate or redelivered message can never record a second start or
a second completion. The Celery task body only calls attempt_run.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import logging
import random
import time
import traceback as tb
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Any

import psycopg
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import DatabaseError, Error, InterfaceError, OperationalError, connection, transaction
from django.db.models import Count, F, Max, OuterRef, Subquery
from django.db.models.functions import Coalesce, Now
from kombu.utils.compat import detect_environment

from observability.attempts import attempt_finished, attempt_started, attempts_reaped, late_usage_recorded
from orchestration.db import (
    ERROR_DESCRIBED_MAX_LENGTH,
    DatabaseClock,
    agent_stopping,
    atomic_with_retry,
    database_error_described,
    database_error_permanent,
    database_unreachable,
    stop_if_interrupted,
    stop_raised,
    terminate_handler_fired,
)
from orchestration.errors import PermanentError, RetryableError, error_class_name, is_retryable
from orchestration.event_types import EventType, Severity
from orchestration.models import Agent, TaskAttempt, TaskExecution, Workflow
from orchestration.models.workflows import Priority, priority_rank
from orchestration.runtime.collaboration import equip
from orchestration.runtime.context import AgentResult, TaskContext, Usage
from orchestration.runtime.executors import agent_execute, usage_checked
from orchestration.runtime.tools import storable_text
from orchestration.services import fastpath
from orchestration.services.conversations import (
    conversation_attempt_closed,
    conversation_attempt_usage_sync,
    conversation_for_task,
    conversation_turn_record,
)
from orchestration.services.dispatch import dispatch_after_commit, dispatch_prepare, hard_limit_seconds
from orchestration.services.events import TASK_STATE_FIELDS, entity_states, task_event
from orchestration.services.fastpath import update_rows
from orchestration.services.progress import (
    abandoned_usage_add,
    deadline_passed,
    tasks_cancel,
    workflow_add_usage,
    workflow_advance,
    workflow_fail_past_deadline,
    workflow_on_task_completed,
    workflow_on_task_failed,
    workflow_stopping,
)
from orchestration.services.redelivery import PreviousTry, previous_try_check
from orchestration.soft_limit import SoftLimit, held_off, soft_limit_held
from orchestration.workers import WorkerProcess, attempt_fields

logger = logging.getLogger(__name__)


class Outcome(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    DEFERRED = "deferred"


@dataclass
class Claim:
    attempt: TaskAttempt
    agent: Agent
    task_input: dict[str, Any]
    context: TaskContext
    # The database's clock, read by the claim: the attempt's outcome is recorded at its now().
    clock: DatabaseClock
    # The fast claim saw other unfinished tasks in the workflow and none pending: the
    # completion tries fastpath.succeed_alone (one statement, no transaction block) first.
    standalone: bool = False


def retry_countdown(retry_count: int, retry_after: object = None) -> float:
    """Exponential backoff with jitter: half of base * 2**n, plus a random half; at least
    the provider's Retry-After; at most TASK_RETRY_BACKOFF_MAX_SECONDS."""
    cap = float(settings.TASK_RETRY_BACKOFF_MAX_SECONDS)
    delay = min(cap, settings.TASK_RETRY_BACKOFF_BASE_SECONDS * (2**retry_count))
    delay = delay / 2 + random.uniform(0, delay / 2)  # noqa: S311 - jitter, not security
    if retry_after := _retry_after_as_seconds(retry_after):
        delay = max(delay, retry_after)
    return round(min(delay, cap), 3)


def _retry_after_as_seconds(value: object) -> float | None:
    """A RetryableError's retry_after as seconds: a number, a timedelta, or a number's text (a
    Retry-After header's value passed on as it came); anything else (an HTTP date's text, NaN)
    says nothing. A python agent's own RetryableError may carry any of them: compared as it came,
    a text failed the record of the try (TypeError), which stayed running until the reaper
    closed it as a hard time-out, its error lost, its agent's slot held meanwhile."""
    if isinstance(value, dt.timedelta):
        value = value.total_seconds()
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        # An integer past a float's range (JSON carries any number of digits): float() raised in
        # the record of the try, as a text did. As large as it is, it asks the longest backoff.
        return float("inf") if value > 0 else None
    except ValueError:  # a signalling NaN's Decimal
        return None
    return None if seconds != seconds else seconds  # NaN


def _close_attempt(
    attempt: TaskAttempt, *, status: str, cause: str | None, error: str, now: dt.datetime, **fields: Any
) -> bool:
    """Finish a running attempt exactly once; False if it was no longer running."""
    changed = TaskAttempt.objects.filter(pk=attempt.pk, status=TaskAttempt.Status.RUNNING).update(
        status=status,
        cause=cause,
        error=error,
        finished_at=now,
        duration_ms=fields.pop("duration_ms", max((now - attempt.started_at).total_seconds() * 1000, 0.0)),
        **fields,
    )
    return changed == 1


def _fail_or_retry(
    task: TaskExecution,
    *,
    attempt: TaskAttempt | None,
    status: str,
    error: str,
    retryable: bool,
    now: dt.datetime,
    retry_after: object = None,
    retry_now: bool = False,
) -> bool:
    """After a failed attempt: schedule the next one (True) or fail the task for good (False).
    With retry_now the caller starts the next attempt itself, in this same delivery."""
    task.error = error
    timed_out = status == TaskAttempt.Status.TIMED_OUT
    if timed_out:
        task_event(task, EventType.TASK_TIMED_OUT, attempt=attempt, payload={"error": error}, severity=Severity.WARNING)
    if retryable and task.retry_count < task.max_retries and _workflow_goes_on(task, now=now):
        task.retry_count += 1
        if retry_now:
            task.save(update_fields=["retry_count", "error"])
            task_event(task, EventType.TASK_RETRYING, attempt=attempt, payload={"countdown_s": 0, "error": error})
            return True
        countdown = retry_countdown(task.retry_count - 1, retry_after)
        dispatch = dispatch_prepare(task, now=now, countdown=countdown, status=TaskExecution.Status.RETRYING)
        task.save(update_fields=["retry_count", "error", "status", "celery_task_id", "queued_at"])
        task_event(
            task,
            EventType.TASK_RETRYING,
            attempt=attempt,
            payload={"countdown_s": countdown, "error": error, "retry_count": task.retry_count},
            severity=Severity.WARNING,
        )
        dispatch_after_commit([dispatch])
        return True
    task.status = TaskExecution.Status.TIMED_OUT if timed_out else TaskExecution.Status.FAILED
    task.completed_at = now
    task.save(update_fields=["status", "error", "completed_at"])
    state = entity_states(TaskExecution, [task.pk], TASK_STATE_FIELDS)[task.pk]
    task_event(
        task, EventType.TASK_FAILED, attempt=attempt, payload={"error": error, "state": state}, severity=Severity.ERROR
    )
    if task.workflow_id:
        workflow_on_task_failed(task, now=now)
    return False


def _workflow_goes_on(task: TaskExecution, *, now: dt.datetime) -> bool:
    """Whether a retry of `task` could still matter: not when its workflow has ended, nor
    when it is stopping (a sibling failed for good while this task ran, and the workflow
    waits only for its running tasks to end: workflow_on_task_failed), nor past its deadline
    (the task then fails for good, and the workflow for its deadline)."""
    if task.workflow_id is None:
        return True
    workflow = (
        Workflow.objects.filter(pk=task.workflow_id)
        .only("status", "continue_on_failure", "failed_steps", "deadline")
        .first()
    )
    return (
        workflow is not None
        and workflow.status == Workflow.Status.RUNNING
        and not workflow_stopping(workflow)
        and not deadline_passed(workflow.deadline, now)
    )


def attempt_abandon(
    task: TaskExecution,
    attempt: TaskAttempt,
    *,
    status: str,
    cause: str,
    error: str,
    now: dt.datetime,
    retry_now: bool = False,
    error_class: str = "",
) -> bool | None:
    """Close an abandoned running attempt (lost worker, hard limit). Returns None if it was
    no longer running, else whether the task will be tried again. `error_class`: of the
    error that abandoned it, when one is known (a database error's)."""
    if not _close_attempt(
        attempt, status=status, cause=cause, error=error, now=now, retryable=True, error_class=error_class
    ):
        return None
    attempt.status = status
    conversation_attempt_closed(task, attempt=attempt, error=error)
    if status == TaskAttempt.Status.LOST:  # a timed-out attempt gets its event from _fail_or_retry
        task_event(
            task,
            EventType.TASK_LOST,
            attempt=attempt,
            payload={"cause": cause, "worker": attempt.worker},
            severity=Severity.WARNING,
        )
    tokens, cost = abandoned_usage_add(task, [attempt])
    if task.workflow_id:
        workflow_add_usage(task.workflow_id, tokens=tokens, cost=cost, error=True)
    return _fail_or_retry(
        task, attempt=attempt, status=status, error=error, retryable=True, now=now, retry_now=retry_now
    )


def queue_waited_since(task: TaskExecution, *, now: dt.datetime) -> dt.datetime | None:
    """When `task` began waiting for a worker (its queueing, or its last deferral for its
    agent's concurrency limit), if that is longer ago than TASK_QUEUE_TIMEOUT_SECONDS. Both
    stamps and `now` are on the database's clock (wherever they were taken: see Claim.clock)."""
    since = max(filter(None, (task.queued_at, task.deferred_at)), default=None)
    if since and now > since + dt.timedelta(seconds=settings.TASK_QUEUE_TIMEOUT_SECONDS):
        return since
    return None


def queue_timeout_record(
    task: TaskExecution,
    *,
    number: int,
    now: dt.datetime,
    worker: str = "",
    celery_task_id: str = "",
    redelivered: bool = False,
) -> None:
    """Record a try that never started: the task waited past the queue timeout (seen at its
    claim, or by the reaper when no worker takes its queue). Not retried; the caller holds
    the task row."""
    since = queue_waited_since(task, now=now)
    assert since is not None
    _unstarted_try_fail(
        task,
        number=number,
        now=now,
        status=TaskAttempt.Status.TIMED_OUT,
        cause=TaskAttempt.Cause.QUEUE_TIMEOUT,
        error=f"waited {(now - since).total_seconds():.0f} s in the queue "
        f"(limit {settings.TASK_QUEUE_TIMEOUT_SECONDS} s)",
        worker=worker,
        celery_task_id=celery_task_id or task.celery_task_id or "",
        redelivered=redelivered,
    )


def delivery_count(task: TaskExecution, *, celery_task_id: str, redelivered: bool) -> int:
    """How many times this message has reached a worker that began a try with it, this time
    included: 1 for a first delivery, else one more than the tries its earlier deliveries
    recorded (a message the broker keeps redelivering, as after each SIGKILL of its worker,
    counts 2, 3, ...). A delivery lost before its worker claimed the task left no try to count."""
    if not redelivered:
        return 1
    return 1 + TaskAttempt.objects.filter(execution=task, celery_task_id=celery_task_id).count()


def _unstarted_try_fail(
    task: TaskExecution,
    *,
    number: int,
    now: dt.datetime,
    status: str,
    cause: str,
    error: str,
    worker: str,
    celery_task_id: str,
    redelivered: bool,
) -> None:
    """Record a try that ended before it started (no time, no spend) and fail the task for
    it, not retried: a failed try like any other for the workflow's error_count, the
    conversation's thread and the metrics."""
    attempt = TaskAttempt.objects.create(
        execution=task,
        attempt_number=number,
        status=status,
        cause=cause,
        retryable=False,
        error=error,
        worker=worker,
        celery_task_id=celery_task_id,
        redelivered=redelivered,
        delivery_count=delivery_count(task, celery_task_id=celery_task_id, redelivered=redelivered),
        timeout_seconds=task.timeout_seconds,
        started_at=now,
        finished_at=now,
        duration_ms=0.0,
    )
    conversation_attempt_closed(task, attempt=attempt, error=error)
    if task.workflow_id:
        workflow_add_usage(task.workflow_id, tokens=0, cost=Decimal(0), error=True)
    _fail_or_retry(task, attempt=attempt, status=status, error=error, retryable=False, now=now)
    transaction.on_commit(lambda: attempts_reaped(attempts=[attempt]))


# How often a task whose agent is in maintenance looks again (jittered), as a new message.
MAINTENANCE_RECHECK_SECONDS = 5.0
# A task deferred for its agent's max_concurrency looks again after about this long for each
# slot's worth of tasks waiting before it (jittered), at least once and at most
# AGENT_SLOT_RECHECK_MAX_SECONDS: the line looks again about max_concurrency times a second in
# all, whatever its length. A task that ends wakes the first in line (agent_slot_hand_on).
# The wait is at most TASK_DEFERRAL_MAX_COUNTDOWN_SECONDS, jitter included: the broker's
# visibility timeout is sized for it (a worker holds the message unacknowledged meanwhile).
AGENT_SLOT_RECHECK_SECONDS = 1.0
AGENT_SLOT_RECHECK_MAX_SECONDS = 30.0


def _waiting_for_agent(agent_id: str, *, now: dt.datetime) -> Any:
    """The tasks of an agent deferred for its max_concurrency whose message has not come back
    yet: waiting (queued, or between tries) with a deferral still running (a retry's countdown
    sets queued_at past the last deferral). In the line's order, the most urgent priority first
    (as a worker takes the queues), then the longest waiting: a walk of
    idx_tasks_agent_priority_line, whose condition these filters imply, that stops at a LIMIT."""
    return TaskExecution.objects.filter(
        agent_id=agent_id,
        status__in=[TaskExecution.Status.QUEUED, TaskExecution.Status.RETRYING],
        deferred_at__gt=now,
        deferred_at__gte=F("queued_at"),
    ).order_by(priority_rank(), "queued_at", "execution_id")


def agent_slot_recheck_seconds(agent: Agent, *, priority: str, now: dt.datetime) -> float:
    """How long a task of `priority` deferred for its agent's limit waits before its message
    comes back."""
    # Counted only as far as it sets the delay (past AGENT_SLOT_RECHECK_MAX_SECONDS a longer line
    # waits no longer), in the line's order: under the agent's row lock, a line of 50,000 took
    # 0.12 ms a deferral so. In the model's order (created_at) the count walked the agent's
    # finished tasks first (60 ms beside 75,000 of them); in none, a scan of the table (54 ms).
    # Only the tasks of its priority or a more urgent one are ahead of it (the line's first key,
    # a range of the index): a critical task behind 40 low ones was deferred 30 s, not 1 s.
    enough = int((AGENT_SLOT_RECHECK_MAX_SECONDS / AGENT_SLOT_RECHECK_SECONDS - 1) * agent.max_concurrency) + 1
    ahead = _waiting_for_agent(agent.pk, now=now).alias(rank=priority_rank())
    waiting = ahead.filter(rank__lte=Priority.values.index(priority))[:enough].count()
    delay = min(AGENT_SLOT_RECHECK_MAX_SECONDS, AGENT_SLOT_RECHECK_SECONDS * (1 + waiting / agent.max_concurrency))
    delay *= random.uniform(0.75, 1.25)  # noqa: S311 - jitter, not security
    return round(min(delay, settings.TASK_DEFERRAL_MAX_COUNTDOWN_SECONDS), 3)


def agent_slot_hand_on(agent: Agent, *, now: dt.datetime, slots: int = 1) -> None:
    """After an attempt of a concurrency-limited agent ended (its slot is free): send the
    message of the first task in the agent's line (the most urgent priority, then the longest
    waiting) at once, and of the next ones for the slots the agent's limit gained meanwhile,
    instead of letting the slots stay idle until some deferred message comes back. Their
    deferred messages, superseded, run nothing. A cancel hands on the `slots` it frees so too,
    at once (progress.agents_lines_wake); one the reaper frees is found by the next deferred
    message that comes back. Outside the outcome's transaction, after its commit."""
    if not agent.max_concurrency:
        return

    def wake() -> None:
        # The slot this attempt freed, and one for each slot the agent's limit gained since the
        # claim read it, as far as they are free: the line took those only as its deferred
        # messages came back, up to AGENT_SLOT_RECHECK_MAX_SECONDS later (a limit raised from 1
        # to 8 under a line of 17 one-second tasks kept one running for 3 s more, the line taking
        # 9.2 s instead of 3). Not more: the tasks woken by attempts that ended just before are
        # on their way, not yet running, and a task woken twice over is only deferred again.
        running = TaskExecution.objects.filter(agent_id=OuterRef("pk"), status=TaskExecution.Status.RUNNING)
        limit, taken = (
            Agent.objects.filter(pk=agent.pk)
            .annotate(taken=Coalesce(Subquery(running.values("agent_id").annotate(n=Count("*")).values("n")), 0))
            .values_list("max_concurrency", "taken")
            .first()
        ) or (agent.max_concurrency, 0)
        # A limit removed since (blank: none), the largest raise of all: the whole line goes, as
        # its deferred messages would. Taken for the claim's before, it woke one, and the tries
        # claimed without a limit wake none: 17 one-second tasks took 20 s on six processes.
        free = max(min(limit - taken, slots + max(limit - agent.max_concurrency, 0)), 1) if limit else None
        tasks = list(
            _waiting_for_agent(agent.pk, now=now)
            # and on the database's clock: a task just woken by an attempt that ended at the same
            # moment in another process (deferred_at: that one's `now`, which may read a little
            # later than this one's) is on its way, not to be woken again while the next in line
            # waits on for this freed slot.
            .filter(deferred_at__gt=Now())
            .select_for_update(skip_locked=True)[:free]
        )
        dispatches = []
        for task in tasks:
            queued_at = task.queued_at
            dispatches.append(dispatch_prepare(task, now=now, status=task.status))
            task.queued_at = queued_at
            task.deferred_at = now  # waiting for a worker from now: the queue timeout counts on
        update_rows(tasks, ["celery_task_id", "deferred_at"])
        dispatch_after_commit(dispatches)

    try:
        atomic_with_retry(wake)
    except DatabaseError as exc:
        # A cancel's SIGTERM that landed in the wake's COMMIT stops the process (see _meter):
        # swallowed here, it ran on with the handler's flag set.
        stop_if_interrupted(exc)
        # The outcome is recorded; the waiting tasks look again on their own.
        logger.warning("agent %s: the first task in its line could not be woken", agent.pk, exc_info=True)


def _agent_out_of_service(
    task: TaskExecution,
    agent: Agent,
    *,
    number: int,
    now: dt.datetime,
    worker: str,
    celery_task_id: str,
    redelivered: bool,
) -> Outcome:
    """The task's agent was taken out of service after the task was queued (submission refuses
    such an agent). In maintenance, the task waits: its message comes back every few seconds
    and the queue timeout counts on (queued_at stays), so an operator drains an agent without
    failing its work, unless the maintenance outlasts TASK_QUEUE_TIMEOUT_SECONDS. Inactive
    (retired): the try fails at once, not retried, naming the agent; a retry once it is active
    again runs it."""
    if agent.status == Agent.Status.MAINTENANCE:
        queued_at = task.queued_at
        countdown = MAINTENANCE_RECHECK_SECONDS * random.uniform(0.8, 1.2)  # noqa: S311
        dispatch = dispatch_prepare(task, now=now, countdown=countdown, status=task.status)
        task.queued_at = queued_at
        task.save(update_fields=["status", "celery_task_id"])
        dispatch_after_commit([dispatch])
        return Outcome.DEFERRED
    _unstarted_try_fail(
        task,
        number=number,
        now=now,
        status=TaskAttempt.Status.FAILED,
        cause=TaskAttempt.Cause.ERROR,
        error=f"agent {agent.id} is {agent.status}: it takes no work (make it active, then retry the task)",
        worker=worker,
        celery_task_id=celery_task_id,
        redelivered=redelivered,
    )
    return Outcome.SKIPPED


def attempt_claim(
    *,
    execution_id: str,
    celery_task_id: str,
    worker: str,
    redelivered: bool = False,
    retried: bool = False,
    now: dt.datetime | None = None,
    process: WorkerProcess | None = None,
    sent_again: dict[str, Any] | None = None,
) -> Claim | Outcome:
    """Start an attempt for a delivered message, or say why not (SKIPPED, DEFERRED).

    `retried`: the message was sent again by run_task itself after its worker lost the
    database connection, or met an error the database answered a write with, so an attempt this
    message left running was abandoned; `sent_again` (db.sent_again_record, None from an
    earlier release: a lost connection) says which, and of which attempt. `process`:
    the worker process that runs the attempt, recorded with it for the reaper. A redelivered
    message whose attempt is still recorded running first asks that attempt's worker what
    became of it (services/redelivery.py).

    Its time is the database's (read by the claim's first statement, at no extra cost), not this
    host's: the workflow's deadline and the queue timeout are checked, and the attempt starts, on
    the clock the reaper and every other worker use, and the rest of the attempt keeps to it
    (Claim.clock). `now` replaces it (tests that place attempts in the past)."""
    fast = fastpath.claim(
        execution_id=execution_id,
        celery_task_id=celery_task_id,
        worker=worker,
        redelivered=redelivered or retried,
        now=now,
        process=process,
    )
    if fast is not None:
        return _claim_from_fast(fast)
    # Asked before the transaction, holding no lock (a remote-control round trip); the claim
    # checks under its locks that the attempt asked about is still the running one. A message
    # run_task once sent again (retried) keeps that mark through the broker's redeliveries. One
    # run_task sent again asks too, unless its record names the running attempt: a delivery that
    # started none sent it on, and the attempt running may be another delivery's, still running.
    named = sent_again["attempt_number"] if sent_again is not None and not redelivered else None
    previous = (
        previous_try_check(
            execution_id=execution_id, celery_task_id=celery_task_id, process=process, unless_attempt=named
        )
        if redelivered or (retried and sent_again is not None)
        else None
    )
    return atomic_with_retry(
        lambda: _attempt_claim(
            execution_id=execution_id,
            celery_task_id=celery_task_id,
            worker=worker,
            redelivered=redelivered,
            retried=retried,
            now=now,
            process=process,
            previous=previous,
            sent_again=sent_again,
        )
    )


def _upstream_outputs(workflow_id: str | None, depends_on: list[str]) -> dict[str, Any]:
    """The outputs of the tasks `depends_on` names, by name, in the spec's order: the rows come
    in whatever order the table holds them (a fan-in's parents in the order their completions
    rewrote them), which an agent iterating them, or an agent service sent them, took as given."""
    if not depends_on or not workflow_id:
        return {}
    outputs = dict(
        TaskExecution.objects.filter(workflow_id=workflow_id, task_name__in=depends_on).values_list(
            "task_name", "output_data"
        )
    )
    return {name: outputs[name] for name in depends_on if name in outputs}


def _claim_from_fast(fast: fastpath.FastClaim) -> Claim:
    attempt, agent = fast.attempt, fast.agent
    clock = DatabaseClock(attempt.started_at)  # before the upstream outputs' query
    context = TaskContext(
        execution_id=attempt.execution_id,
        workflow_id=fast.workflow_id,
        task_name=fast.task_name,
        agent_id=agent.id,
        attempt_number=attempt.attempt_number,
        timeout_seconds=attempt.timeout_seconds,
        upstream=_upstream_outputs(fast.workflow_id, fast.depends_on),
        agent_config=agent.config,
    )
    return Claim(
        attempt=attempt,
        agent=agent,
        task_input=fast.input_data,
        context=context,
        clock=clock,
        standalone=fast.standalone,
    )


def _attempt_claim(
    *,
    execution_id: str,
    celery_task_id: str,
    worker: str,
    redelivered: bool,
    retried: bool,
    now: dt.datetime | None,
    process: WorkerProcess | None,
    previous: PreviousTry | None = None,
    sent_again: dict[str, Any] | None = None,
) -> Claim | Outcome:
    task = (
        TaskExecution.objects.select_for_update(of=("self",))
        .select_related("agent", "workflow")
        .annotate(database_now=Now())
        .filter(pk=execution_id)
        .first()
    )
    if task is None or task.celery_task_id != celery_task_id:
        return Outcome.SKIPPED  # unknown, or a stale message superseded by a newer one
    clock = DatabaseClock(now or task.database_now)
    now = clock.at
    if task.status == TaskExecution.Status.RUNNING:
        last = TaskAttempt.objects.select_for_update().filter(execution=task).order_by("-attempt_number").first()
        if last is None or last.status != TaskAttempt.Status.RUNNING or not (redelivered or retried):
            return Outcome.SKIPPED  # a duplicate delivery: the attempt is recorded already
        status, error_class = TaskAttempt.Status.LOST, ""
        asked = previous if previous is not None and previous.attempt_id == last.pk else None
        if asked is not None and asked.running:
            logger.warning(
                "attempt %s of %s: its message was delivered again while worker %s still runs it "
                "(pool process %s); this delivery is a duplicate and runs nothing",
                last.attempt_number,
                task.execution_id,
                last.worker,
                last.pool_pid,
            )
            return Outcome.SKIPPED
        if asked is not None:
            # The broker redelivered the message of a running attempt, and its worker said what
            # became of it (services/redelivery.py). First even for a message run_task once sent
            # again (retried, a mark it keeps): the attempt may be a later delivery's, stopped
            # for another cause (its broker connection lost, its pool process dead).
            status, cause, error, error_class = asked.status, asked.cause, asked.error, asked.error_class
        elif (
            retried
            and last.celery_task_id == celery_task_id
            and sent_again is not None
            and sent_again["attempt_number"] == last.attempt_number
        ):
            # run_task sent its own message again after the delivery that ran this attempt lost
            # its database connection, or met an error the database answered a write with (a
            # lock or statement timeout, a deadlock, a full disk): whatever the attempt did was
            # not recorded, and that delivery has ended. Only of the attempt it names: a later
            # one this message started (its worker since lost, the message redelivered) did not.
            if sent_again["cause"] == TaskAttempt.Cause.DATABASE_ERROR:
                cause, error_class = TaskAttempt.Cause.DATABASE_ERROR, sent_again["error_class"]
                error = (
                    f"worker {last.worker or '?'} met a database error during attempt {last.attempt_number}, "
                    f"which was not recorded (message sent again): {sent_again['error']}"
                )
            else:
                cause = TaskAttempt.Cause.CONNECTION_LOST
                error = (
                    f"worker {last.worker or '?'} lost its database connection during attempt "
                    f"{last.attempt_number} (message sent again)"
                )
        elif retried and sent_again is None and last.celery_task_id == celery_task_id:
            # Sent again by an earlier release's run_task, which says nothing of why: it did so
            # only when its connection broke.
            cause = TaskAttempt.Cause.CONNECTION_LOST
            error = (
                f"worker {last.worker or '?'} lost its database connection during attempt {last.attempt_number} "
                "(message sent again)"
            )
        elif redelivered or (retried and last.celery_task_id == celery_task_id):
            # The broker redelivered the message of a running attempt: its worker was lost. So too
            # for a message run_task sent again that does not name this attempt: a delivery that
            # did not send it again, itself redelivered since, started it.
            cause = TaskAttempt.Cause.WORKER_LOST
            error = f"worker {last.worker or '?'} was lost during attempt {last.attempt_number} (message redelivered)"
        else:
            return Outcome.SKIPPED
        again = attempt_abandon(
            task, last, status=status, cause=cause, error=error, now=now, retry_now=True, error_class=error_class
        )
        if again is not None:
            transaction.on_commit(lambda: attempts_reaped(attempts=[last]))
        if not again:
            return Outcome.SKIPPED
        # Between attempts now: the concurrency limit below must not count it as running,
        # and if it defers, its next message must find it waiting, not running. Its message
        # is back in the queue as of now, as a retry's new message would be: the queue
        # timeout counts from here, not from its first queueing (the lost attempt ran since).
        task.status = TaskExecution.Status.RETRYING
        task.queued_at = now
        task.save(update_fields=["status", "queued_at"])
    elif task.status not in (TaskExecution.Status.QUEUED, TaskExecution.Status.RETRYING):
        return Outcome.SKIPPED

    workflow = task.workflow
    if workflow is not None and workflow.status != Workflow.Status.RUNNING:
        tasks_cancel(TaskExecution.objects.filter(pk=task.pk), reason=f"workflow is {workflow.status}", now=now)
        return Outcome.SKIPPED
    if workflow is not None and deadline_passed(workflow.deadline, now):
        locked = Workflow.objects.select_for_update().get(pk=workflow.pk)
        # The deadline is read again under the lock: an operator may have extended it since.
        if locked.status != Workflow.Status.RUNNING or deadline_passed(locked.deadline, now):
            if locked.status == Workflow.Status.RUNNING:
                workflow_fail_past_deadline(locked, now=now)
            return Outcome.SKIPPED

    number = (TaskAttempt.objects.filter(execution=task).aggregate(n=Max("attempt_number"))["n"] or 0) + 1
    if queue_waited_since(task, now=now) is not None:
        queue_timeout_record(
            task, number=number, now=now, worker=worker, celery_task_id=celery_task_id, redelivered=redelivered
        )
        return Outcome.SKIPPED

    agent = task.agent
    if agent.status != Agent.Status.ACTIVE:
        return _agent_out_of_service(
            task, agent, number=number, now=now, worker=worker, celery_task_id=celery_task_id, redelivered=redelivered
        )
    if agent.max_concurrency:
        Agent.objects.select_for_update().filter(pk=agent.pk).first()
        running = TaskExecution.objects.filter(agent=agent, status=TaskExecution.Status.RUNNING).count()
        if running >= agent.max_concurrency:
            countdown = agent_slot_recheck_seconds(agent, priority=task.priority, now=now)
            queued_at = task.queued_at
            dispatch = dispatch_prepare(task, now=now, countdown=countdown, status=task.status)
            # Waiting for the agent is not waiting for a worker: the queue timeout counts from
            # the end of this deferral, when its message comes back (or the task is woken
            # earlier: agent_slot_hand_on), so a task that waits its turn is not failed for it
            # (DESIGN: excess tasks wait, they are not failed). queued_at stays: the task has
            # waited since then (the queued-age gauge, submit-to-start, the order of the line).
            task.queued_at = queued_at
            task.deferred_at = now + dt.timedelta(seconds=countdown)
            task.save(update_fields=["status", "celery_task_id", "deferred_at"])
            dispatch_after_commit([dispatch])
            return Outcome.DEFERRED
        # The attempt starts now, once the limit admitted it: the wait for the agent row
        # lock is not part of it, and its start is after the end of the attempt it waited on.
        now = clock.now()

    attempt = TaskAttempt.objects.create(
        execution=task,
        attempt_number=number,
        status=TaskAttempt.Status.RUNNING,
        worker=worker,
        celery_task_id=celery_task_id,
        redelivered=redelivered,
        # A message run_task sent again itself (its connection broke) comes again as much as
        # one the broker redelivered: both follow the tries of the same id.
        delivery_count=delivery_count(task, celery_task_id=celery_task_id, redelivered=redelivered or retried),
        timeout_seconds=task.timeout_seconds,
        started_at=now,
        **attempt_fields(process),
    )
    task.status = TaskExecution.Status.RUNNING
    task.started_at = task.started_at or now
    task.worker = worker
    task.save(update_fields=["status", "started_at", "worker"])
    # The definition the attempt runs with (the agent row read above): agent_registered events
    # record each definition under its hash (services/agents.py, definition_snapshot).
    started = {"worker": worker, "redelivered": redelivered, "agent_definition_sha256": agent.definition_hash}
    task_event(task, EventType.TASK_STARTED, attempt=attempt, payload=started)

    context = TaskContext(
        execution_id=task.execution_id,
        workflow_id=task.workflow_id,
        task_name=task.task_name,
        agent_id=agent.id,
        attempt_number=number,
        timeout_seconds=task.timeout_seconds,
        upstream=_upstream_outputs(task.workflow_id, task.depends_on),
        agent_config=agent.config,
        conversation=conversation_for_task(task),
    )
    return Claim(attempt=attempt, agent=agent, task_input=task.input_data, context=context, clock=clock)


def attempt_succeed(
    *,
    attempt: TaskAttempt,
    result: AgentResult,
    duration_ms: float,
    now: dt.datetime,
    also: Callable[[], object] | None = None,
    standalone: bool = False,
) -> bool:
    """Record a successful attempt and complete its task; False if the attempt was no
    longer running (reaped or cancelled meanwhile), in which case nothing is recorded.
    `also` writes more in the same transaction, only when the attempt is recorded.

    `standalone` (see Claim): when nothing else is to be written and
    the workflow needs no advancing, the completion is one statement committed on its own,
    without the BEGIN and COMMIT round trips of a transaction block."""
    usage = result.usage
    recorded = fastpath.Completion(
        attempt_id=attempt.pk,
        output=result.output,
        duration_ms=duration_ms,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cost=usage.cost_usd,
        now=now,
    )
    if standalone and also is None:
        alone = fastpath.succeed_alone(recorded)
        if alone is not None:
            return alone

    def run() -> bool:
        if fastpath.enabled():
            done = fastpath.succeed(recorded)
            if done is None:
                return False
            if also is not None:
                also()
            workflow_id, task_name, status, advance, deadline = done
            if workflow_id and (advance or deadline_passed(deadline, now)):
                workflow_advance(
                    workflow_id=workflow_id, completed_task=task_name, status=status, now=now, deadline=deadline
                )
            return True
        if not _close_attempt(
            attempt,
            status=TaskAttempt.Status.SUCCEEDED,
            cause=None,
            error=None,
            now=now,
            duration_ms=duration_ms,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            tokens_used=usage.tokens,
            cost_usd=usage.cost_usd,
        ):
            return False
        if also is not None:
            also()
        task = TaskExecution.objects.select_for_update().get(pk=attempt.execution_id)
        TaskExecution.objects.filter(pk=task.pk).update(
            status=TaskExecution.Status.COMPLETED,
            output_data=result.output,
            error=None,
            completed_at=now,
            execution_time_ms=F("execution_time_ms") + duration_ms if task.execution_time_ms else duration_ms,
            input_tokens=F("input_tokens") + usage.input_tokens,
            output_tokens=F("output_tokens") + usage.output_tokens,
            tokens_used=F("tokens_used") + usage.tokens,
            cost_usd=F("cost_usd") + usage.cost_usd,
        )
        task.status = TaskExecution.Status.COMPLETED
        task.output_data = result.output
        task_event(task, EventType.TASK_COMPLETED, attempt=attempt, payload={"duration_ms": round(duration_ms, 3)})
        if task.workflow_id:
            workflow_on_task_completed(task, now=now, tokens=usage.tokens, cost=usage.cost_usd)
        return True

    return atomic_with_retry(run)


def attempt_fail(
    *,
    attempt: TaskAttempt,
    exc: BaseException,
    duration_ms: float,
    now: dt.datetime,
    usage: Usage | None = None,
    also: Callable[[], object] | None = None,
) -> bool:
    """Record a failed (or soft-timed-out) attempt, then retry or fail the task. `also`
    writes more in the same transaction, only when the attempt is recorded."""
    timed_out = isinstance(exc, SoftTimeLimitExceeded)
    status = TaskAttempt.Status.TIMED_OUT if timed_out else TaskAttempt.Status.FAILED
    cause = TaskAttempt.Cause.SOFT_TIMEOUT if timed_out else TaskAttempt.Cause.ERROR
    retryable = True if timed_out else is_retryable(exc)
    message = storable_text(
        f"soft time limit of {attempt.timeout_seconds} s exceeded" if timed_out else f"{type(exc).__name__}: {exc}"
    )
    trace = storable_text("".join(tb.format_exception(exc))[-20_000:])
    # Cut to its column: a longer name left the attempt running for the reaper to take for a
    # hard time-out and run again.
    error_class = error_class_name(exc)
    usage = usage or Usage()

    def run() -> bool:
        if not _close_attempt(
            attempt,
            status=status,
            cause=cause,
            error=message,
            now=now,
            duration_ms=duration_ms,
            error_class=error_class,
            retryable=retryable,
            traceback=trace,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            tokens_used=usage.tokens,
            cost_usd=usage.cost_usd,
        ):
            return False
        if also is not None:
            also()
        task = TaskExecution.objects.select_for_update().get(pk=attempt.execution_id)
        task.execution_time_ms = (task.execution_time_ms or 0) + duration_ms
        task.input_tokens += usage.input_tokens
        task.output_tokens += usage.output_tokens
        task.tokens_used += usage.tokens
        task.cost_usd += usage.cost_usd
        task.save(update_fields=["execution_time_ms", "input_tokens", "output_tokens", "tokens_used", "cost_usd"])
        if task.workflow_id:
            workflow_add_usage(task.workflow_id, tokens=usage.tokens, cost=usage.cost_usd, error=True)
        attempt.status = status
        _fail_or_retry(
            task,
            attempt=attempt,
            status=status,
            error=message,
            retryable=retryable,
            now=now,
            retry_after=exc.retry_after if isinstance(exc, RetryableError) else None,
        )
        return True

    return atomic_with_retry(run)


def attempt_run(
    *,
    execution_id: str,
    celery_task_id: str,
    worker: str,
    redelivered: bool = False,
    retried: bool = False,
    process: WorkerProcess | None = None,
    sent_again: dict[str, Any] | None = None,
    claimed: Callable[[int], object] | None = None,
) -> Outcome:
    """Claim the delivered message, run the agent once, record the outcome. `claimed` is given
    the number of the attempt this delivery started, once its claim has committed.

    The agent gets its tools and peers; what it used through hand-offs is added to its own
    usage. In a conversation it also gets the thread, and what it said is stored there.

    Celery's soft time limit interrupts the agent only: in a prefork pool child it is held off
    everywhere else (orchestration.soft_limit). One that fires during the claim ends the try
    as the agent starts, recorded timed out like an agent that ran out of time; one that fires
    while the outcome is recorded is dropped once it is (its after-commit messages sent)."""
    with soft_limit_held() as limit:
        try:
            outcome = _attempt_run(
                limit,
                execution_id=execution_id,
                celery_task_id=celery_task_id,
                worker=worker,
                redelivered=redelivered,
                retried=retried,
                process=process,
                sent_again=sent_again,
                claimed=claimed,
            )
        except Exception as exc:
            # A cancel's SIGTERM that landed in a COMMIT outside the agent (the claim's, an
            # outcome's): Django's atomic() replaced the handler's SystemExit with the error of its
            # `finally` on the busy connection ("can't change 'autocommit' now"); or one that the
            # agent's cleanup replaced (a `finally` raising). Raised as the
            # task's failure, it left the pool process running with the handler's flag set, and
            # the next task's agent error there was taken for a stop: that process ended under it,
            # which Celery, the process marked terminated, acknowledged as revoked (its attempt
            # left running for the reaper).
            stop_raised(exc)
            raise
    if terminate_handler_fired():
        # The terminate signal's SystemExit was swallowed on its way (an agent that catches
        # BaseException around its work, and answers): its outcome is recorded, and the process
        # stops now. Returned as any other try, it ran on with the handler's flag set, and the
        # next task's agent error there was taken for a stop, ending the process under that try.
        raise SystemExit("stopped by a terminate signal (its exit was caught on the way)")
    return outcome


def _attempt_run(
    limit: SoftLimit,
    *,
    execution_id: str,
    celery_task_id: str,
    worker: str,
    redelivered: bool,
    retried: bool,
    process: WorkerProcess | None,
    sent_again: dict[str, Any] | None,
    claimed: Callable[[int], object] | None,
) -> Outcome:
    # Where the delivery's hard time limit falls, near enough (billiard counts it from the pool
    # process's acknowledgement of the message, a moment before this): the outcome's write is
    # not tried again past it (_result_record_through_lost_connection), in a pool that enforces it.
    began = time.monotonic()
    claim = attempt_claim(
        execution_id=execution_id,
        celery_task_id=celery_task_id,
        worker=worker,
        redelivered=redelivered,
        retried=retried,
        process=process,
        sent_again=sent_again,
    )
    if not isinstance(claim, Claim):
        return claim
    timeout = claim.attempt.timeout_seconds
    hard_limit_at = began + hard_limit_seconds(timeout) if timeout and _hard_limit_enforced(limit) else None
    if claimed is not None:
        claimed(claim.attempt.attempt_number)
    attempt_started(
        execution_id=execution_id,
        workflow_id=claim.context.workflow_id,
        agent_id=claim.agent.id,
        attempt_number=claim.attempt.attempt_number,
    )
    context = equip(dataclasses.replace(claim.context, meter=_meter(claim.attempt.pk)), claim.agent)
    conversation = context.conversation
    task_input = claim.task_input
    if conversation is not None:
        task_input = {**task_input, "messages": conversation.history}
    started = time.monotonic()
    result: AgentResult | None = None
    agent_error: BaseException | None = None
    try:
        try:
            # A soft limit that fired during the claim (held off, the claim committed) is raised
            # here, before the agent starts, and recorded below as if the agent had hit it.
            with limit.released():
                if conversation is not None and conversation.missing:
                    raise PermanentError(f"the message {conversation.message_id!r} this task answers no longer exists")
                try:
                    result = agent_execute(agent=claim.agent, task_input=task_input, context=context)
                except BaseException as raised:
                    agent_error = raised
                    raise
        except SoftTimeLimitExceeded as late:
            if late is agent_error or (result is None and agent_error is None):
                raise  # it interrupted the agent, or fired during the claim
            # It fired once the agent had ended, before released() did (Python runs the handler
            # at its next check point: the context manager's exit): nothing was left to
            # interrupt. The agent's own outcome stands, with the usage it reported.
            logger.warning(
                "attempt %s of %s: the soft time limit fired as the agent ended; its outcome is kept",
                claim.attempt.attempt_number,
                execution_id,
            )
        if agent_error is not None:
            raise agent_error
    except BaseException as exc:
        if agent_stopping(exc):
            # The worker is going away (a cancel's SIGTERM, a shutdown); the reaper closes it. A
            # stop replaced on its way out (the agent's cleanup raised) is raised again as a
            # SystemExit by attempt_run.
            raise
        # Any other BaseException is the agent's failure (asyncio's CancelledError from its
        # client, say; its own sys.exit()), recorded as such: raised on, it escaped Celery's task
        # with nothing recorded, and the attempt stayed running until the reaper took it for a
        # hard time-out, or the exit ended the pool process and the try was recorded lost.
        duration_ms = (time.monotonic() - started) * 1000
        logger.info("attempt %s of %s failed: %r", claim.attempt.attempt_number, execution_id, exc)
        # An executor that spent tokens before failing attaches them as `exc.usage`: a failed
        # try's cost is recorded too ("wasted spend").
        try:
            usage = usage_checked(getattr(exc, "usage", None) or Usage())
        except PermanentError:
            logger.warning(
                "attempt %s of %s: the failure's usage is malformed; not recorded",
                claim.attempt.attempt_number,
                execution_id,
            )
            usage = Usage()
        if not connection.in_atomic_block:
            # The soft limit (or the agent's own error) may have interrupted a query of the
            # agent's (the platform's own writes hold the limit off): without this the record
            # below was refused, and the attempt left running for the reaper.
            _connection_freed()
        until = _result_write_until(hard_limit_at)
        usage = _at_least_metered(claim.attempt, usage + context.spend, until=until)
        error = storable_text("timed out" if isinstance(exc, SoftTimeLimitExceeded) else f"{type(exc).__name__}: {exc}")
        now = claim.clock.now()
        recorded, exc, usage, error = _fail_recorded(
            context, claim.attempt, exc, duration_ms=duration_ms, now=now, usage=usage, error=error, until=until
        )
        if not recorded:
            _refused_outcome_record(
                claim.attempt,
                usage=usage,
                outcome="timed_out" if isinstance(exc, SoftTimeLimitExceeded) else Outcome.FAILED.value,
                error=error,
                duration_ms=duration_ms,
            )
        attempt_finished(
            attempt=claim.attempt,
            agent_id=claim.agent.id,
            workflow_id=claim.context.workflow_id,
            duration_ms=duration_ms,
            finished_at=now,
            usage=usage,
            error=exc,
            recorded=recorded,
        )
        agent_slot_hand_on(claim.agent, now=claim.clock.now())
        return Outcome.FAILED
    assert result is not None
    duration_ms = (time.monotonic() - started) * 1000
    result.usage = result.usage + context.spend
    also = _turn_writer(context, claim.attempt, output=result.output, error=None, usage=result.usage)
    outcome, failure = Outcome.SUCCEEDED, None
    now = claim.clock.now()
    try:
        succeed = functools.partial(
            attempt_succeed,
            attempt=claim.attempt,
            result=result,
            duration_ms=duration_ms,
            now=now,
            also=also,
            standalone=claim.standalone,
        )
        recorded = _record_through_soft_limit(
            functools.partial(
                _result_record_through_lost_connection,
                succeed,
                attempt=claim.attempt,
                recorded_as={"status": TaskAttempt.Status.SUCCEEDED},
                until=_result_write_until(hard_limit_at),
            ),
            attempt=claim.attempt,
            succeeded=True,
        )
    except DatabaseError as exc:
        if not database_error_permanent(exc):
            raise  # run_task sends the message again: the next delivery closes the attempt
        # The database refused the result, and would every time (a value the checks above
        # missed, a limit of PostgreSQL's): record the attempt failed for good, with its spend,
        # rather than leave it running, or sent again, to be run again and refused again.
        logger.exception("attempt %s of %s: its result could not be stored", claim.attempt.attempt_number, execution_id)
        failure = PermanentError(f"the agent's result could not be stored: {type(exc).__name__}: {exc}")
        recorded, failure, result.usage, _ = _fail_recorded(
            context,
            claim.attempt,
            failure,
            duration_ms=duration_ms,
            now=now,
            usage=result.usage,
            error=storable_text(str(failure)),
            until=_result_write_until(hard_limit_at),
        )
        outcome = Outcome.FAILED
    if not recorded:
        _refused_outcome_record(
            claim.attempt,
            usage=result.usage,
            outcome=outcome.value,
            error=None if failure is None else storable_text(str(failure)),
            duration_ms=duration_ms,
        )
    attempt_finished(
        attempt=claim.attempt,
        agent_id=claim.agent.id,
        workflow_id=claim.context.workflow_id,
        duration_ms=duration_ms,
        finished_at=now,
        usage=result.usage,
        error=failure,
        recorded=recorded,
    )
    agent_slot_hand_on(claim.agent, now=claim.clock.now())
    return outcome


def _fail_recorded(
    context: TaskContext,
    attempt: TaskAttempt,
    exc: BaseException,
    *,
    duration_ms: float,
    now: dt.datetime,
    usage: Usage,
    error: str,
    until: float | None = None,
) -> tuple[bool, BaseException, Usage, str]:
    """attempt_fail, through the soft limit (_record_through_soft_limit) and a lost connection
    (_result_record_through_lost_connection, as a success's: sent again, the next delivery
    closed the attempt lost with what its meter had added, the failure's error and the rest of
    what it paid gone from the record, and ran the agent again, retryable or not), with the
    conversation's turn (`error`, what the turn says). Returns whether it was recorded, and the
    failure, usage and error it was recorded with.

    When the database refuses that record for good (database_error_permanent: the usage past
    what a task's or workflow's total holds, a value the failure carries that it cannot store),
    the attempt is recorded failed for good by a PermanentError that names the refusal and the
    failure, without the usage, which the message gives: raised on, the refusal left the
    attempt running, for the reaper to take for a hard time-out and run the agent again, to be
    refused again."""

    def record(failure: BaseException, usage: Usage, error: str) -> bool:
        also = _turn_writer(context, attempt, output=None, error=error, usage=usage)
        fail = functools.partial(
            attempt_fail, attempt=attempt, exc=failure, duration_ms=duration_ms, now=now, usage=usage, also=also
        )
        timed_out = isinstance(failure, SoftTimeLimitExceeded)
        # As attempt_fail records it: no one else closes an attempt so (the reaper's time-out is
        # a hard one, and the claims' failures are of tries they start).
        recorded_as = (
            {"status": TaskAttempt.Status.TIMED_OUT, "cause": TaskAttempt.Cause.SOFT_TIMEOUT}
            if timed_out
            else {"status": TaskAttempt.Status.FAILED, "cause": TaskAttempt.Cause.ERROR}
        )
        return _record_through_soft_limit(
            functools.partial(
                _result_record_through_lost_connection,
                fail,
                attempt=attempt,
                recorded_as=recorded_as,
                until=until,
            )
        )

    try:
        return record(exc, usage, error), exc, usage, error
    except DatabaseError as refused:
        if not database_error_permanent(refused):
            raise  # run_task sends the message again: the next delivery closes the attempt
        described = database_error_described(refused)
        logger.exception(
            "attempt %s of %s: its failure could not be stored", attempt.attempt_number, attempt.execution_id
        )
    failure = PermanentError(
        f"the attempt's failure could not be stored ({described['error']}); it is recorded without its "
        f"usage ({usage.input_tokens} input + {usage.output_tokens} output tokens, ${usage.cost_usd}). "
        f"It failed with {error[:ERROR_DESCRIBED_MAX_LENGTH]}"
    )
    error = storable_text(str(failure))
    return record(failure, Usage(), error), failure, Usage(), error


def _record_through_soft_limit(
    record: Callable[[], bool], *, attempt: TaskAttempt | None = None, succeeded: bool = False
) -> bool:
    """Record an attempt's known outcome (attempt_succeed or attempt_fail: one transaction,
    conditional on the attempt still running) even if Celery's soft time limit fires meanwhile.
    The limit is raised asynchronously, wherever the worker is, once per delivery: when it lands
    while the outcome is being recorded (the completion waiting on a workflow row another
    transaction holds, say), that transaction is rolled back, and without a second try the
    attempt would stay running until the reaper recorded it as a hard time-out of a killed
    process and ran the agent again. The hard limit's grace (TASK_HARD_TIMEOUT_GRACE_SECONDS)
    is the time left for the second try.

    psycopg cancels an interrupted statement only for KeyboardInterrupt and SystemExit: after
    SoftTimeLimitExceeded the statement is still in flight on the connection, which refuses any
    other ("another command is already in progress"). Inside a transaction Django's failed
    rollback closes it (the server then aborts the transaction), but the succeed_alone statement
    (autocommit) leaves it busy, and on the server it still runs, and commits, once it has its
    locks. So the connection is closed before the second try, which waits on the attempt row
    the orphaned statement locked first; if that statement recorded the success, the second try
    finds the attempt no longer running, and the success is ours (`succeeded`: only this
    delivery records its attempt succeeded).

    In a prefork pool child the limit is held off while an outcome is recorded (attempt_run,
    orchestration.soft_limit), so it never lands here. This remains for a soft limit that is
    not billiard's signal: the timer of the gevent and eventlet pools, which raises it in the
    greenlet, or a task run in-process while something else raises it (the tests' SIGALRM).
    It does not cover a limit that interrupts the COMMIT itself (Django then fails to restore
    autocommit on the busy connection, and that error, not this one, escapes)."""
    try:
        return record()
    except SoftTimeLimitExceeded:
        logger.warning("the soft time limit fired while an attempt's outcome was recorded; recording it again")
        if connection.in_atomic_block:
            raise  # not this function's transaction to end
        _connection_freed()
    if record():
        return True
    if succeeded and attempt is not None:
        return TaskAttempt.objects.filter(pk=attempt.pk, status=TaskAttempt.Status.SUCCEEDED).exists()
    return False


# Left before the hard time limit by the last try of an outcome's write, beyond the time its
# connection may take to be refused (DATABASE_CONNECT_TIMEOUT): for run_task to send the message
# again, and the pool's timer (which looks once a second) to find it ended.
RESULT_WRITE_HARD_LIMIT_MARGIN_SECONDS = 2.0


def _hard_limit_enforced(limit: SoftLimit) -> bool:
    """Whether the pool running this try ends it at its hard time limit: the prefork pool kills
    the process (one of its processes, where billiard's soft limit handler is what `limit`
    holds), the gevent and eventlet pools the greenlet. The solo and threads pools enforce no
    time limit: there nothing ends an outcome's write, which is then tried again for the whole of
    TASK_RESULT_WRITE_RETRY_SECONDS. Cut at a limit that never comes, a success of a task with
    a short timeout was not written again at all: sent again, the agent, paid for, ran again."""
    return limit.holding or detect_environment() != "default"


def _result_write_until(hard_limit_at: float | None) -> float:
    """Until when (time.monotonic()) a try's outcome may be written again through a lost
    database connection (_result_record_through_lost_connection), from now: for
    TASK_RESULT_WRITE_RETRY_SECONDS, and never past the delivery's hard time limit
    (`hard_limit_at`). There the pool kills the process, mid-try or asleep, its message is
    acknowledged as failed, and the attempt, whose outcome was known, waited for the reaper
    (past the limit plus REAPER_GRACE_SECONDS) to be recorded a hard time-out (timed_out,
    hard_timeout) instead of closed lost (connection_lost) by the message sent again at once. So
    a try is begun only while it can end, its connection refused after DATABASE_CONNECT_TIMEOUT
    at worst, with RESULT_WRITE_HARD_LIMIT_MARGIN_SECONDS to spare before the limit."""
    until = time.monotonic() + settings.TASK_RESULT_WRITE_RETRY_SECONDS
    if hard_limit_at is not None:
        connect_timeout = connection.settings_dict.get("OPTIONS", {}).get("connect_timeout") or 0
        until = min(until, hard_limit_at - float(connect_timeout) - RESULT_WRITE_HARD_LIMIT_MARGIN_SECONDS)
    return until


def _through_lost_connection(fn: Callable[[], Any], *, attempt: TaskAttempt, until: float) -> tuple[Any, bool]:
    """fn() (a statement or a transaction of the attempt's outcome), tried again on a new
    connection while the database connection is lost and the next try can begin by `until`
    (_result_write_until). Returns its value and whether a connection was lost on the way. An
    error the database answered (a lock timeout, a value refused) is not a lost connection, and
    is raised at once; so is a connection still lost at the end, and one inside a transaction
    (not this function's to end)."""
    delay = 0.25
    lost = False
    while True:
        try:
            return fn(), lost
        except (InterfaceError, OperationalError) as exc:
            if (
                connection.in_atomic_block
                or not (isinstance(exc, InterfaceError) or database_unreachable(exc))
                or time.monotonic() + delay > until
            ):
                raise
            lost = True
            logger.warning(
                "attempt %s of %s: the database connection was lost while its result was recorded "
                "(%s: %s); recording it again on a new connection in %.2f s",
                attempt.attempt_number,
                attempt.execution_id,
                type(exc).__name__,
                str(exc).strip(),
                delay,
            )
            connection.close()
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def _result_record_through_lost_connection(
    record: Callable[[], bool],
    *,
    attempt: TaskAttempt,
    recorded_as: dict[str, Any] | None = None,
    until: float | None = None,
) -> bool:
    """Record a try's outcome (attempt_succeed, attempt_fail) through a lost database
    connection: PostgreSQL restarting or failing over, a proxy or an operator ending the session
    while the agent ran. The write is tried again on a new connection until `until`
    (_result_write_until: for up to TASK_RESULT_WRITE_RETRY_SECONDS, never up to the hard time
    limit). Raised on at once (run_task then sends its message again, and the next delivery
    closes the attempt lost and runs the agent again), the agent's result, or its failure and
    what it paid, was thrown away for a blip of a second.

    A write whose COMMIT reached the server before the connection went is found on the next
    try: the attempt is no longer running, and if it is recorded as the write records it
    (`recorded_as`, its fields: succeeded by default), that was this try's own write (only this
    delivery records its attempt so). What that COMMIT was to do after it (send its dependents
    or its retry, revoke what it cancelled) is done then: Django, seeing the error, dropped it,
    and the task waited for the dispatch sweep (past DISPATCH_SWEEP_AFTER_SECONDS)."""
    committed: list[Callable[[], object]] = []

    def tried() -> bool:
        try:
            return record()
        except Error as exc:
            # The last COMMIT that may have landed with something to do: a later try's, that
            # found the attempt closed, had nothing.
            committed[:] = getattr(exc, "commit_callbacks", None) or committed
            raise

    done, lost = _through_lost_connection(
        tried, attempt=attempt, until=_result_write_until(None) if until is None else until
    )
    if done or not lost:
        return done
    ours = recorded_as or {"status": TaskAttempt.Status.SUCCEEDED}
    if not TaskAttempt.objects.filter(pk=attempt.pk, **ours).exists():
        return False
    for callback in committed:
        try:
            callback()
        except Exception:
            logger.exception("attempt %s: what its record's COMMIT was to do after it failed", attempt.pk)
    return True


def _connection_freed() -> None:
    """Close the database connection if a statement interrupted by an exception (the soft
    limit, raised inside psycopg's wait) is still in flight on it: any other statement would be
    refused ("another command is already in progress", or atomic()'s "can't change 'autocommit'
    now"). The next statement opens a new connection. Only outside a transaction block."""
    raw = connection.connection if connection.vendor == "postgresql" else None
    if raw is not None and raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        logger.warning("an interrupted statement is still in flight on the connection; closing it")
        connection.close()


def _refused_outcome_record(
    attempt: TaskAttempt, *, usage: Usage, outcome: str, error: str | None, duration_ms: float
) -> None:
    """The try ended, but its attempt had been closed meanwhile without a result (lost: its
    message was redelivered and its worker did not say it still ran it, or the reaper closed
    it; timed out; cancelled), and the task may have been completed by a later attempt: its
    outcome is not applied a second time. It is recorded as it happened, in one transaction:
    a task_ended_late event with the outcome (`succeeded`, `failed`, `timed_out`), its error
    and duration, and what the try paid: the usage it reported, beyond what its meter had
    added, goes to the attempt, its task and its workflow as late usage (wasted, unless
    cancelled), as a bill that arrives after the close."""

    def record() -> tuple[str, Usage] | None:
        added = _late_usage_add(attempt.pk, usage, whole=True)
        _late_end_event(
            attempt.pk, outcome=outcome, error=error, duration_ms=duration_ms, added=added[1] if added else None
        )
        return added

    try:
        added = atomic_with_retry(record)
    except DatabaseError as exc:
        stop_if_interrupted(exc)  # the process was told to stop (see _meter)
        logger.warning("attempt %s: could not record the end of its refused outcome", attempt.pk, exc_info=True)
        return
    logger.warning(
        "attempt %s of %s ended (%s) after it had been closed: its outcome is not applied%s",
        attempt.attempt_number,
        attempt.execution_id,
        error or outcome,
        f"; {added[1].tokens} tokens, ${added[1].cost_usd} it reported were added to it" if added else "",
    )
    if added is not None:
        late_usage_recorded(attempt_id=attempt.pk, agent_id=added[0], usage=added[1])


def _late_end_event(
    attempt_id: int, *, outcome: str, error: str | None, duration_ms: float, added: Usage | None
) -> None:
    """The task_ended_late event of an attempt closed without its try (see
    _refused_outcome_record), in the caller's transaction. Nothing for an attempt that is not
    closed that way (recorded with a result, or gone)."""
    closed = TaskAttempt.objects.select_related("execution").filter(pk=attempt_id).first()
    if closed is None or closed.status not in _ABANDONED:
        return
    payload: dict[str, Any] = {
        "closed_as": closed.status,
        "cause": closed.cause,
        "outcome": outcome,
        "duration_ms": round(duration_ms, 3),
    }
    if error is not None:
        payload["error"] = error
    if added is not None:
        payload["late_usage"] = _usage_payload(added)
    task_event(closed.execution, EventType.TASK_ENDED_LATE, attempt=closed, payload=payload, severity=Severity.WARNING)


def _usage_payload(usage: Usage) -> dict[str, Any]:
    return {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens, "cost_usd": str(usage.cost_usd)}


def _meter(attempt_id: int) -> Callable[[Usage], None]:
    """Add paid usage to the attempt's row while it runs (one autocommitted UPDATE, only
    while it is running), so a cancelled, reaped or killed attempt keeps what it spent;
    attempt_succeed / attempt_fail then set the attempt's whole usage over it."""

    def add(usage: Usage) -> None:
        try:
            # Checked as the final usage is (whole tokens, a finite cost, rounded as recorded):
            # a NaN cost passes the column's check and would spread to the task's and workflow's
            # totals if the attempt were closed before its final record replaced it.
            usage = usage_checked(usage)
        except PermanentError as exc:
            logger.warning("attempt %s: a payment it reported was not metered: %s", attempt_id, exc)
            return
        # The soft limit waits for the write (orchestration.soft_limit.held_off): interrupting
        # it left the statement in flight, the attempt unrecordable, and what was paid unsure.
        with held_off():
            _meter_write(attempt_id, usage)

    return add


def _meter_write(attempt_id: int, usage: Usage) -> None:
    """Add `usage` to the running attempt's row, or as late usage to one closed meanwhile."""
    try:
        running = TaskAttempt.objects.filter(pk=attempt_id, status=TaskAttempt.Status.RUNNING)
        if not running.update(**_usage_added(usage)):
            added = atomic_with_retry(lambda: _late_usage_add(attempt_id, usage))
            if added is not None:
                late_usage_recorded(attempt_id=attempt_id, agent_id=added[0], usage=added[1])
    except DatabaseError as exc:  # never fail the agent's work for the meter: the final record follows
        # A cancel's SIGTERM that landed in the late-usage COMMIT stops the agent, as anywhere
        # else in its run, instead of letting it run on unmetered.
        stop_if_interrupted(exc)
        logger.warning("attempt %s: could not meter its usage", attempt_id, exc_info=True)


def _at_least_metered(attempt: TaskAttempt, usage: Usage, *, until: float) -> Usage:
    """The usage a failed try is recorded with: what it reported, or what its meter had added
    to its row while it ran where that is more (an agent that paid, `context.paid`, and then
    failed without attaching the usage to its error). The final record replaces the meter, so
    without this the try's paid spend would be erased from the attempt and never reach its
    task and workflow. Read through a lost connection as the record is written (until `until`):
    a read that failed on it left the meter out of a record then written on a new connection."""

    def read() -> tuple[int, int, Decimal] | None:
        return (
            TaskAttempt.objects.filter(pk=attempt.pk, status=TaskAttempt.Status.RUNNING)
            .values_list("input_tokens", "output_tokens", "cost_usd")
            .first()
        )

    try:
        metered, _ = _through_lost_connection(read, attempt=attempt, until=until)
    except DatabaseError as exc:  # the record that follows meets the same database, and says so
        stop_if_interrupted(exc)
        return usage
    if metered is None:
        return usage  # closed meanwhile: _refused_outcome_record adds only what exceeds its row
    return Usage(
        input_tokens=max(usage.input_tokens, metered[0]),
        output_tokens=max(usage.output_tokens, metered[1]),
        cost_usd=max(usage.cost_usd, metered[2]),
    )


def _usage_added(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": F("input_tokens") + usage.input_tokens,
        "output_tokens": F("output_tokens") + usage.output_tokens,
        "tokens_used": F("tokens_used") + usage.tokens,
        "cost_usd": F("cost_usd") + usage.cost_usd,
    }


# Closed without a result: their usage is what was metered, never set again by a final record.
_ABANDONED = (TaskAttempt.Status.CANCELLED, TaskAttempt.Status.LOST, TaskAttempt.Status.TIMED_OUT)


def _late_usage_add(attempt_id: int, usage: Usage, *, whole: bool = False) -> tuple[str, Usage] | None:
    """Usage paid after its attempt was closed without a result: a model's answer that arrived
    after the user cancelled (before the worker's process was stopped), or while the reaper
    closed the attempt as lost or timed out. The provider charged it, so it is added to the
    attempt, its task and its workflow, as the close added what was metered before. An attempt
    closed with a result (succeeded, failed) already carries its whole usage. Returns the
    agent's id and the usage added, when some was added to a closed attempt (the metrics
    count it then). A payment its meter reported is recorded as a task_paid_late event, in the
    caller's transaction: without it the rows held spend no event explained.

    `whole`: `usage` is the whole usage the try reported as it ended (it replaces what was
    metered, DESIGN §4): only what exceeds the attempt's row is added (the caller's
    task_ended_late records it)."""
    execution_id = TaskAttempt.objects.filter(pk=attempt_id).values_list("execution_id", flat=True).first()
    if execution_id is None or not (usage.tokens or usage.cost_usd):
        return None
    # The task row first, then the attempt: the order every transition takes them in.
    task = TaskExecution.objects.select_for_update().get(pk=execution_id)
    status, cause, number, *recorded = (
        TaskAttempt.objects.select_for_update()
        .filter(pk=attempt_id)
        .values_list("status", "cause", "attempt_number", "input_tokens", "output_tokens", "cost_usd")
        .get()
    )
    if status == TaskAttempt.Status.RUNNING:  # the first UPDATE raced a retry of its own transaction
        if not whole:
            TaskAttempt.objects.filter(pk=attempt_id).update(**_usage_added(usage))
        return None
    if status not in _ABANDONED:
        return None
    if whole:
        usage = Usage(
            input_tokens=max(usage.input_tokens - recorded[0], 0),
            output_tokens=max(usage.output_tokens - recorded[1], 0),
            cost_usd=max(usage.cost_usd - recorded[2], Decimal(0)),
        )
        if not (usage.tokens or usage.cost_usd):
            return None
    TaskAttempt.objects.filter(pk=attempt_id).update(**_usage_added(usage))
    conversation_attempt_usage_sync(attempt_id)
    paid = TaskAttempt(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        tokens_used=usage.tokens,
        cost_usd=usage.cost_usd,
    )
    tokens, cost = abandoned_usage_add(task, [paid])
    if task.workflow_id:  # a lost or timed-out try's late bill is wasted like the rest of it
        workflow_add_usage(task.workflow_id, tokens=tokens, cost=cost, wasted=status != TaskAttempt.Status.CANCELLED)
    if not whole:  # the whole usage's excess is in the try's task_ended_late (_late_end_event)
        payload = {"attempt": number, "closed_as": status, "cause": cause, "late_usage": _usage_payload(usage)}
        task_event(task, EventType.TASK_PAID_LATE, payload=payload, severity=Severity.WARNING)
    logger.info("attempt %s: %s tokens, $%s paid after it was closed %s", attempt_id, tokens, cost, status)
    return task.agent_id, usage


def _turn_writer(
    context: TaskContext, attempt: TaskAttempt, *, output: dict[str, Any] | None, error: str | None, usage: Usage
) -> Callable[[], object] | None:
    """In a conversation: what stores the attempt's messages, in the transaction that records
    the attempt (so a reply exists exactly when its attempt is recorded)."""
    if context.conversation is None or context.conversation.missing:
        return None
    return lambda: conversation_turn_record(
        context=context, attempt_id=attempt.pk, output=output, error=error, usage=usage
    )
