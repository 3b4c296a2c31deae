"""The pipeline's crontab entries (rollups, the daily export, retention) expire before their
next run: a message left waiting on its queue (no worker consuming `low`, a backlog of user
tasks, a worker down for a day) is dropped instead of running late next to the fresh ones (a
day of hourly rollups would otherwise run 24 times at once). Each task catches up what a
dropped run missed: the rollups the periods with no metrics, the export the days a type missed,
retention whatever is older than its cutoff.

Only entries with no expiry of their own are set: an expiry chosen in the admin stays."""

from typing import Any

from django.db import migrations

EXPIRE_SECONDS = {
    "rollup agent metrics hourly": 3600,
    "rollup agent metrics daily": 86400,
    "export training data (previous UTC day)": 86400,
    "retention": 86400,
}


def forwards(apps: Any, schema_editor: Any) -> None:
    task_model = apps.get_model("django_celery_beat", "PeriodicTask")
    for name, seconds in EXPIRE_SECONDS.items():
        task_model.objects.filter(name=name, expire_seconds__isnull=True, expires__isnull=True).update(
            expire_seconds=seconds
        )


def backwards(apps: Any, schema_editor: Any) -> None:
    task_model = apps.get_model("django_celery_beat", "PeriodicTask")
    for name, seconds in EXPIRE_SECONDS.items():
        task_model.objects.filter(name=name, expire_seconds=seconds).update(expire_seconds=None)


class Migration(migrations.Migration):
    dependencies = [
        ("orchestration", "0030_events_task_ended_late"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]

    operations = [migrations.RunPython(forwards, backwards)]
