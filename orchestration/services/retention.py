"""Retention: delete rows older than the configured number of days, per table.

RETENTION_DAYS_* settings (0 keeps a table forever). Deletes run in bounded batches, each
its own short transaction, so retention never holds long locks on a busy table.

- events: only through the database function `prune_events(before, max_sequence, batch)`
  (migration 0013), the one path the append-only trigger lets a DELETE through. It never
  prunes past the last sequence the relay has put on the Synapse stream, nor past the oldest
  entry a consumer group of the stream has not acknowledged: the stream lives in Redis, which
  may restart empty, and the relay then publishes again from PostgreSQL what it still holds,
  so an event a consumer has not yet written stays there. On SQLite (the embedded first-run
  database) events are kept: the append-only rule has no privileged exception there.
- agent_playground_messages, agent_metrics: by created_at / period start. With the messages
  go the finished tasks outside any workflow (conversation replies, whose input and output
  hold the thread's text) that no message refers to any more, with their attempts and
  interactions: a task a kept message names stays, or the message would lose the attempt that
  tells a failed turn.
- workflows: finished ones by completed_at (their tasks and attempts go with them).
- events, messages (and their replies), workflows (and their tasks): never past the first day the
  daily export has still to export from them (the day after the last one-day window exported of
  a data type read from them: the days its catch-up exports), or the catch-up would export those
  days empty, and succeed; the messages as many days more (a day's threads are exported with
  their history); reported in `kept`, with a warning. A type never exported day by day
  holds nothing back (nor does the catch-up export anything for it).
- export_runs: failed and superseded runs; succeeded runs are the record of what was exported.
- the consumer's daily CSV partitions (RETENTION_DAYS_TRAINING_CSV), by the day they hold: a
  message or workflow retention deleted would otherwise live on in them.
- django_session: the console's expired sessions, at every run whatever the settings (Django
  deletes a session only at its sign-out, so one left to expire would stay for good: a row per
  sign-in; what `manage.py clearsessions` does). Listed only when rows went.

What was deleted is reported per table, cascaded rows included (deleting a workflow also
deletes rows from task_executions, task_attempts and agent_interactions), as the row counts
the DELETE statements returned: a table a rule applies to is always listed (0 when nothing
was old enough), a table reached only by cascade when rows went from it.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import redis
from django.apps import apps
from django.conf import settings
from django.contrib.sessions.models import Session
from django.db import connection, transaction
from django.db.models import Exists, Expression, Model, OuterRef, Q
from django.db.models.functions import Coalesce
from django.db.models.lookups import LessThan

from orchestration.db import database_now
from orchestration.models import AgentInteraction, AgentMetric, AgentPlaygroundMessage, TaskExecution, Workflow
from orchestration.services.relay import _stream_last_sequence, stream_groups, synapse_client

logger = logging.getLogger(__name__)

BATCH = 5000
# Smaller batches for workflows: each one also deletes its tasks, attempts and interactions,
# which the ORM collects in memory first, so a batch also stops at WORKFLOW_BATCH_TASKS tasks (by
# the workflows' total_steps; one workflow at least): 500 workflows of 1,000 tasks each were a
# million rows in one transaction, and 1.5 GB held by the process.
WORKFLOW_BATCH = 500
WORKFLOW_BATCH_TASKS = 5000


@dataclass
class RetentionResult:
    deleted: dict[str, int] = field(default_factory=dict)  # table -> rows deleted, cascades included
    skipped: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)  # table -> why days past its cutoff were kept
    temp_files_removed: int = 0
    csv_partitions_removed: int = 0


def _delete_in_batches(
    model: type[Model],
    condition: Q,
    *,
    oldest_first: str | Expression,
    batch: int = BATCH,
    weight: str | None = None,
    weight_limit: int = 0,
) -> Counter[str]:
    """Delete the rows matching `condition`, `batch` at a time, each batch its own transaction;
    rows deleted per table (the model's own and every table the ORM cascaded to). `oldest_first`:
    the indexed time (column or expression) the batches are taken in ascending order of, which
    `condition` bounds where it can, so that a batch reads the old rows from the index: in the
    model's own ordering (newest first for workflows and metrics) every batch read past all the
    rows kept before the first old one (0.7 s a batch of 500 of 2 M workflows, one day old of
    400; migration 0040). `weight`: a column counting the rows that go with each one (a
    workflow's total_steps); a batch then also stops before their sum passes `weight_limit`,
    with one row at least."""
    deleted: Counter[str] = Counter({model._meta.db_table: 0})
    while True:
        with transaction.atomic():
            # Locked with the condition (re-checked by PostgreSQL on a row changed meanwhile;
            # rows another transaction holds are left for the next run): a workflow resumed
            # between this SELECT and the DELETE is no longer old and finished, and is kept.
            rows = list(
                model.objects.select_for_update(skip_locked=True, of=("self",))
                .filter(condition)
                .order_by(oldest_first)
                .values_list("pk", *([weight] if weight else []))[:batch]
            )
            if not rows:
                return deleted
            taken = _within(rows, weight_limit) if weight else len(rows)
            _, per_model = model.objects.filter(condition, pk__in=[row[0] for row in rows[:taken]]).delete()
        for label, count in per_model.items():
            deleted[apps.get_model(label)._meta.db_table] += count
        if len(rows) < batch and taken == len(rows):
            return deleted


def _within(rows: list[tuple], limit: int) -> int:
    """How many of the first (pk, weight) rows keep their weights' sum within `limit` (one at least)."""
    total = 0
    for taken, (_, weight) in enumerate(rows):
        total += weight
        if total > limit and taken:
            return taken
    return len(rows)


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
    """The last sequence that every consumer group has acknowledged and the relay published
    (only the latter while no group exists); None when the stream cannot be read."""
    if not settings.REDIS_URL:
        return None
    try:
        client = synapse_client()
        # The groups first: a stream lost after they were read reads as 0 then (nothing pruned),
        # where, read the other way round, the groups would be gone and the last id not.
        groups = stream_groups(client, settings.SYNAPSE_STREAM)
        relayed = _stream_last_sequence(client, settings.SYNAPSE_STREAM)
    except redis.RedisError as exc:
        logger.warning("retention: cannot read the Synapse stream (%s); events are kept this time", exc)
        return None
    if groups:
        # Entry ids are <sequence>-1: an oldest needed id S-1 leaves S-1 done, S-2 (after S-1 was
        # delivered and acknowledged) leaves S done.
        sequence, part = min(group.keeps_from for group in groups)
        relayed = min(relayed, sequence if part > 1 else sequence - 1)
    return max(relayed, 0)


def retention_apply(*, now: dt.datetime | None = None) -> RetentionResult:
    """Delete what is older than each table's RETENTION_DAYS_* (see module doc), on the database's
    clock: the one that stamps the rows, and the rollup's, which writes again the periods with
    activity and no metrics back to this cutoff."""
    now = now or database_now()
    result = RetentionResult()

    def cutoff(days: int) -> dt.datetime | None:
        return None if days <= 0 else now - dt.timedelta(days=days)

    def exported_cutoff(
        days: int, table: str, data_types: tuple[str, ...], *, with_history: tuple[str, ...] = ()
    ) -> dt.datetime | None:
        """The cutoff, moved back to the first day the daily export has still to export for one
        of `data_types` (the day after its last exported day, or an earlier one a catch-up failed
        to export: the days its catch-up exports from these rows), so that no row goes before its
        day is exported. A type never exported day by day waits for nothing (as the catch-up),
        nor does a day older than the catch-up reaches (TRAINING_EXPORT_CATCHUP_DAYS before the
        next daily export's day, whether it runs before or after this pass): with the daily
        export stopped, rows are kept that many days longer, not for good. A type of
        `with_history` (conversations: a thread with its messages from before the day) reads
        `days` more of them, as this pass's cutoff leaves them to the export of today's rows."""
        from training_export.services.export import days_not_exported, last_exported_day

        if (before := cutoff(days)) is None:
            return None
        today = now.astimezone(dt.UTC).date()
        reached = today - dt.timedelta(days=settings.TRAINING_EXPORT_CATCHUP_DAYS + 1)
        for data_type in data_types:
            if (last := last_exported_day(data_type)) is None:
                continue
            # A day before the last exported one that failed in a catch-up is exported again.
            missed = days_not_exported(data_type, since=reached, before=last)
            day = missed[0] if missed else max(last + dt.timedelta(days=1), reached)
            if data_type in with_history and day < today:
                day -= dt.timedelta(days=days)
            first = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
            if first < before:
                before = first
                result.kept[table] = (
                    f"rows of {first.date()} and later kept: the daily export of {data_type} has not exported them yet"
                )
        return before

    from training_export.models import ExportRun

    types = ExportRun.DataType
    deleted: Counter[str] = Counter()
    events_types = (types.EVENTS, types.TOOL_EXECUTIONS)
    if (before := exported_cutoff(settings.RETENTION_DAYS_EVENTS, "events", events_types)) is not None:
        if connection.vendor != "postgresql":
            result.skipped["events"] = "events are pruned only on PostgreSQL"
        elif (relayed := _relayed_sequence()) is None:
            result.skipped["events"] = "the relayed position on the Synapse stream is unknown"
        else:
            deleted["events"] += events_prune(before=before, max_sequence=relayed)
    # The messages' rule deletes conversation replies (tasks) too.
    messages_types = (types.CONVERSATIONS, types.TASKS)
    if (
        before := exported_cutoff(
            settings.RETENTION_DAYS_MESSAGES,
            "agent_playground_messages",
            messages_types,
            with_history=(types.CONVERSATIONS,),
        )
    ) is not None:
        deleted.update(_delete_in_batches(AgentPlaygroundMessage, Q(created_at__lt=before), oldest_first="created_at"))
        condition = Q(
            workflow__isnull=True, status__in=TaskExecution.TERMINAL_STATUSES, completed_at__lt=before
        ) & ~Exists(AgentPlaygroundMessage.objects.filter(execution=OuterRef("pk")))
        # Their hand-offs (outside any workflow too) go with them, as a workflow's go with it.
        replies = TaskExecution.objects.filter(condition).values("pk")
        deleted.update(
            _delete_in_batches(
                AgentInteraction, Q(workflow__isnull=True, execution__in=replies), oldest_first="created_at"
            )
        )
        deleted.update(_delete_in_batches(TaskExecution, condition, oldest_first="created_at", batch=WORKFLOW_BATCH))
    if (before := cutoff(settings.RETENTION_DAYS_AGENT_METRICS)) is not None:
        # By the period's start, or when it was recorded for a metric of no period.
        age = Coalesce("period_start", "recorded_at")
        deleted.update(_delete_in_batches(AgentMetric, Q(LessThan(age, before)), oldest_first=age))
    # A workflow's tasks go with it.
    workflows_types = (types.WORKFLOWS, types.TASKS)
    if (before := exported_cutoff(settings.RETENTION_DAYS_WORKFLOWS, "workflows", workflows_types)) is not None:
        # Old by completed_at: a workflow resumed (completed_at cleared) and ended again is as old
        # as its last end.
        condition = Q(status__in=Workflow.TERMINAL_STATUSES, completed_at__lt=before)
        deleted.update(
            _delete_in_batches(
                Workflow,
                condition,
                oldest_first="completed_at",
                batch=WORKFLOW_BATCH,
                weight="total_steps",
                weight_limit=WORKFLOW_BATCH_TASKS,
            )
        )
    if (before := cutoff(settings.RETENTION_DAYS_EXPORT_RUNS)) is not None:
        condition = Q(created_at__lt=before, status__in=[ExportRun.Status.FAILED, ExportRun.Status.SUPERSEDED])
        deleted.update(_delete_in_batches(ExportRun, condition, oldest_first="created_at"))
    sessions = _delete_in_batches(Session, Q(expire_date__lt=now), oldest_first="expire_date")
    deleted.update(+sessions)  # only when rows went
    # Temporary files of export writers that were killed mid-write: older than an export on a
    # worker may run (its hard time limit, and the grace before its run is called lost), so
    # neither a file being written nor one staged early in a long export and waiting for the
    # final rename is touched. (`manage.py export_training_data` has no limit: one running
    # longer than that could lose a staged file to a retention pass, and fail at the rename.)
    from training_export.services.export import EXPORT_LOST_GRACE_SECONDS, EXPORT_TIME_LIMIT_SECONDS
    from training_export.services.files import stale_temp_files_remove

    result.temp_files_removed = len(
        stale_temp_files_remove(
            Path(settings.TRAINING_EXPORT_DIR), older_than_seconds=EXPORT_TIME_LIMIT_SECONDS + EXPORT_LOST_GRACE_SECONDS
        )
    )
    if (before := cutoff(settings.RETENTION_DAYS_TRAINING_CSV)) is not None:
        from training_export.services.store import partitions_remove

        removed = partitions_remove(Path(settings.TRAINING_DATA_DIR), before=before.date())
        result.csv_partitions_removed = len(removed)
        if removed:
            logger.info(
                "retention: %d training CSV partition(s) of days before %s removed", len(removed), before.date()
            )
    result.deleted = dict(sorted(deleted.items()))
    for table, reason in result.skipped.items():
        logger.warning("retention: %s kept: %s", table, reason)
    for table, reason in result.kept.items():
        logger.warning("retention: %s: %s", table, reason)
    if result.deleted:
        logger.info(
            "retention: rows deleted per table: %s",
            ", ".join(f"{table}={rows}" for table, rows in result.deleted.items()),
        )
    return result
