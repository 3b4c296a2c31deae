"""The pipeline's Celery tasks on a real worker, and their beat schedules."""

from __future__ import annotations

import datetime as dt
import io
import json
import time
from decimal import Decimal

from django.core.management import call_command
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from config.celery import app
from orchestration.event_types import EventType
from orchestration.models import AgentMetric
from tests.engine import wait_for
from tests.factories import AgentFactory, EventFactory, TaskExecutionFactory
from training_export.models import ExportRun
from training_export.services.export import STAMP_MARGIN

PIPELINE_TASKS = {
    "rollup agent metrics hourly": ("orchestration.rollup_metrics", {"period": "hour"}),
    "rollup agent metrics daily": ("orchestration.rollup_metrics", {"period": "day"}),
    "export training data (previous UTC day)": ("training_export.export_previous_day", {}),
    "retention": ("orchestration.apply_retention", {}),
}


def clear_of_midnight() -> dt.datetime:
    """The worker runs export_previous_day on the database's clock, which a test cannot move: from
    midnight UTC until STAMP_MARGIN after it the previous day is not closed yet (the task is
    retried 10 minutes later), and a test that straddles midnight expects another day than the
    worker exports. Wait until clear of both (at most a few minutes, once a day)."""
    now = timezone.now()
    midnight = dt.datetime.combine(now.astimezone(dt.UTC).date(), dt.time(), tzinfo=dt.UTC)
    if now > midnight + dt.timedelta(days=1) - dt.timedelta(minutes=2):
        midnight += dt.timedelta(days=1)
    clear = midnight + STAMP_MARGIN + dt.timedelta(seconds=5)
    if now < clear:
        time.sleep((clear - now).total_seconds())
    return timezone.now()


def test_rollup_and_daily_export_run_on_a_real_worker(worker, tmp_path):
    now = clear_of_midnight()
    last_hour = now.replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=1)
    yesterday = now.astimezone(dt.UTC).date() - dt.timedelta(days=1)
    noon = dt.datetime.combine(yesterday, dt.time(12), tzinfo=dt.UTC)
    agent = AgentFactory()
    TaskExecutionFactory(
        agent=agent,
        status="completed",
        started_at=last_hour,
        completed_at=last_hour + dt.timedelta(minutes=1),
        execution_time_ms=60_000,
        tokens_used=3,
        cost_usd=Decimal("0.01"),
    )
    EventFactory(event_type=EventType.AGENT_STARTED, agent_id=agent.id, created_at=noon)

    app.send_task("orchestration.rollup_metrics", kwargs={"period": "hour", "period_start": last_hour.isoformat()})
    app.send_task("training_export.export_previous_day")

    wait_for(
        lambda: (
            AgentMetric.objects.filter(agent=agent, metric_type="tasks", period="hour", period_start=last_hour)
            .exclude(metric_value=0)
            .exists()
        ),
        timeout=30,
        what="the hourly rollup",
    )
    wait_for(
        lambda: ExportRun.objects.filter(status=ExportRun.Status.SUCCEEDED).count() == 5,
        timeout=60,
        what=f"the daily export ({worker.log_path})",
    )
    run = ExportRun.objects.get(data_type="events")
    assert run.window_start == noon.replace(hour=0) and run.rows == 1
    directory = tmp_path / "exports" / "events" / f"{yesterday}_{yesterday}"
    assert json.loads((directory / "events-train.jsonl").read_text())["created_at"] == noon.isoformat()


def test_the_pipeline_schedules_are_installed_and_name_registered_tasks(db):
    app.loader.import_default_modules()
    for name, (task, kwargs) in PIPELINE_TASKS.items():
        periodic = PeriodicTask.objects.get(name=name)
        assert periodic.task == task and task in app.tasks
        assert json.loads(periodic.kwargs) == kwargs
        assert periodic.crontab is not None and str(periodic.crontab.timezone) == "UTC"
    assert PeriodicTask.objects.get(name="retention").crontab.hour == "3"


def test_reinstalling_the_schedules_keeps_an_operators_edit(db):
    periodic = PeriodicTask.objects.get(name="retention")
    periodic.enabled = False
    periodic.kwargs = '{"note": "edited"}'
    periodic.save()
    PeriodicTask.objects.filter(name="rollup agent metrics hourly").delete()

    executor = MigrationExecutor(connection)
    migration = executor.loader.get_migration("orchestration", "0013_retention_and_pipeline_schedules")
    from django.apps import apps as global_apps

    migration.operations[1].code(global_apps, connection.schema_editor())

    periodic.refresh_from_db()
    assert (periodic.enabled, periodic.kwargs) == (False, '{"note": "edited"}')
    assert PeriodicTask.objects.filter(name="rollup agent metrics hourly").exists()
    call_command("check", stdout=io.StringIO())
