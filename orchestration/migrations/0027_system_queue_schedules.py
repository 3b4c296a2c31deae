"""The recovery schedules (event relay, reaper, export-run sweep) move from the `critical`
queue, which user tasks of critical priority share, to `system`: a worker whose processes all
hold long user tasks would otherwise hold them back too, and with them the Synapse stream and
the record of lost work. Every worker of the documented commands consumes `system` as well;
compose adds a small worker that consumes only it (`worker-system`).

Only entries still on `critical` move: a queue chosen in the admin stays as it was."""

from typing import Any

from django.db import migrations

RECOVERY = ("synapse event relay", "reap stale tasks", "sweep export runs")


def _move(apps: Any, old: str, new: str) -> None:
    task_model = apps.get_model("django_celery_beat", "PeriodicTask")
    task_model.objects.filter(name__in=RECOVERY, queue=old).update(queue=new)


def forwards(apps: Any, schema_editor: Any) -> None:
    _move(apps, "critical", "system")


def backwards(apps: Any, schema_editor: Any) -> None:
    _move(apps, "system", "critical")


class Migration(migrations.Migration):
    dependencies = [
        ("orchestration", "0026_workflows_wasted_cost"),
        ("training_export", "0004_sweep_export_runs_schedule"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]

    operations = [migrations.RunPython(forwards, backwards)]
