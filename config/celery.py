"""The Celery application. Settings come from Django settings under the CELERY_ namespace."""

import os

from celery import Celery
from celery.signals import task_prerun

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")

app = Celery("agentledger")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@task_prerun.connect
def _drop_unusable_connections(**kwargs: object) -> None:
    """Before each task, drop database connections that errored, were left in a transaction
    or outlived CONN_MAX_AGE, as Django does at the start of each request."""
    from django.db import close_old_connections, connections

    close_old_connections()
    # close_old_connections re-arms Django's per-request health check (a SELECT 1 round trip).
    # A worker does not pay it per task: a connection that breaks mid-task raises, is marked
    # errored and is checked (and dropped) here before the next one, and run_task retries.
    for connection in connections.all(initialized_only=True):
        if connection.connection is not None:
            connection.health_check_done = True
