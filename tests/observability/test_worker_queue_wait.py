"""task_prerun's queue wait for a redelivered message: observed unless the message already ran."""

from __future__ import annotations

import datetime as dt
import time
from types import SimpleNamespace
from typing import Any

import pytest
from django.utils import timezone

from observability import metrics, worker
from tests.factories import TaskAttemptFactory, TaskExecutionFactory


def start(monkeypatch: pytest.MonkeyPatch, execution_id: str, *, published_at: float) -> list[float]:
    observed: list[float] = []
    monkeypatch.setattr(metrics, "queue_wait_observe", lambda *, queue, seconds: observed.append(seconds))
    headers: dict[str, Any] = {worker.PUBLISHED_AT_HEADER: published_at, "eta": None}
    request = SimpleNamespace(
        delivery_info={"routing_key": "normal", "redelivered": True}, get=lambda key, default=None: headers.get(key)
    )
    worker.task_started(SimpleNamespace(name=worker.RUN_TASK, request=request), [], {"execution_id": execution_id})
    return observed


@pytest.mark.django_db
def test_a_redelivered_message_that_never_started_is_observed_as_queue_wait(monkeypatch):
    """A warm shutdown restores the messages a worker held without starting them (prefetched,
    or a retry's countdown) marked redelivered: their wait was never observed."""
    task = TaskExecutionFactory()
    published = time.time() - 30
    TaskAttemptFactory(execution=task, started_at=timezone.now() - dt.timedelta(seconds=60))  # before its retry
    observed = start(monkeypatch, task.execution_id, published_at=published)
    assert len(observed) == 1 and observed[0] >= 30


@pytest.mark.django_db
def test_a_redelivered_message_that_ran_is_not_observed_again(monkeypatch):
    task = TaskExecutionFactory()
    published = time.time() - 30
    TaskAttemptFactory(execution=task, started_at=timezone.now() - dt.timedelta(seconds=20))  # the lost run
    assert start(monkeypatch, task.execution_id, published_at=published) == []
