"""task_prerun's queue wait for a redelivered message: observed unless the message already ran."""

from __future__ import annotations

import datetime as dt
import time
from types import SimpleNamespace
from typing import Any

import pytest
from django.utils import timezone
from prometheus_client import REGISTRY

from observability import worker
from tests.factories import TaskAttemptFactory, TaskExecutionFactory


def _histogram(suffix: str) -> float:
    return REGISTRY.get_sample_value(f"agentledger_task_queue_wait_seconds_{suffix}", {"queue": "normal"}) or 0.0


def start(execution_id: str, *, published_at: float) -> list[float]:
    """Start the task's message as task_prerun does; the waits the histogram observed."""
    count, total = _histogram("count"), _histogram("sum")
    headers: dict[str, Any] = {worker.PUBLISHED_AT_HEADER: published_at, "eta": None}
    request = SimpleNamespace(
        delivery_info={"routing_key": "normal", "redelivered": True}, get=lambda key, default=None: headers.get(key)
    )
    worker.task_started(SimpleNamespace(name=worker.RUN_TASK, request=request), [], {"execution_id": execution_id})
    observed = int(_histogram("count") - count)
    return [_histogram("sum") - total] if observed == 1 else [0.0] * observed


@pytest.mark.django_db
def test_a_redelivered_message_that_never_started_is_observed_as_queue_wait():
    """A warm shutdown restores the messages a worker held without starting them (prefetched,
    or a retry's countdown) marked redelivered: their wait was never observed."""
    task = TaskExecutionFactory()
    published = time.time() - 30
    TaskAttemptFactory(execution=task, started_at=timezone.now() - dt.timedelta(seconds=60))  # before its retry
    observed = start(task.execution_id, published_at=published)
    assert len(observed) == 1 and observed[0] >= 30


@pytest.mark.django_db
def test_a_redelivered_message_that_ran_is_not_observed_again():
    task = TaskExecutionFactory()
    published = time.time() - 30
    TaskAttemptFactory(execution=task, started_at=timezone.now() - dt.timedelta(seconds=20))  # the lost run
    assert start(task.execution_id, published_at=published) == []
