"""Platform metric definitions and the functions that record them.

Names follow Prometheus conventions: an `agentledger_` prefix, the unit as a suffix
(`_seconds`, `_usd`, `_tokens`), `_total` on counters. Labels have bounded cardinality:
agent id (agents are a registry synced from definition files), status, cause, queue,
direction, data type. Workflow and execution ids are never labels; they go to InfluxDB as
fields and to the logs.

Every recording function swallows its own failures and counts them in
`agentledger_observability_errors_total`: metrics never fail a task.

In a Celery worker with PROMETHEUS_MULTIPROC_DIR set, each pool process writes these to
files in that directory and the worker's main process serves their sum (observability.worker).
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from decimal import Decimal
from functools import lru_cache
from typing import Any

from prometheus_client import Counter, Histogram

logger = logging.getLogger(__name__)

# Attempts run from milliseconds (python tools) to an hour (the longest timeout).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
QUEUE_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)

TASK_ATTEMPTS = Counter(
    "agentledger_task_attempts",
    "Finished task attempts by agent, final attempt status and cause (`success` for a successful attempt).",
    ["agent", "status", "cause"],
)
TASKS_FINISHED = Counter(
    "agentledger_tasks_finished",
    "Task executions that reached a final status (completed, failed, timed_out, cancelled), by agent.",
    ["agent", "status"],
)
TASK_RETRIES = Counter(
    "agentledger_task_retries",
    "Attempts started after a first one (retries and redeliveries), by agent.",
    ["agent"],
)
TASK_DURATION = Histogram(
    "agentledger_task_duration_seconds",
    "Duration of finished attempts, by agent and attempt status.",
    ["agent", "status"],
    buckets=DURATION_BUCKETS,
)
TASK_QUEUE_WAIT = Histogram(
    "agentledger_task_queue_wait_seconds",
    "Submit-to-start latency: from the moment a task message became runnable (published, or its "
    "countdown ended) to a worker starting it, by queue.",
    ["queue"],
    buckets=QUEUE_WAIT_BUCKETS,
)
TOKENS = Counter(
    "agentledger_tokens",
    "LLM tokens recorded on attempts, by agent and direction (input, output).",
    ["agent", "direction"],
)
COST = Counter("agentledger_cost_usd", "Cost in US dollars recorded on attempts, by agent.", ["agent"])
OBSERVABILITY_ERRORS = Counter(
    "agentledger_observability_errors",
    "Failures inside the observability code itself (a metric, a log context, an InfluxDB point), by component.",
    ["component"],
)


@contextmanager
def guarded(component: str) -> Iterator[None]:
    """Run an observation; on any error log it and count it instead of raising."""
    try:
        yield
    except Exception:
        logger.warning("observability: %s failed", component, exc_info=True)
        with suppress(Exception):  # the counter itself failing must not fail the caller either
            OBSERVABILITY_ERRORS.labels(component=component).inc()


# Children per label set, so that each observation skips labels()' argument handling (the
# label sets are bounded, so is this cache).
@lru_cache(maxsize=8192)
def _outcome_children(agent: str, status: str, cause: str) -> tuple[Any, Any]:
    return TASK_ATTEMPTS.labels(agent=agent, status=status, cause=cause), TASK_DURATION.labels(
        agent=agent, status=status
    )


@lru_cache(maxsize=8192)
def _child(metric: Any, *values: str) -> Any:
    return metric.labels(*values)


def attempt_started_observe(*, agent_id: str, attempt_number: int) -> None:
    """A worker started an attempt: counts retries (attempt 2 and later)."""
    with guarded("attempt_started"):
        if attempt_number > 1:
            _child(TASK_RETRIES, agent_id).inc()


def attempt_outcome_observe(
    *,
    agent_id: str,
    status: str,
    cause: str,
    duration_ms: float,
    input_tokens: int = 0,
    output_tokens: int = 0,
    cost_usd: Decimal | float = 0,
    task_status: str | None = None,
) -> None:
    """A recorded attempt outcome. `task_status` is the task's final status when this attempt
    ended the task (completed, failed, timed_out), None when a retry follows."""
    with guarded("attempt_outcome"):
        attempts, duration = _outcome_children(agent_id, status, cause)
        attempts.inc()
        if duration_ms is not None:
            duration.observe(max(duration_ms, 0.0) / 1000)
        _usage_count(agent_id, input_tokens, output_tokens, cost_usd)
        if task_status:
            _child(TASKS_FINISHED, agent_id, task_status).inc()


def late_usage_observe(*, agent_id: str, input_tokens: int, output_tokens: int, cost_usd: Decimal | float) -> None:
    """Usage paid after its attempt was closed without a result (and counted): added to the
    token and cost counters as it is to the attempt's row, so they keep the database's totals."""
    with guarded("late_usage"):
        _usage_count(agent_id, input_tokens, output_tokens, cost_usd)


def _usage_count(agent_id: str, input_tokens: int, output_tokens: int, cost_usd: Decimal | float) -> None:
    if input_tokens:
        _child(TOKENS, agent_id, "input").inc(input_tokens)
    if output_tokens:
        _child(TOKENS, agent_id, "output").inc(output_tokens)
    if cost_usd:
        _child(COST, agent_id).inc(float(cost_usd))


def tasks_cancelled_observe(*, agent_ids: list[str]) -> None:
    """Tasks cancelled (by a user, a failed dependency or a workflow deadline), whether or not
    an attempt was running: they reach a final status without an attempt outcome."""
    with guarded("tasks_cancelled"):
        for agent_id, count in Tally(agent_ids).items():
            _child(TASKS_FINISHED, agent_id, "cancelled").inc(count)


def queue_wait_observe(*, queue: str, seconds: float) -> None:
    """Time a task message waited in its queue before a worker started it."""
    with guarded("queue_wait"):
        _child(TASK_QUEUE_WAIT, queue or "unknown").observe(max(seconds, 0.0))
