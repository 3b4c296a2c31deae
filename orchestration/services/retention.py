"""Retention: delete rows older than the configured number of days, per table.

RETENTION_DAYS_* settings (0 keeps a table forever). Deletes run in bounded batches, each
its own short transaction, so retention never holds long locks on a busy table.

- events: only through the database function `prune_events(before, max_sequence, batch)`
  (migration 0013), the one path the append-only trigger lets a DELETE through. It never
  prunes past the last sequence the relay has put on the Synapse stream, so no event is
  lost to the consumers. On SQLite (the embedded first-run database) events are kept: the
  append-only rule has no privileged exception there.
- agent_playground_messages, agent_metrics: by created_at / period start.
- workflows: finished ones by completed_at (their tasks and attempts go with them).
- export_runs: failed and superseded runs; succeeded runs are the record of what was exported.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from pathlib import Path

import redis
from django.conf import settings
from django.db import connection, transaction
from django.db.models import Model, Q
from django.utils import timezone

from orchestration.models import AgentMetric, AgentPlaygroundMessage, Workflow
from orchestration.services.relay import _stream_last_sequence, synapse_client

logger = logging.getLogger(__name__)

BATCH = 5000


@dataclass
class RetentionResult:
    deleted: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    temp_files_removed: int = 0


def _delete_in_batches(model: type[Model], condition: Q) -> int:
    total = 0
    while True:
        with transaction.atomic():
            ids = list(model.objects.filter(condition).values_list("pk", flat=True)[:BATCH])
            if not ids:
                return total
            deleted, _ = model.objects.filter(pk__in=ids).delete()
        total += deleted
        if len(ids) < BATCH:
            return total


def events_prune(*, before: dt.datetime, max_sequence: int, batch: int = BATCH) -> int:
    """Delete events created before `before` with sequence <= max_sequence, through the
    privileged database function (the only DELETE the append-only trigger allows)."""
    if connection.vendor != "postgresql":
        raise RuntimeError("events are pruned only on PostgreSQL, through prune_events()")
    total = 0
    while True:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SELECT prune_events(%s, %s, %s)", [before, max_sequence, batch])
            deleted = cursor.fetchone()[0]
        total += deleted
        if deleted < batch:
            return total


def _relayed_sequence() -> int | None:
    if not settings.REDIS_URL:
        return None
    try:
        return _stream_last_sequence(synapse_client(), settings.SYNAPSE_STREAM)
    except redis.RedisError as exc:
        logger.warning("retention: cannot read the Synapse stream (%s); events are kept this time", exc)
        return None


def retention_apply(*, now: dt.datetime | None = None) -> RetentionResult:
    """Delete what is older than each table's RETENTION_DAYS_* (see module doc)."""
    now = now or timezone.now()
    result = RetentionResult()

    def cutoff(days: int) -> dt.datetime | None:
        return None if days <= 0 else now - dt.timedelta(days=days)

    if (before := cutoff(settings.RETENTION_DAYS_EVENTS)) is not None:
        if connection.vendor != "postgresql":
            result.skipped["events"] = "events are pruned only on PostgreSQL"
        elif (relayed := _relayed_sequence()) is None:
            result.skipped["events"] = "the relayed position on the Synapse stream is unknown"
        else:
            result.deleted["events"] = events_prune(before=before, max_sequence=relayed)
    if (before := cutoff(settings.RETENTION_DAYS_MESSAGES)) is not None:
        result.deleted["agent_playground_messages"] = _delete_in_batches(
            AgentPlaygroundMessage, Q(created_at__lt=before)
        )
    if (before := cutoff(settings.RETENTION_DAYS_AGENT_METRICS)) is not None:
        result.deleted["agent_metrics"] = _delete_in_batches(
            AgentMetric, Q(period_start__lt=before) | Q(period_start__isnull=True, recorded_at__lt=before)
        )
    if (before := cutoff(settings.RETENTION_DAYS_WORKFLOWS)) is not None:
        # Deleting a workflow cascades to its tasks, attempts and interactions (ORM delete).
        stale = Workflow.objects.filter(status__in=Workflow.TERMINAL_STATUSES, completed_at__lt=before)
        deleted = 0
        while ids := list(stale.values_list("pk", flat=True)[:500]):
            with transaction.atomic():
                deleted += Workflow.objects.filter(pk__in=ids).delete()[1].get("orchestration.Workflow", 0)
        result.deleted["workflows"] = deleted
    if (before := cutoff(settings.RETENTION_DAYS_EXPORT_RUNS)) is not None:
        from training_export.models import ExportRun

        result.deleted["export_runs"] = _delete_in_batches(
            ExportRun,
            Q(created_at__lt=before, status__in=[ExportRun.Status.FAILED, ExportRun.Status.SUPERSEDED]),
        )
    # Temporary files of export writers that were killed mid-write (an hour old at least, so a
    # write still in progress elsewhere is never touched).
    from training_export.services.files import stale_temp_files_remove

    result.temp_files_removed = len(stale_temp_files_remove(Path(settings.TRAINING_EXPORT_DIR)))
    for table, reason in result.skipped.items():
        logger.warning("retention: %s kept: %s", table, reason)
    return result
