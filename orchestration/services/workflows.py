"""Workflow operations: submit, cancel, retry a failed task, resume a failed workflow."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from django.db import DataError, IntegrityError, connections, transaction
from django.db.models import F
from django.db.models.functions import Now

from orchestration.db import atomic_retried, database_now
from orchestration.errors import IdempotencyKeyReused, SpecError, TransitionError
from orchestration.event_types import EventType
from orchestration.models import TaskExecution, Workflow
from orchestration.services import fastpath
from orchestration.services.conversations import conversation_retry_check
from orchestration.services.dispatch import dispatch_after_commit, dispatch_prepare, tasks_queue
from orchestration.services.events import Actor, task_event_build, workflow_event, workflow_event_build
from orchestration.services.progress import (
    FAILED_TASK,
    task_descendants,
    task_failure_text,
    tasks_cancel,
    tasks_cancelled_for_upstream,
    workflow_fail,
    workflow_skip_dependents,
    workflow_stopping,
)
from orchestration.services.specs import WorkflowSpec, spec_validate

# The parsers read a document as deeply nested as the recursion limit lets them where they
# run; the encoders that compare and store it recurse once per level too, deeper in the
# caller's stack (a request's), and may not reach its bottom: a body nested 900 levels deep was
# read by the API and then a RecursionError, a 500.
SPEC_TOO_DEEP = "spec is nested too deeply to store (nest its values less deeply)"


def workflow_submit(
    *, spec: dict[str, Any] | WorkflowSpec, owner: Any = None, initiator: str = ""
) -> tuple[Workflow, bool]:
    """Validate and store a workflow with its tasks and first events, and queue its root
    tasks after commit. Returns (workflow, created); the same idempotency key from the same
    owner with the same spec returns the workflow stored first, with created False (whether or
    not that spec would validate now), and with another spec raises IdempotencyKeyReused (that
    spec would not run). A spec nested too deeply to encode is a SpecError, nothing stored (its
    transaction rolled back)."""
    try:
        return _workflow_submit(spec=spec, owner=owner, initiator=initiator)
    except RecursionError:
        raise SpecError([SPEC_TOO_DEEP]) from None


def _workflow_submit(*, spec: dict[str, Any] | WorkflowSpec, owner: Any, initiator: str) -> tuple[Workflow, bool]:
    if isinstance(spec, WorkflowSpec):
        validated = spec
    else:
        try:
            validated = spec_validate(spec)
        except SpecError:
            # The workflow stored under the spec's key was valid when it was stored: the same
            # spec sent again (a job retried later) returns it, as the API does, rather than
            # being refused for what changed since (its deadline passed, an agent taken out
            # of service).
            existing = _replay_as_sent(spec, owner=owner)
            if existing is not None:
                return existing, False
            raise
    if validated.idempotency_key:
        existing = _idempotent_replay(validated, owner=owner)
        if existing is not None:
            return existing, False
    try:
        with transaction.atomic():
            return _workflow_store(validated, owner=owner, initiator=initiator), True
    except IntegrityError:
        # A concurrent submission with the same idempotency key won the race.
        if validated.idempotency_key:
            existing = _idempotent_replay(validated, owner=owner)
            if existing is not None:
                return existing, False
        raise


def _idempotent_replay(spec: WorkflowSpec, *, owner: Any) -> Workflow | None:
    """The workflow the owner already stored under the spec's idempotency key, if any; raises
    IdempotencyKeyReused if it was stored for another spec."""
    existing = Workflow.objects.filter(owner=owner, idempotency_key=spec.idempotency_key).first()
    if existing is not None and not workflow_spec_is(existing, spec.raw):
        raise IdempotencyKeyReused(spec.idempotency_key or "", existing.workflow_id)
    return existing


def _replay_as_sent(spec: dict[str, Any], *, owner: Any) -> Workflow | None:
    """The workflow the owner stored under the key of `spec`, a spec that did not validate, if
    it was stored for this very spec; else None (its problems are then named)."""
    key = spec.get("idempotency_key") if isinstance(spec, dict) else None
    if not isinstance(key, str) or not key:
        return None
    try:
        with transaction.atomic():
            existing = Workflow.objects.filter(owner=owner, idempotency_key=key).first()
            return existing if existing is not None and workflow_spec_is(existing, spec) else None
    except (DataError, ValueError):
        # Text PostgreSQL cannot be sent (a NUL character, an unpaired surrogate), in the key
        # or the spec: no workflow was ever stored for it.
        return None


def spec_canonical(spec: Any) -> str:
    return json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)


def workflow_spec_is(workflow: Workflow, spec: dict[str, Any]) -> bool:
    """Whether `workflow` was submitted with this spec (as submitted, a JSON document). A spec
    nested too deeply to encode (see SPEC_TOO_DEEP) is a SpecError: the API compares a body
    with the spec stored under its Idempotency-Key before it validates it."""
    try:
        body = json.loads(spec_canonical(spec))
        if connections[Workflow.objects.db].vendor == "postgresql":
            # Compared by jsonb's equality: the stored spec went through jsonb, which rewrites
            # numbers (1e16 comes back as 10000000000000000, -0.0 as 0.0), so comparing texts
            # would refuse a retry of the very same body.
            return Workflow.objects.filter(pk=workflow.pk, spec=body).exists()
        # SQLite keeps the text as written (its JSON equality is a text comparison, in whatever
        # key order the body came in): the canonical texts are compared.
        return spec_canonical(workflow.spec) == spec_canonical(body)
    except RecursionError:
        raise SpecError([SPEC_TOO_DEEP]) from None


def _workflow_store(spec: WorkflowSpec, *, owner: Any, initiator: str) -> Workflow:
    """Workflow, tasks and first events, each in one INSERT; root tasks are created queued,
    with their message ids, and sent after commit.

    The workflow starts, and its root tasks are queued, at the database's time of its INSERT,
    which returns it (created_at; started_at is the same statement's time): the queue timeout,
    the deadline and the workflow's duration are measured on that clock by whichever host
    looks, not on this host's, which may be off it."""
    workflow = Workflow.objects.create(
        name=spec.name,
        description=spec.description,
        workflow_type=spec.workflow_type,
        status=Workflow.Status.RUNNING,
        started_at=Now(),
        priority=spec.priority,
        tags=spec.tags,
        metadata=spec.metadata,
        state_data=spec.state,
        spec=spec.raw,
        continue_on_failure=spec.continue_on_failure,
        deadline=spec.deadline,
        idempotency_key=spec.idempotency_key,
        owner=owner,
        initiator=initiator or (getattr(owner, "username", "") or ""),
        total_steps=len(spec.tasks),
        assigned_agents=list(dict.fromkeys(t.agent_id for t in spec.tasks)),
    )
    now = workflow.started_at = workflow.created_at
    tasks = [
        TaskExecution(
            workflow=workflow,
            agent_id=t.agent_id,
            task_name=t.name,
            task_type=t.task_type,
            description=t.description,
            priority=t.priority,
            depends_on=t.depends_on,
            input_data=t.input,
            max_retries=t.max_retries,
            timeout_seconds=t.timeout_seconds,
        )
        for t in spec.tasks
    ]
    roots = [t for t in tasks if not t.depends_on]
    dispatches = [dispatch_prepare(task, now=now) for task in roots]
    fastpath.insert_rows(tasks)
    fastpath.insert_rows(
        [
            workflow_event_build(
                workflow,
                EventType.WORKFLOW_CREATED,
                payload={"name": workflow.name, "tasks": len(tasks), "owner": getattr(owner, "pk", None)},
            ),
            workflow_event_build(
                workflow, EventType.WORKFLOW_STARTED, payload={"root_tasks": [t.task_name for t in roots]}
            ),
            *(task_event_build(task, EventType.TASK_QUEUED) for task in roots),
        ]
    )
    dispatch_after_commit(dispatches)
    return workflow


# The states each operation starts from (the console offers its buttons by these).
CANCELLABLE_WORKFLOW = (Workflow.Status.PENDING, Workflow.Status.RUNNING)
RESUMABLE_WORKFLOW = (Workflow.Status.FAILED, Workflow.Status.CANCELLED)
RETRIABLE_TASK = (TaskExecution.Status.FAILED, TaskExecution.Status.TIMED_OUT, TaskExecution.Status.CANCELLED)


@atomic_retried
def workflow_cancel(*, workflow_id: str, reason: str = "cancelled by user", actor: Actor | None = None) -> Workflow:
    """Cancel a running (or pending) workflow: unfinished tasks are cancelled, their queued
    messages revoked and running processes terminated. `actor`: who asked (the events say)."""
    workflow = Workflow.objects.select_for_update().get(pk=workflow_id)
    if workflow.status not in CANCELLABLE_WORKFLOW:
        raise TransitionError(
            f"workflow {workflow_id} is {workflow.status}; only a pending or running workflow can be cancelled"
        )
    workflow_fail(workflow, error=reason, now=database_now(), event_type=EventType.WORKFLOW_CANCELLED, actor=actor)
    return workflow


@atomic_retried
def task_cancel(*, execution_id: str, reason: str = "cancelled by user", actor: Actor | None = None) -> TaskExecution:
    """Cancel one task. In a workflow this cancels the workflow, unless it continues on
    failure: then the task's dependents, which can never run, are cancelled with it and the
    workflow finishes once nothing is left to run (failed if a task failed, else cancelled:
    resuming it runs the cancelled tasks)."""
    task = TaskExecution.objects.select_for_update().get(pk=execution_id)
    if task.is_terminal:
        raise TransitionError(f"task {execution_id} is {task.status}; it cannot be cancelled")
    workflow = Workflow.objects.select_for_update().get(pk=task.workflow_id) if task.workflow_id else None
    now = database_now()  # after the locks, as in task_retry
    if workflow is not None:
        tasks_cancel(TaskExecution.objects.filter(pk=task.pk), reason=reason, now=now, actor=actor)
        if workflow.status == Workflow.Status.RUNNING and not workflow.continue_on_failure:
            workflow_fail(
                workflow,
                error=f"task {task.task_name} cancelled: {reason}",
                now=now,
                event_type=EventType.WORKFLOW_CANCELLED,
                actor=actor,
            )
        elif workflow.status == Workflow.Status.RUNNING:
            task.status = TaskExecution.Status.CANCELLED
            workflow_skip_dependents(workflow, task, now=now)
    else:
        tasks_cancel(TaskExecution.objects.filter(pk=task.pk), reason=reason, now=now, actor=actor)
    task.refresh_from_db()
    return task


def _tasks_reset(tasks: list[TaskExecution], *, reason: str, actor: Actor | None) -> None:
    """Make the tasks pending again with a fresh retry budget, each with its task_retrying
    event: one UPDATE and one INSERT however many there are (a resume reruns thousands). A
    deferral for its agent's limit that a task had when it ended is over: the message it is
    sent now is due at once (kept, the deferral hid that message's loss from the dispatch sweep
    and put the task in its agent's line, execution._waiting_for_agent)."""
    if not tasks:
        return
    changes = {
        "status": TaskExecution.Status.PENDING,
        "retry_count": 0,
        "error": None,
        "completed_at": None,
        "deferred_at": None,
    }
    TaskExecution.objects.filter(pk__in=[task.pk for task in tasks]).update(**changes)
    for task in tasks:
        for name, value in changes.items():
            setattr(task, name, value)
    fastpath.insert_rows(
        [task_event_build(task, EventType.TASK_RETRYING, payload={"reason": reason, **(actor or {})}) for task in tasks]
    )


@atomic_retried
def workflow_resume(*, workflow_id: str, actor: Actor | None = None) -> Workflow:
    """Resume a failed (or cancelled) workflow from its unfinished tasks: failed, timed-out
    and cancelled tasks get a fresh retry budget; completed ones keep their results."""
    workflow = Workflow.objects.select_for_update().get(pk=workflow_id)
    if workflow.status not in RESUMABLE_WORKFLOW:
        raise TransitionError(f"workflow {workflow_id} is {workflow.status}; only a failed or cancelled one resumes")
    now = database_now()
    _deadline_check(workflow, now=now)
    # A task left running when a sibling failed the workflow goes on as it is (its dependents
    # run once it completes); only the ended ones run again. Those cannot change under the
    # workflow's lock; a running one is not locked here (its completion takes its task row,
    # then the workflow's: the other order would deadlock with it).
    tasks = list(TaskExecution.objects.filter(workflow=workflow).only("execution_id", "status"))
    ended = [t.pk for t in tasks if t.status not in (TaskExecution.Status.COMPLETED, TaskExecution.Status.RUNNING)]
    redo = list(TaskExecution.objects.select_for_update().filter(pk__in=ended).order_by("execution_id"))
    if not redo:
        raise TransitionError(f"workflow {workflow_id} has no unfinished task to resume")
    _tasks_reset(redo, reason="workflow resumed", actor=actor)
    done = set(
        TaskExecution.objects.filter(workflow=workflow, status=TaskExecution.Status.COMPLETED).values_list(
            "task_name", flat=True
        )
    )
    workflow.status = Workflow.Status.RUNNING
    workflow.error = None
    workflow.completed_at = None
    workflow.failed_steps = 0
    workflow.cancelled_steps = 0
    workflow.save(update_fields=["status", "error", "completed_at", "failed_steps", "cancelled_steps"])
    workflow_event(
        workflow, EventType.WORKFLOW_RESUMED, payload={"tasks": [t.task_name for t in redo], **(actor or {})}
    )
    tasks_queue([t for t in redo if set(t.depends_on) <= done], now=now)
    return workflow


def _deadline_check(workflow: Workflow, *, now: dt.datetime) -> None:
    """A workflow past its deadline cannot run again: its first claim would fail it at once.
    `now` is the database's, the clock that claim checks the deadline on."""
    if workflow.deadline and now > workflow.deadline:
        raise TransitionError(
            f"workflow {workflow.workflow_id} is past its deadline {workflow.deadline.isoformat()}; it cannot run again"
        )


@atomic_retried
def task_retry(*, execution_id: str, actor: Actor | None = None) -> TaskExecution:
    """Retry one failed, timed-out or cancelled task; the tasks cancelled because it failed are
    made pending again, to run after it. One that also waits on another failed or cancelled
    task stays cancelled, as does one a user cancelled on its own; other failed tasks stay
    failed. A workflow that continues on failure runs again for them if it had ended (and
    ends again once nothing is left to run). One that stops at the first failure is resumed,
    which reruns every task that did not complete: its end cancelled them all."""
    task = TaskExecution.objects.select_for_update().get(pk=execution_id)
    if task.status not in RETRIABLE_TASK:
        raise TransitionError(
            f"task {execution_id} is {task.status}; only a failed, timed-out or cancelled task is retried"
        )
    if not task.workflow_id:
        conversation_retry_check(task)
    resumed: list[str] = []  # the tasks a workflow that ended runs again for
    workflow = Workflow.objects.select_for_update().get(pk=task.workflow_id) if task.workflow_id else None
    # After the locks: a workflow that ended while this waited for its row ended before `now`.
    now = database_now()
    if workflow is not None:
        ended = workflow.status != Workflow.Status.RUNNING
        if not ended and workflow_stopping(workflow):
            raise TransitionError(
                f"workflow {workflow.workflow_id} is stopping after a failure and waits for its running "
                "tasks; retry the task once it has ended (that resumes the workflow)"
            )
        if ended and not workflow.continue_on_failure:
            workflow_resume(workflow_id=workflow.workflow_id, actor=actor)
            task.refresh_from_db()
            return task
        # Running too: one past its deadline that nothing has seen yet (no claim, completion or
        # reaper's pass since) fails for it at the retry's first claim, the task recorded
        # cancelled, never run, and its failure gone from the workflow.
        _deadline_check(workflow, now=now)
        done = set(
            TaskExecution.objects.filter(workflow=workflow, status=TaskExecution.Status.COMPLETED).values_list(
                "task_name", flat=True
            )
        )
        missing = [name for name in task.depends_on if name not in done]
        if missing:
            # Refused for the state of the workflow, as every other retry refused (a 409 through
            # the API): the request itself is valid.
            raise TransitionError(
                f"task {task.task_name} depends on {', '.join(missing)}, not completed: retry "
                f"{'it' if len(missing) == 1 else 'them'} first (or resume the workflow once it has ended)"
            )
        revived = _dependents_to_revive(workflow, task)
        uncancelled = len(revived) + (task.status == TaskExecution.Status.CANCELLED)
        # What the workflow says failed: another failed task that stays so, or nothing.
        failure = (
            TaskExecution.objects.filter(workflow=workflow, status__in=FAILED_TASK)
            .exclude(pk=task.pk)
            .order_by("-completed_at", "-execution_id")
            .first()
        )
        changes: dict[str, Any] = {
            "cancelled_steps": F("cancelled_steps") - uncancelled,
            "error": task_failure_text(failure) if failure else None,
        }
        if task.status != TaskExecution.Status.CANCELLED:
            changes["failed_steps"] = F("failed_steps") - 1
        if ended:
            changes |= {"status": Workflow.Status.RUNNING, "completed_at": None}
            resumed = [task.task_name, *(t.task_name for t in revived)]
        Workflow.objects.filter(pk=workflow.pk).update(**changes)
        _tasks_reset(revived, reason=f"upstream task {task.task_name} retried", actor=actor)
    _tasks_reset([task], reason="retried by user", actor=actor)
    if resumed:
        workflow_event(
            workflow,
            EventType.WORKFLOW_RESUMED,
            payload={"tasks": resumed, "retried": task.task_name, **(actor or {})},
        )
    tasks_queue([task], now=now)
    return task


def _dependents_to_revive(workflow: Workflow, task: TaskExecution) -> list[TaskExecution]:
    """The cancelled tasks downstream of `task` (retried in a workflow that continues on
    failure) that can run again once it completes: those cancelled because it failed, as the
    workflow went on with its other branches. One that also waits on another failed or
    cancelled task stays cancelled (it still cannot run), like whatever waits on it."""
    # Read without locks: the running tasks are locked by their attempts, which lock the
    # workflow row after their task row (the other order here would deadlock with them). Only
    # the rows changed, cancelled and so out of every attempt's reach, are locked, below.
    siblings = list(TaskExecution.objects.filter(workflow=workflow).only("task_name", "depends_on", "status"))
    downstream = task_descendants(task.task_name, siblings)
    by_name = {sibling.task_name: sibling for sibling in siblings}
    # Cancelled as a consequence of an upstream task, not on their own (a user's cancel).
    revivable = {
        sibling.task_name
        for sibling in tasks_cancelled_for_upstream(
            [by_name[name] for name in downstream if by_name[name].status == TaskExecution.Status.CANCELLED]
        )
    }
    dead = {TaskExecution.Status.FAILED, TaskExecution.Status.TIMED_OUT, TaskExecution.Status.CANCELLED}
    able = {task.task_name}  # will run again
    names: list[str] = []
    changed = True
    while changed:  # in dependency order, whatever the order of the rows
        changed = False
        for name in sorted(downstream - able):
            sibling = by_name[name]
            if name not in revivable:
                continue
            if all(dep in able or by_name[dep].status not in dead for dep in sibling.depends_on):
                able.add(name)
                names.append(name)
                changed = True
    return list(
        TaskExecution.objects.select_for_update()
        .filter(workflow=workflow, task_name__in=names, status=TaskExecution.Status.CANCELLED)
        .order_by("execution_id")
    )


# What a task's message is sent with (Celery's time limits and the queue): changed while a
# message is on its way, the attempt it starts would record a limit the worker does not apply,
# and the reaper would close it as abandoned while it still runs, then run the task again. A
# running task's message is the broker's until its try ends: a lost worker's is delivered again,
# with the limits it was sent with.
TASK_DISPATCH_FIELDS = ("timeout_seconds", "priority")
IN_BROKER_TASK = (TaskExecution.Status.QUEUED, TaskExecution.Status.RETRYING, TaskExecution.Status.RUNNING)


def task_dispatch_change_check(*, execution_id: str) -> TaskExecution:
    """Lock a task whose timeout or priority is about to change, or raise TransitionError while
    a message for it is in the broker (queued, retrying, running). Call it inside the transaction that
    writes the change: a pending task changes only under its workflow's lock (the dispatch of
    the dependents that became ready reads them under it), so that is taken first; a failed or
    cancelled one is sent again only under its own row lock, which is held here."""
    status, workflow_id = TaskExecution.objects.values_list("status", "workflow_id").get(pk=execution_id)
    workflow_locked = status == TaskExecution.Status.PENDING and workflow_id is not None
    if workflow_locked:
        Workflow.objects.select_for_update().filter(pk=workflow_id).first()
    task = TaskExecution.objects.select_for_update().get(pk=execution_id)
    if task.status == TaskExecution.Status.PENDING and task.workflow_id and not workflow_locked:
        # Made pending (a retry, a resume) after the status was read: its workflow's lock, which
        # its dispatch takes, cannot be taken after the task's now (the engine's order is the
        # workflow's first for a pending task), so the change is refused, to be made again.
        raise TransitionError(
            f"task {execution_id} became pending while its change was checked; submit the change again"
        )
    if task.status in IN_BROKER_TASK:
        raise TransitionError(
            f"task {execution_id} is {task.status}: its message was sent with the timeout and queue it had; "
            "change them once the task has ended (or cancel it first)"
        )
    return task
