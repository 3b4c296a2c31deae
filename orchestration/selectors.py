"""Reads for the orchestration app: seed 003's query patterns on our tables.

Seed 003's `agent_tasks` is our `task_executions`; its `duration_ms` is our
`execution_time_ms`.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

from django.db import connection
from django.db.models import Avg, Count, DecimalField, Exists, Field, OuterRef, Q, QuerySet, Subquery, Sum
from django.utils import timezone

from orchestration.models import AgentPlaygroundMessage, TaskAttempt, TaskExecution, Workflow

DEFAULT_STATS_WINDOW = dt.timedelta(hours=24)

# DESIGN §4's wasted spend of one task (OuterRef): what its failed, timed-out and lost tries cost.
_wasted_of_task = (
    TaskAttempt.objects.filter(execution=OuterRef("pk"), status__in=TaskAttempt.WASTED_STATUSES)
    .values("execution")
    .annotate(cost=Sum("cost_usd"))
    .values("cost")
)


def _window_start(since: dt.datetime | None, until: dt.datetime | None) -> dt.datetime:
    """The start of a [since, until) window of the statistics (default: DEFAULT_STATS_WINDOW
    ago); ValueError when until is not after it."""
    if since is None:
        since = timezone.now() - DEFAULT_STATS_WINDOW
    if until is not None and until <= since:
        raise ValueError(f"until ({until.isoformat()}) must be after since ({since.isoformat()})")
    return since


def agent_stats(
    *, agent_id: str, since: dt.datetime | None = None, until: dt.datetime | None = None, owner_id: int | None = None
) -> dict:
    """Statistics of one agent's tasks created in [since, until) (default: the last 24 hours);
    with `owner_id`, of that user's tasks only (their workflows' tasks and the replies to their
    conversation messages).

    Over completed tasks (seed 003's "agent statistics"): total_tasks, avg_latency_ms (None
    when there are none), total_tokens, total_cost_usd (Decimal). Over all finished tasks
    (completed, failed, timed_out): failed and timed_out counts and success_rate =
    completed / finished * 100, None when nothing finished. Cancelled tasks count in none of
    these. wasted_cost_usd (Decimal): what the failed, timed-out and lost tries of the finished
    and the cancelled tasks cost (a retried task that completed too; a task cancelled after a
    failed try, whose cost the workflow, the user's spend and the rollup count as wasted too).
    One aggregate query, served by idx_tasks_agent_status (agent_id, status, created_at) and, per
    task, by the attempts' index.
    """
    since = _window_start(since, until)
    tasks = TaskExecution.objects.filter(
        agent_id=agent_id, status__in=TaskExecution.TERMINAL_STATUSES, created_at__gte=since
    )
    if until is not None:
        tasks = tasks.filter(created_at__lt=until)
    if owner_id is not None:
        asked = AgentPlaygroundMessage.objects.filter(owner_id=owner_id, execution=OuterRef("pk"))
        tasks = tasks.filter(Q(workflow__owner_id=owner_id) | Q(workflow__isnull=True) & Exists(asked))
    completed = Q(status=TaskExecution.Status.COMPLETED)
    totals = tasks.aggregate(
        total_tasks=Count("pk", filter=completed),
        avg_latency_ms=Avg("execution_time_ms", filter=completed),
        total_tokens=Sum("tokens_used", filter=completed, default=0),
        total_cost_usd=Sum("cost_usd", filter=completed, default=Decimal(0)),
        failed=Count("pk", filter=Q(status=TaskExecution.Status.FAILED)),
        timed_out=Count("pk", filter=Q(status=TaskExecution.Status.TIMED_OUT)),
        wasted_cost_usd=Sum(Subquery(_wasted_of_task, output_field=DecimalField()), default=Decimal(0)),
    )
    finished = totals["total_tasks"] + totals["failed"] + totals["timed_out"]
    success_rate = totals["total_tasks"] * 100 / finished if finished else None
    return {
        "agent_id": agent_id,
        "since": since,
        "until": until,
        **totals,
        "success_rate": success_rate,
    }


def user_spend(*, user_id: int, since: dt.datetime | None = None, until: dt.datetime | None = None) -> dict:
    """What one user's work cost in [since, until) (default: the last 24 hours), DESIGN §4's
    wasted spend per user beside it: their workflows created in the window (all their tries'
    tokens and cost, and what the failed, timed-out and lost tries cost) and the replies to
    their conversation messages created in it (tasks outside any workflow). Two aggregate
    queries, served by idx_workflows_owner_created and the messages' owner index."""
    since = _window_start(since, until)
    window = Q(created_at__gte=since) & (Q(created_at__lt=until) if until is not None else Q())
    workflows = Workflow.objects.filter(window, owner_id=user_id).aggregate(
        count=Count("pk"),
        tokens=Sum("total_tokens_used", default=0),
        cost_usd=Sum("total_cost_usd", default=Decimal(0)),
        wasted_cost_usd=Sum("wasted_cost_usd", default=Decimal(0)),
    )
    asked = AgentPlaygroundMessage.objects.filter(owner_id=user_id, execution__isnull=False).values("execution")
    replies = TaskExecution.objects.filter(window, workflow__isnull=True, pk__in=asked).aggregate(
        count=Count("pk"),
        tokens=Sum("tokens_used", default=0),
        cost_usd=Sum("cost_usd", default=Decimal(0)),
        wasted_cost_usd=Sum(Subquery(_wasted_of_task, output_field=DecimalField()), default=Decimal(0)),
    )
    return {
        "user_id": user_id,
        "since": since,
        "until": until,
        "workflows": workflows,
        "conversation_replies": replies,
        "total_tokens": workflows["tokens"] + replies["tokens"],
        "total_cost_usd": workflows["cost_usd"] + replies["cost_usd"],
        "wasted_cost_usd": workflows["wasted_cost_usd"] + replies["wasted_cost_usd"],
    }


def agent_recent_tasks(*, agent_id: str, limit: int = 20) -> QuerySet[TaskExecution]:
    """An agent's most recent tasks, newest first, with their workflow and agent joined.

    Served by idx_tasks_agent_created (agent_id, created_at DESC); execution_id (UUIDv7, so
    time-ordered) only breaks ties between rows created in the same instant.
    """
    return (
        TaskExecution.objects.filter(agent_id=agent_id)
        .select_related("workflow", "agent")
        .order_by("-created_at", "-execution_id")[:limit]
    )


# Seed 003's "workflow with tasks". FILTER drops the all-NULL row that the LEFT JOIN yields
# for a workflow without tasks (json_agg would return [null]); COALESCE turns "no rows" into [].
# The alias is not `tasks`: Workflow.objects.raw() sets it as an attribute, and Workflow.tasks
# is the reverse relation.
_WORKFLOW_WITH_TASKS_SQL = """
    SELECT w.*,
           COALESCE(
               json_agg(t.* ORDER BY t.created_at, t.execution_id) FILTER (WHERE t.execution_id IS NOT NULL),
               '[]'
           ) AS task_list
    FROM workflows w
    LEFT JOIN task_executions t ON t.workflow_id = w.workflow_id
    WHERE w.workflow_id = %s
    GROUP BY w.workflow_id
"""


def _from_json(field: Field, value: Any) -> Any:
    """A column value as json_agg rendered it, back in the Python type `.values()` gives."""
    value = field.to_python(value)
    if isinstance(field, DecimalField) and value is not None:
        # numeric arrives as a JSON number (a float once parsed): restore the column's scale.
        value = value.quantize(Decimal(1).scaleb(-field.decimal_places))
    return value


def workflow_with_tasks(*, workflow_id: str) -> dict[str, Any] | None:
    """A workflow's columns plus `tasks`: its task executions as a list of dicts (keys are the
    columns, tasks ordered by created_at then execution_id), or None for an unknown id.

    On PostgreSQL this is one query (seed 003's json_agg over a LEFT JOIN). json_agg renders
    values as JSON (timestamps as strings, numerics as numbers), so each task value is put
    back into its Python type by its model field: both paths return what `.values()` gives.
    On SQLite (the embedded first-run database) it is two ORM queries.
    """
    if connection.vendor != "postgresql":
        workflow = Workflow.objects.filter(pk=workflow_id).values().first()
        if workflow is None:
            return None
        tasks = TaskExecution.objects.filter(workflow_id=workflow_id).order_by("created_at", "execution_id")
        return {**workflow, "tasks": list(tasks.values())}

    row = next(iter(Workflow.objects.raw(_WORKFLOW_WITH_TASKS_SQL, [workflow_id])), None)
    if row is None:
        return None
    task_fields = TaskExecution._meta.concrete_fields
    return {
        **{field.attname: getattr(row, field.attname) for field in Workflow._meta.concrete_fields},
        "tasks": [
            {field.attname: _from_json(field, task[field.column]) for field in task_fields} for task in row.task_list
        ],
    }


def workflow_tasks_with_attempts(*, workflow_id: str) -> QuerySet[TaskExecution]:
    """A workflow's tasks in creation order, each with its attempts prefetched in order."""
    from django.db.models import Prefetch

    from orchestration.models import TaskAttempt

    return (
        TaskExecution.objects.filter(workflow_id=workflow_id)
        .select_related("agent")
        .prefetch_related(Prefetch("attempts", queryset=TaskAttempt.objects.order_by("attempt_number")))
        .order_by("created_at", "task_name")
    )


def conversation_messages(*, instance_id: str) -> QuerySet[AgentPlaygroundMessage]:
    """Every message of a thread in order (user, tool calls, tool results, replies, errors),
    with the attempt each reply came from."""
    return (
        AgentPlaygroundMessage.objects.filter(instance_id=instance_id)
        .select_related("attempt")
        .order_by("created_at", "message_id")
    )


def conversation_thread(*, instance_id: str) -> dict[str, Any] | None:
    """Who a thread belongs to: the agent and owner of its first message (None: no thread).
    A thread started without a user (manage.py chat without --user) has owner_id None."""
    return (
        AgentPlaygroundMessage.objects.filter(instance_id=instance_id)
        .order_by("created_at", "message_id")
        .values("agent_id", "owner_id")
        .first()
    )
