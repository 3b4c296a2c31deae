"""Sending task executions to Celery, always after the transaction that queued them commits.

Each message carries only the execution id; its Celery task id is chosen here and stored on
the execution in the same transaction that marks it queued. A delivery whose task id is not
the execution's current one is stale and runs nothing, which makes re-sends (sweeper,
concurrency deferral) safe.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis
from django.conf import settings
from django.db import transaction
from kombu.exceptions import BatchPublishError
from kombu.exceptions import OperationalError as KombuOperationalError

from orchestration.event_types import EventType
from orchestration.models import TaskExecution
from orchestration.services.events import task_event_build
from orchestration.services.fastpath import insert_rows, update_rows

if TYPE_CHECKING:
    from celery import Celery
    from kombu import Producer

logger = logging.getLogger(__name__)

PUBLISH_BATCH = 100


@dataclass(frozen=True)
class Dispatch:
    execution_id: str
    celery_task_id: str
    queue: str
    timeout_seconds: int
    countdown: float = 0.0


def hard_limit_seconds(timeout_seconds: int) -> int:
    return timeout_seconds + settings.TASK_HARD_TIMEOUT_GRACE_SECONDS


def dispatch_prepare(
    task: TaskExecution, *, now: dt.datetime, countdown: float = 0.0, status: str = TaskExecution.Status.QUEUED
) -> Dispatch:
    """Give the task a fresh message id and mark it queued (or retrying). The caller saves it."""
    task.status = status
    task.celery_task_id = str(uuid.uuid4())
    task.queued_at = now + dt.timedelta(seconds=countdown)
    return Dispatch(
        execution_id=task.execution_id,
        celery_task_id=task.celery_task_id,
        queue=task.priority,
        timeout_seconds=task.timeout_seconds,
        countdown=countdown,
    )


def tasks_queue(tasks: list[TaskExecution], *, now: dt.datetime) -> list[Dispatch]:
    """Mark pending tasks queued, record task_queued events and send them after commit. `now`
    is on the database's clock (queued_at: the queue timeout counts from it, wherever it is
    checked)."""
    dispatches = [dispatch_prepare(task, now=now) for task in tasks]
    if not dispatches:
        return []
    update_rows(tasks, ["status", "celery_task_id", "queued_at"])
    insert_rows([task_event_build(task, EventType.TASK_QUEUED) for task in tasks])
    dispatch_after_commit(dispatches)
    return dispatches


def dispatch_after_commit(dispatches: list[Dispatch]) -> None:
    if dispatches:
        transaction.on_commit(lambda: _send_or_leave_to_the_sweeper(dispatches))


# What a broker that cannot be reached raises (kombu wraps the transport's errors in its
# OperationalError once its publish retries are spent). A batch's messages are written when it
# is flushed, without kombu's retries, on the producer's pooled connection: a broker that went
# away since its last use (restarted, failed over) fails the flush with BatchPublishError.
BROKER_DOWN = (KombuOperationalError, BatchPublishError, ConnectionError, TimeoutError, redis.RedisError)


def _send_or_leave_to_the_sweeper(dispatches: list[Dispatch]) -> None:
    """Send the committed tasks' messages. With the broker down, the record stands (the tasks
    are queued, committed) and the dispatch sweeper (reaper.queued_sweep) sends them once it
    answers again: the caller (an API request, the worker that completed their parent) is
    not failed for it, and a client does not submit again what it was told had failed."""
    try:
        dispatch_send(dispatches)
    except BROKER_DOWN as exc:
        # One line: the cause is the broker, named; where in kombu it gave up tells an operator
        # nothing (and `submit_workflow` printed it above the id it then printed, exit 0).
        logger.error(
            "broker unreachable (%s: %s): %d task message(s) not sent, the dispatch sweeper sends them: %s",
            type(exc).__name__,
            exc,
            len(dispatches),
            ", ".join(str(d.execution_id) for d in dispatches),
        )


def dispatch_send(dispatches: list[Dispatch]) -> None:
    from orchestration.tasks import run_task

    # One producer (and broker connection) for the whole batch, not one per message, and
    # the messages pipelined: one Redis round trip per PUBLISH_BATCH messages instead of one
    # each, in batches small enough that workers start on the first ones at once.
    # Each queue is declared here, once per batch, on the producer's connection, as Celery
    # would declare it before its first message (kombu remembers declarations per connection);
    # the messages then skip Celery's declaration, which re-binds a copy of the queue for each
    # one before finding it declared (a third of the cost of sending a message).
    # The declarations are retried as the producer's own operation: a reconnection moves the
    # producer to the new channel. kombu's retry of a declaration (maybe_declare(retry=True))
    # moves only the queue, and the messages then went to the channel it had closed.
    app = run_task.app
    with app.producer_or_acquire() as producer, producer.batch(max_size=PUBLISH_BATCH):
        queues_declare(app, producer, [d.queue for d in dispatches])
        for d in dispatches:
            run_task.apply_async(
                args=[d.execution_id],
                task_id=d.celery_task_id,
                queue=d.queue,
                routing_key=d.queue,
                soft_time_limit=d.timeout_seconds,
                time_limit=hard_limit_seconds(d.timeout_seconds),
                countdown=d.countdown or None,
                producer=producer,
                declare=[],
            )


def queues_declare(app: Celery, producer: Producer, names: list[str]) -> None:
    """Declare the queues `names` on the producer's connection, retried as the producer's own
    operation (see dispatch_send); its messages are then sent with `declare=[]`."""
    declare = producer.maybe_declare
    if app.conf.task_publish_retry:
        declare = producer.connection.ensure(producer, declare, **(app.conf.task_publish_retry_policy or {}))
    for name in dict.fromkeys(names):
        declare(app.amqp.queues[name])


def revoke_after_commit(celery_task_ids: list[str], *, terminate: bool) -> None:
    """Revoke messages (and, with terminate, kill the processes running them) after commit.
    With the broker down, the record stands: the caller (a cancel through the API, a worker or
    the reaper failing a workflow) is not failed for it. Their tasks are recorded ended, so a
    message delivered later runs nothing and a try running on is refused its outcome."""
    ids = [i for i in celery_task_ids if i]
    if not ids:
        return

    def send() -> None:
        from config.celery import app

        try:
            app.control.revoke(ids, terminate=terminate, signal="SIGTERM")
        except BROKER_DOWN as exc:
            # The cancel is committed, and stands: a message left unrevoked runs nothing (its
            # task is no longer queued), a process left running ends as it would, recorded
            # late. The caller (an API request, the console) is not failed for it.
            logger.error(
                "broker unreachable (%s: %s): %d message(s) not revoked: %s",
                type(exc).__name__,
                exc,
                len(ids),
                ", ".join(ids),
            )

    transaction.on_commit(send)
