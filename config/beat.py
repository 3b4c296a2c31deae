"""The beat scheduler: django-celery-beat's DatabaseScheduler (schedules in the database, edited in
the admin), reading every enabled entry.

django-celery-beat 2.8+ reads only the crontab entries whose hour is within two hours of the
current one (and 4, for Celery's own cleanup), sliding that window at each reread. An entry whose
run was missed while beat was away is sent when beat starts only if its hour is near: beat back at
08:00 sent the 00:30 daily export, the 00:15 daily rollup and the 03:00 retention at 22:00 and
01:00, most of a day after it came back, and their catch-up with them. The schedule is a handful
of rows: all of them are read.
"""

from __future__ import annotations

from django.db.models import QuerySet
from django_celery_beat.models import PeriodicTask
from django_celery_beat.schedulers import DatabaseScheduler as _DatabaseScheduler


class DatabaseScheduler(_DatabaseScheduler):
    def enabled_models_qs(self) -> QuerySet[PeriodicTask]:
        return self.Model.objects.enabled()
