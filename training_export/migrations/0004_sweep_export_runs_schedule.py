"""Beat schedule of the export-run sweeper (django-celery-beat, editable in the admin).

Created only when missing, so edits made in the admin survive later migrations.
"""

from django.db import migrations

NAME = "sweep export runs"
TASK = "training_export.sweep_export_runs"
EVERY_SECONDS = 300


def forwards(apps, schema_editor):
    interval_model = apps.get_model("django_celery_beat", "IntervalSchedule")
    task_model = apps.get_model("django_celery_beat", "PeriodicTask")
    if task_model.objects.filter(name=NAME).exists():
        return
    interval, _ = interval_model.objects.get_or_create(every=EVERY_SECONDS, period="seconds")
    task_model.objects.create(
        name=NAME, task=TASK, interval=interval, queue="critical", expire_seconds=EVERY_SECONDS * 2
    )


def backwards(apps, schema_editor):
    apps.get_model("django_celery_beat", "PeriodicTask").objects.filter(name=NAME).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("training_export", "0003_export_runs_superseded"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]

    operations = [migrations.RunPython(forwards, backwards)]
