"""A worker of the release before run_task's retry said why it sent its message again: its
run_task takes the execution id only, as that release's did (the same body). For rolling-deploy
tests: `celery -A tests.orchestration.previous_release worker` (tests.engine.Worker(app=...))."""

from __future__ import annotations

import django
from celery import Task
from django.conf import settings
from django.db import InterfaceError, OperationalError, connections

from config.celery import app

django.setup()

from orchestration import tasks as current  # noqa: E402
from orchestration.services.execution import attempt_run  # noqa: E402
from orchestration.workers import current_process  # noqa: E402

del app.tasks[current.run_task.name]


@app.task(
    name="orchestration.run_task",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=30,
    Request="orchestration.workers:RunTaskRequest",
)
def run_task(self: Task, execution_id: str) -> str:
    delivery = self.request.delivery_info or {}
    try:
        return attempt_run(
            execution_id=execution_id,
            celery_task_id=self.request.id,
            worker=self.request.hostname or "",
            redelivered=bool(delivery.get("redelivered")),
            retried=self.request.retries > 0,
            process=current_process(),
        ).value
    except (InterfaceError, OperationalError) as exc:
        connections.close_all()
        cap = settings.TASK_CONNECTION_RETRY_MAX_COUNTDOWN_SECONDS
        raise self.retry(exc=exc, countdown=min(2 ** min(self.request.retries, 5), cap)) from exc
