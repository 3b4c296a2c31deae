"""The beat process (config/beat.py's scheduler, django-celery-beat's tables) run for real: what it
sends when it comes back after being away."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys

import pytest
import redis
from django.conf import settings
from django.utils import timezone
from django_celery_beat.models import CrontabSchedule, PeriodicTask

from tests.engine import ROOT, database_url, flush_redis, wait_for

EXPORT = "export training data (previous UTC day)"


def _sent(client: redis.Redis, queue: str) -> list[str]:
    return [json.loads(raw)["headers"]["task"] for raw in client.lrange(queue, 0, -1)]


@pytest.mark.subprocess
@pytest.mark.django_db(transaction=True)
def test_beat_back_after_days_away_sends_a_missed_daily_entry_at_once_whatever_the_hour(tmp_path):
    """Beat (or its host) was down across midnight for days: started again, it sends each crontab
    entry whose run was missed, and the task catches up the missed days. django-celery-beat 2.8+
    reads only the crontab entries whose hour is within two hours of the current one: beat back at
    08:00 sent the 00:30 export, the 00:15 daily rollup and the 03:00 retention only once their
    hour came near (22:00 and 01:00), most of a day later. The entry's hour here is 12 hours from
    now, whenever the test runs."""
    now = timezone.now()
    hour = (now.hour + 12) % 24
    # The entry as migration 0013 installs it (made here: a transactional test before this one
    # flushed the migrations' rows), alone on the schedule.
    PeriodicTask.objects.all().delete()
    PeriodicTask.objects.create(
        name=EXPORT,
        task="training_export.export_previous_day",
        crontab=CrontabSchedule.objects.create(minute="30", hour=str(hour), timezone="UTC"),
        kwargs="{}",
        queue="low",
        last_run_at=now - dt.timedelta(days=3),
    )
    flush_redis()
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": database_url(),
        "REDIS_URL": settings.REDIS_URL,
        "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
    }
    log = (tmp_path / "beat.log").open("w")
    beat = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "config", "beat", "-l", "info", "--pidfile=", "-s", str(tmp_path / "s")],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(
            lambda: "training_export.export_previous_day" in _sent(client, "low"),
            timeout=30,
            what=f"beat to send the missed export (crontab hour {hour}, now {now:%H:%M} UTC)",
        )
    finally:
        beat.terminate()
        beat.wait(timeout=15)
        log.close()
        flush_redis()
