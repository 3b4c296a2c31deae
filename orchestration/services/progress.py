"""Workflow-level consequences of task transitions: counters and totals, dispatching
dependents, failing or finishing the workflow, cancelling what can no longer run.

Every function here runs inside the caller's transaction and locks the workflow row, which
serialises the transitions of one workflow: when two parents finish at once on two
workers, the second sees the first's completion, and each dependent is queued exactly once.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Case, F, Func, IntegerField, Max, Sum, When, Window
from django.db.models.functions import Coalesce

from observability.attempts import attempts_reaped
from observability.metrics import tasks_cancelled_observe
from orchestration.db import database_now
from orchestration.event_types import EntityType, EventType, Severity
from orchestration.models import Agent, Event, TaskAttempt, TaskExecution, Workflow
from orchestration.services import fastpath
from orchestration.services.conversations import conversation_attempt_closed
from orchestration.services.dispatch import revoke_after_commit, tasks_queue
from orchestration.services.events import (
    TASK_STATE_FIELDS,
    WORKFLOW_STATE_FIELDS,
    Actor,
    entity_states,
    task_event_build,
    workflow_event,
)

TERMINAL = TaskExecution.TERMINAL_STATUSES
FAILED_TASK = (TaskExecution.Status.FAILED, TaskExecution.Status.TIMED_OUT)


def workflow_add_usage(
    workflow_id: str, *, tokens: int, cost: Decimal, error: bool = False, wasted: bool | None = None
) -> None:
    """Add an attempt's usage (failed tries included) to the workflow totals. `error`: a failed
    try (counted in error_count); its cost is also wasted spend, as is (`wasted`) what a lost
    or timed-out try was charged after it was closed."""
    if not tokens and not cost and not error:
        return
    wasted = error if wasted is None else wasted
    Workflow.objects.filter(workflow_id=workflow_id).update(
        total_tokens_used=F("total_tokens_used") + tokens,
        total_cost_usd=F("total_cost_usd") + cost,
        error_count=F("error_count") + (1 if error else 0),
        **({"wasted_cost_usd": F("wasted_cost_usd") + cost} if wasted and cost else {}),
    )


def abandoned_usage_add(task: TaskExecution, attempts: list[TaskAttempt]) -> tuple[int, Decimal]:
    """Add what closed-without-a-result attempts (cancelled, lost, hard-timed-out) had
    metered to their task's totals (the caller holds the task row); returns (tokens, cost)
    for the workflow's totals."""
    tokens = sum(a.tokens_used for a in attempts)
    cost = sum((a.cost_usd for a in attempts), Decimal(0))
    if tokens or cost:
        TaskExecution.objects.filter(pk=task.pk).update(
            input_tokens=F("input_tokens") + sum(a.input_tokens for a in attempts),
            output_tokens=F("output_tokens") + sum(a.output_tokens for a in attempts),
            tokens_used=F("tokens_used") + tokens,
            cost_usd=F("cost_usd") + cost,
        )
    return tokens, cost


def workflow_on_task_completed(
    task: TaskExecution, *, now: dt.datetime, tokens: int = 0, cost: Decimal = Decimal(0)
) -> None:
    """Count the completion and its usage, store the step result, then advance the workflow."""
    Workflow.objects.filter(workflow_id=task.workflow_id).update(
        completed_steps=F("completed_steps") + 1,
        current_step=task.task_name,
        total_tokens_used=F("total_tokens_used") + tokens,
        total_cost_usd=F("total_cost_usd") + cost,
    )
    status, deadline = Workflow.objects.filter(workflow_id=task.workflow_id).values_list("status", "deadline").get()
    workflow_advance(
        workflow_id=task.workflow_id, completed_task=task.task_name, status=status, now=now, deadline=deadline
    )


def deadline_passed(deadline: dt.datetime | None, now: dt.datetime) -> bool:
    return deadline is not None and now > deadline


def workflow_fail_past_deadline(workflow: Workflow, *, now: dt.datetime) -> None:
    """Fail a running workflow past its deadline (caller holds the lock): what is unfinished is
    cancelled, running attempts recorded cancelled for the deadline. Whichever sees the deadline
    passed first does it: a claim, a completion, a task failing for good (past the deadline
    no retry is queued), a workflow finishing, or the reaper's pass."""
    workflow_fail(
        workflow,
        error=f"deadline {workflow.deadline.isoformat()} passed",
        now=now,
        event_type=EventType.WORKFLOW_FAILED,
        cause=TaskAttempt.Cause.DEADLINE,
    )


def workflow_advance(
    *, workflow_id: str, completed_task: str, status: str, now: dt.datetime, deadline: dt.datetime | None
) -> None:
    """After a completion (the caller's transaction holds the workflow row, locked by its
    UPDATE): queue the dependents that became ready, or finish the workflow; past the
    workflow's deadline, fail it instead (what the completed task did stays recorded). Cost does
    not grow with the size of the workflow: only pending tasks that name this one are read, and
    (on PostgreSQL) their other parents checked in the same statement, by index."""
    if status != Workflow.Status.RUNNING:
        return
    if deadline_passed(deadline, now):
        workflow_fail_past_deadline(Workflow.objects.select_for_update().get(workflow_id=workflow_id), now=now)
        return
    # Pending tasks only change under the workflow lock, which the caller holds.
    pending = TaskExecution.objects.filter(workflow_id=workflow_id, status=TaskExecution.Status.PENDING)
    unfinished_statuses = [s for s in TaskExecution.Status.values if s not in TERMINAL]
    if fastpath.enabled():  # ENGINE_FAST_PATH=false keeps every statement on the ORM
        ready_ids, any_unfinished = _dependents_ready_and_unfinished(workflow_id, completed_task, unfinished_statuses)
        if not ready_ids and any_unfinished:
            return  # the common case, in one query
        ready = list(pending.filter(execution_id__in=ready_ids).order_by("execution_id"))
    else:
        ready = []
        for candidate in pending.order_by("execution_id"):
            if completed_task not in candidate.depends_on:
                continue
            others = [name for name in candidate.depends_on if name != completed_task]
            unfinished = (
                TaskExecution.objects.filter(workflow_id=workflow_id, task_name__in=others)
                .exclude(status=TaskExecution.Status.COMPLETED)
                .exists()
                if others
                else False
            )
            if not unfinished:
                ready.append(candidate)
    if ready:
        tasks_queue(ready, now=now)
        return
    if TaskExecution.objects.filter(workflow_id=workflow_id, status__in=unfinished_statuses).exists():
        return
    workflow_maybe_finish(Workflow.objects.select_for_update().get(workflow_id=workflow_id), now=now)


# The pending tasks that name the completed task and have no parent left unfinished (checked in
# the database, each parent by the (workflow, task_name) index: loading a fan-in's names into
# Python and sending the others back cost 16 ms a completion at 500 parents, 21 ms at 2 000),
# and whether any task of the workflow is unfinished. One row, with a NULL id, when none is ready.
DEPENDENTS_READY_SQL = """
SELECT t.execution_id, EXISTS (SELECT 1 FROM task_executions u WHERE u.workflow_id = %(workflow_id)s
                                 AND u.status = ANY(%(unfinished)s::text[]))
  FROM (SELECT 1) AS one
  LEFT JOIN task_executions t
    ON t.workflow_id = %(workflow_id)s AND t.status = 'pending' AND t.depends_on @> %(named)s::jsonb
   AND NOT EXISTS (
       SELECT 1 FROM jsonb_array_elements_text(t.depends_on) AS parent(name)
         JOIN task_executions p ON p.workflow_id = t.workflow_id AND p.task_name = parent.name
        WHERE p.status <> 'completed')
"""
DEPENDENTS_READY_SQL = " ".join(DEPENDENTS_READY_SQL.split())


def _dependents_ready_and_unfinished(workflow_id: str, task_name: str, unfinished: list[str]) -> tuple[list[str], bool]:
    """PostgreSQL: ids of pending tasks that name task_name and whose parents have all
    completed, and whether any task of the workflow is unfinished, in one round trip
    (DEPENDENTS_READY_SQL; the caller holds the workflow lock, so what it reads stays true)."""
    from orchestration.services.fastpath import execute_prepared

    rows = execute_prepared(
        DEPENDENTS_READY_SQL,
        {"workflow_id": workflow_id, "unfinished": unfinished, "named": json.dumps([task_name])},
    )
    return [row[0] for row in rows if row[0] is not None], bool(rows[0][1])


def task_failure_text(task: TaskExecution) -> str:
    """The workflow's `error` for a task of it that failed (or timed out) for good."""
    return f"task {task.task_name} {task.status}: {task.error or ''}".strip()


def workflow_on_task_failed(task: TaskExecution, *, now: dt.datetime) -> None:
    """A task failed for good. Without continue_on_failure the workflow fails (DESIGN §5):
    what has not started is cancelled at once; tasks already running finish, are recorded and
    are not retried (workflow_stopping), and the workflow ends `failed`, with the first
    failure as its error, when the last of them ends (as a workflow that continues on failure
    does: its end event then carries its final state). With continue_on_failure, only what
    depended on the task is cancelled. Past the workflow's deadline, it fails for that at once,
    cutting what still runs, as after a completion (workflow_advance)."""
    workflow = Workflow.objects.select_for_update().get(workflow_id=task.workflow_id)
    if workflow.status != Workflow.Status.RUNNING or deadline_passed(workflow.deadline, now):
        Workflow.objects.filter(workflow_id=task.workflow_id).update(
            failed_steps=F("failed_steps") + 1, current_step=task.task_name
        )
        if workflow.status == Workflow.Status.RUNNING:
            workflow_fail_past_deadline(workflow, now=now)
        return
    stopping = workflow_stopping(workflow)
    changes: dict[str, Any] = {"failed_steps": F("failed_steps") + 1, "current_step": task.task_name}
    if not stopping:  # the first failure of one that stops at it names the failure for good
        changes["error"] = task_failure_text(task)
    Workflow.objects.filter(workflow_id=task.workflow_id).update(**changes)
    workflow.refresh_from_db(fields=["error", "failed_steps"])
    if workflow.continue_on_failure:
        workflow_skip_dependents(workflow, task, now=now)
        return
    unfinished = TaskExecution.objects.filter(workflow_id=workflow.workflow_id).exclude(status__in=TERMINAL)
    if unfinished.filter(status=TaskExecution.Status.RUNNING).exists():
        tasks_cancel(unfinished.exclude(status=TaskExecution.Status.RUNNING), reason=workflow.error or "", now=now)
        return
    workflow_fail(workflow, error=workflow.error or "", now=now, event_type=EventType.WORKFLOW_FAILED)


def workflow_stopping(workflow: Workflow) -> bool:
    """A running workflow that stops at its first failure and has had one: it runs nothing
    new, and ends once its running tasks have (workflow_on_task_failed)."""
    return not workflow.continue_on_failure and workflow.failed_steps > 0


def workflow_skip_dependents(workflow: Workflow, task: TaskExecution, *, now: dt.datetime) -> None:
    """In a workflow that continues on failure, after `task` ended without completing
    (failed, timed out, cancelled): cancel every task that depends on it, directly or not
    (they can never run), and finish the workflow if nothing is left to run (caller holds
    the workflow lock)."""
    siblings = list(TaskExecution.objects.filter(workflow_id=workflow.workflow_id).only("task_name", "depends_on"))
    blocked = task_descendants(task.task_name, siblings)
    if blocked:
        tasks_cancel(
            TaskExecution.objects.filter(workflow_id=workflow.workflow_id, task_name__in=blocked),
            reason=f"upstream task {task.task_name} {task.status}",
            now=now,
            upstream=task.task_name,
        )
    workflow_maybe_finish(workflow, now=now)


def tasks_cancelled_for_upstream(tasks: list[TaskExecution]) -> list[TaskExecution]:
    """Those of the cancelled `tasks` whose latest cancellation was for an upstream task that
    did not complete (its task_cancelled event names it under `upstream`), not a cancel of
    their own (a user's, whatever its reason says)."""
    ids = [task.execution_id for task in tasks]
    latest: dict[str, dict[str, Any]] = {}
    for entity_id, payload in (
        Event.objects.filter(entity_type=EntityType.TASK, entity_id__in=ids, event_type=EventType.TASK_CANCELLED)
        .order_by("entity_id", "-sequence")
        .values_list("entity_id", "payload")
    ):
        latest.setdefault(entity_id, payload or {})
    return [task for task in tasks if latest.get(task.execution_id, {}).get("upstream")]


def task_descendants(name: str, tasks: list[TaskExecution]) -> set[str]:
    """The names of the tasks (of `tasks`, one workflow's) that depend on `name`, directly or not."""
    children: dict[str, list[str]] = {}
    for t in tasks:
        for dep in t.depends_on:
            children.setdefault(dep, []).append(t.task_name)
    found: set[str] = set()
    stack = [name]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def workflow_maybe_finish(workflow: Workflow, *, now: dt.datetime) -> None:
    """Finish a running workflow whose tasks have all reached a terminal status (caller holds
    the workflow lock)."""
    if workflow.status != Workflow.Status.RUNNING:
        return
    unfinished = [s for s in TaskExecution.Status.values if s not in TERMINAL]
    if TaskExecution.objects.filter(workflow_id=workflow.workflow_id, status__in=unfinished).exists():
        return
    tasks = TaskExecution.objects.filter(workflow_id=workflow.workflow_id)
    # Failed when a task failed, or for its deadline when it ends past it; cancelled when a task
    # was cancelled (a user's cancel in a workflow that continues on failure: it can be
    # resumed); else completed.
    if tasks.filter(status__in=FAILED_TASK).exists():
        workflow.status, event_type, severity = Workflow.Status.FAILED, EventType.WORKFLOW_FAILED, Severity.ERROR
    elif deadline_passed(workflow.deadline, now):
        # Its last task ended after the deadline: it did not complete in time, whether the
        # reaper's pass came first or not.
        workflow_fail_past_deadline(workflow, now=now)
        return
    elif tasks.filter(status=TaskExecution.Status.CANCELLED).exists():
        workflow.status, event_type, severity = (
            Workflow.Status.CANCELLED,
            EventType.WORKFLOW_CANCELLED,
            Severity.WARNING,
        )
    else:
        workflow.status, event_type, severity = Workflow.Status.COMPLETED, EventType.WORKFLOW_COMPLETED, Severity.INFO
    workflow.completed_at = _ended_at(workflow, now)
    _record_results(workflow)
    workflow.save(update_fields=["status", "completed_at", "step_results", "checkpoints", "updated_at"])
    workflow.refresh_from_db(fields=["duration_ms", "completed_steps", "failed_steps", "cancelled_steps", "error"])
    payload = {
        "completed_steps": workflow.completed_steps,
        "failed_steps": workflow.failed_steps,
        "duration_ms": workflow.duration_ms,
    }
    if workflow.status == Workflow.Status.FAILED:  # as workflow_fail's event names it
        payload["error"] = workflow.error or ""
    if workflow.status == Workflow.Status.CANCELLED:
        payload["cancelled_steps"] = workflow.cancelled_steps
    if workflow.status != Workflow.Status.COMPLETED:  # it can be resumed: record how it ended
        payload["state"] = entity_states(Workflow, [workflow.pk], WORKFLOW_STATE_FIELDS)[workflow.pk]
    workflow_event(workflow, event_type, payload=payload, severity=severity)


def _ended_at(workflow: Workflow, now: dt.datetime) -> dt.datetime:
    """When a workflow ends: `now`, on the clock of the process ending it (a worker, the
    reaper, the web for a cancel), but never before its start, which the submitting host's
    clock stamped (a clock running behind that one would record it ending before it started,
    with a negative duration: workflows.duration_ms is completed_at - started_at), nor before
    the end of any of its tasks, which other hosts' clocks stamped, or a cancel's own, read
    before the locks it then waited for (tasks_cancel). Read under the workflow lock, after
    the tasks' ends are written."""
    latest = TaskExecution.objects.filter(workflow_id=workflow.workflow_id).aggregate(latest=Max("completed_at"))[
        "latest"
    ]
    return max(t for t in (now, workflow.started_at, latest) if t is not None)


class _JSONBytes(Func):
    """The size in bytes of a JSON column's text (what the API serves of it)."""

    template = "octet_length((%(expressions)s)::text)"
    output_field = IntegerField()

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        return super().as_sql(compiler, connection, template="length(CAST(%(expressions)s AS BLOB))", **extra)


def output_reference(*, task_name: str, execution_id: str, size: int) -> dict[str, Any]:
    """What step_results holds for an output not copied there: where to read it, and its size."""
    return {"output_omitted": {"task_name": task_name, "execution_id": execution_id, "bytes": size}}


def _record_results(workflow: Workflow) -> None:
    """step_results (output by task name) and checkpoints (completed tasks in completion
    order) from the task rows, once, when the workflow ends. Writing them on every
    completion would rewrite an ever-growing JSON value under the workflow lock.

    The outputs are copied up to WORKFLOW_STEP_RESULTS_MAX_BYTES of JSON in all, in completion
    order; one that does not fit in what is left is an output_reference (a later, smaller one
    may still fit). Copied whole, three outputs of 100 MB made a value PostgreSQL refuses (a
    jsonb over 256 MiB), and the workflow could never end. The sizes are read by the database:
    an output that is not copied never leaves it, and when all fit (almost always) one query
    reads them all, as before."""
    budget = settings.WORKFLOW_STEP_RESULTS_MAX_BYTES
    json_bytes = Coalesce(_JSONBytes("output_data"), 0)
    rows = list(
        TaskExecution.objects.filter(workflow_id=workflow.workflow_id, status=TaskExecution.Status.COMPLETED)
        .order_by("completed_at", "execution_id")
        .annotate(size=json_bytes, total=Window(Sum(json_bytes)))
        .annotate(copied=Case(When(total__lte=budget, then="output_data")))
        .values_list("execution_id", "task_name", "completed_at", "size", "total", "copied")
    )
    outputs = {pk: copied for pk, _, _, _, _, copied in rows}
    if rows and rows[0][4] > budget:
        kept, left = [], budget
        for pk, _, _, size, _, _ in rows:
            if size <= left:
                kept.append(pk)
                left -= size
        outputs = dict(TaskExecution.objects.filter(pk__in=kept).values_list("execution_id", "output_data"))
    workflow.step_results = {
        name: outputs[pk] if pk in outputs else output_reference(task_name=name, execution_id=pk, size=size)
        for pk, name, _, size, _, _ in rows
    }
    workflow.checkpoints = [{"task": name, "at": at.isoformat()} for _, name, at, _, _, _ in rows]


def workflow_fail(
    workflow: Workflow,
    *,
    error: str,
    now: dt.datetime,
    event_type: EventType,
    cause: str = TaskAttempt.Cause.CANCELLED,
    actor: Actor | None = None,
) -> None:
    """End a running workflow as failed (or cancelled) and cancel every task that has not
    finished, revoking their messages and running processes (caller holds the lock). `cause`:
    what the attempts still running are recorded cancelled for (the deadline, or a cancel).
    `actor`: who ended it (a cancel), named in its events.

    A cancel of a workflow that has failed already (a task of it failed for good: one that
    stops at its first failure was waiting for its running tasks to end, workflow_stopping; one
    that continues on failure was running its other branches) cancels those tasks, and the
    workflow ends `failed` with that failure as its error, as it would have ended anyway: the
    cancel is in its workflow_failed event (`cancelled`, and who asked), not over the failure.
    So does its deadline passing meanwhile (`deadline` in the event): the failure came first."""
    cancelled = event_type == EventType.WORKFLOW_CANCELLED
    reason, extra = error, {}
    failed_already = workflow.failed_steps > 0 and workflow.error
    if cancelled and failed_already:
        cancelled, event_type, error, extra = False, EventType.WORKFLOW_FAILED, workflow.error, {"cancelled": reason}
    elif cause == TaskAttempt.Cause.DEADLINE and failed_already:
        error, extra = workflow.error, {"deadline": reason}
    # Its tasks end first: the workflow's end is read after theirs (_ended_at).
    count = tasks_cancel(
        TaskExecution.objects.filter(workflow_id=workflow.workflow_id).exclude(status__in=TERMINAL),
        reason=reason,
        now=now,
        cause=cause,
        actor=actor,
    )
    workflow.status = Workflow.Status.CANCELLED if cancelled else Workflow.Status.FAILED
    workflow.error = error
    workflow.completed_at = _ended_at(workflow, now)
    _record_results(workflow)
    workflow.save(update_fields=["status", "error", "completed_at", "step_results", "checkpoints", "updated_at"])
    workflow_event(
        workflow,
        event_type,
        payload={
            "error": error,
            **extra,
            "cancelled_tasks": count,
            **(actor or {}),
            "state": entity_states(Workflow, [workflow.pk], WORKFLOW_STATE_FIELDS)[workflow.pk],
        },
        severity=Severity.WARNING if cancelled else Severity.ERROR,
    )


def tasks_cancel(
    queryset: Any,
    *,
    reason: str,
    now: dt.datetime,
    upstream: str | None = None,
    cause: str = TaskAttempt.Cause.CANCELLED,
    actor: Actor | None = None,
) -> int:
    """Cancel the non-terminal tasks of a queryset: their running attempts are recorded
    cancelled (for `cause`), queued messages and running processes are revoked after commit.
    `upstream`: the task (name) they were cancelled for, which did not complete; their
    task_cancelled events record it."""
    tasks = list(queryset.exclude(status__in=TERMINAL).select_for_update().order_by("execution_id"))
    if not tasks:
        return 0
    ids = [t.execution_id for t in tasks]
    # The agents' slots the running ones held, freed by this cancel (their processes are
    # terminated, so never get to hand them on themselves), and those a task woken for a freed
    # slot was on its way to take (agent_slot_hand_on: its deferral for its agent's limit over,
    # deferred_at its wake; its message, coming to a cancelled task, takes none).
    slots_freed = Counter(
        t.agent_id
        for t in tasks
        if t.status == TaskExecution.Status.RUNNING
        or (
            t.status in (TaskExecution.Status.QUEUED, TaskExecution.Status.RETRYING)
            and t.deferred_at is not None
            and t.queued_at is not None
            and t.queued_at <= t.deferred_at <= now
        )
    )
    running = list(
        TaskAttempt.objects.select_for_update().filter(execution_id__in=ids, status=TaskAttempt.Status.RUNNING)
    )
    # `now` was read before the locks above were granted: an attempt claimed meanwhile (its
    # claim held the row we waited for), or stamped by a worker whose clock runs ahead, started
    # after it. Nothing ends before it started, nor a task before its latest attempt ended.
    for attempt in running:
        attempt.status = TaskAttempt.Status.CANCELLED
        attempt.cause = cause
        attempt.error = reason
        attempt.finished_at = max(now, attempt.started_at)
        attempt.duration_ms = (attempt.finished_at - attempt.started_at).total_seconds() * 1000
    attempts_ended = {
        execution_id: max(t for t in times if t is not None)
        for execution_id, *times in TaskAttempt.objects.filter(execution_id__in=ids)
        .values("execution_id")
        .annotate(started=Max("started_at"), finished=Max("finished_at"))
        .values_list("execution_id", "started", "finished")
    }
    fastpath.update_rows(running, ["status", "cause", "error", "finished_at", "duration_ms"])
    running_of: dict[str, list[TaskAttempt]] = {}
    for attempt in running:
        running_of.setdefault(attempt.execution_id, []).append(attempt)
    # What the cancelled attempts had paid for (metered while they ran) stays on record.
    spent: dict[str, tuple[int, Decimal]] = {}
    for task in tasks:
        if own := running_of.get(task.execution_id):
            spent[task.execution_id] = abandoned_usage_add(task, own)
    for task in tasks:
        tokens, cost = spent.get(task.execution_id, (0, Decimal(0)))
        if task.workflow_id and (tokens or cost):
            workflow_add_usage(task.workflow_id, tokens=tokens, cost=cost)
    revoke = [t.celery_task_id for t in tasks if t.celery_task_id]
    per_workflow: dict[str, int] = {}
    for task in tasks:
        if task.workflow_id:
            per_workflow[task.workflow_id] = per_workflow.get(task.workflow_id, 0) + 1
    for workflow_id, count in per_workflow.items():
        Workflow.objects.filter(pk=workflow_id).update(cancelled_steps=F("cancelled_steps") + count)
    for task in tasks:
        task.status = TaskExecution.Status.CANCELLED
        task.error = reason
        task.completed_at = max(
            t for t in (now, task.started_at, attempts_ended.get(task.execution_id)) if t is not None
        )
        # A conversation reply: the thread says it was cancelled (its running attempt's turn).
        own = running_of.get(task.execution_id)
        conversation_attempt_closed(task, attempt=own[0] if own else None, error=reason)
    fastpath.update_rows(tasks, ["status", "error", "completed_at"])
    states = entity_states(TaskExecution, ids, TASK_STATE_FIELDS)
    fastpath.insert_rows(
        [
            task_event_build(
                t,
                EventType.TASK_CANCELLED,
                payload={
                    "reason": reason,
                    **({"upstream": upstream} if upstream else {}),
                    **(actor or {}),
                    "state": states[t.execution_id],
                },
            )
            for t in tasks
        ]
    )
    revoke_after_commit(revoke, terminate=True)
    if slots_freed:
        transaction.on_commit(lambda: agents_lines_wake(slots_freed), robust=True)
    agent_ids = [t.agent_id for t in tasks]
    transaction.on_commit(lambda: tasks_cancelled_observe(agent_ids=agent_ids))
    # The running attempts are reported here, with what they had spent: their processes are
    # terminated (above), so they never get back to attempt_run to report themselves.
    transaction.on_commit(lambda: attempts_reaped(attempts=running))
    return len(tasks)


def agents_lines_wake(slots_freed: Counter[str]) -> None:
    """After a cancel ended running tasks (committed): hand the freed slots of each
    concurrency-limited agent to the first tasks in its line (execution.agent_slot_hand_on), as an
    attempt that ends does. Left to the deferred messages, the slot stayed idle until the next one
    came back: up to AGENT_SLOT_RECHECK_MAX_SECONDS for a task deferred behind a long line (a
    workflow cancelled with its agent's only slot left the next task waiting 19.5 s). One
    hand-on per agent, as far as its limit has slots free: one per task cancelled woke a task
    each, in a transaction each, however few the limit had (lowered below the tasks running, the
    others were only deferred again)."""
    from orchestration.services.execution import agent_slot_hand_on

    for agent in Agent.objects.filter(pk__in=list(slots_freed), max_concurrency__isnull=False):
        agent_slot_hand_on(agent, now=database_now(), slots=slots_freed[agent.pk])
