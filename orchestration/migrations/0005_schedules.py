"""Beat schedules of the execution engine (django-celery-beat, editable in the admin).

Created only when missing, so edits made in the admin survive later migrations.
"""

from django.db import migrations

SCHEDULES = [
    ("synapse event relay", "orchestration.relay_events", 1),
    ("reap stale tasks", "orchestration.reap_stale_tasks", 5),
]


def forwards(apps, schema_editor):
    interval_model = apps.get_model("django_celery_beat", "IntervalSchedule")
    task_model = apps.get_model("django_celery_beat", "PeriodicTask")
    for name, task, seconds in SCHEDULES:
        if task_model.objects.filter(name=name).exists():
            continue
        interval, _ = interval_model.objects.get_or_create(every=seconds, period="seconds")
        task_model.objects.create(name=name, task=task, interval=interval, queue="critical", expire_seconds=seconds * 2)


def backwards(apps, schema_editor):
    apps.get_model("django_celery_beat", "PeriodicTask").objects.filter(name__in=[s[0] for s in SCHEDULES]).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("orchestration", "0004_events_take_xid_first"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]

    operations = [migrations.RunPython(forwards, backwards)]
