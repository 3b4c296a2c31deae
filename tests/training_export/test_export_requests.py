"""Requests for a window already waiting for a worker get that run back, also when they race."""

from __future__ import annotations

import datetime as dt
import importlib
import threading
from concurrent.futures import ThreadPoolExecutor

from django.apps import apps
from django.db import connection, connections

from training_export.models import ExportRun
from training_export.services import export as export_service
from training_export.services.export import export_runs_request, window_for

DAY = dt.date(2024, 3, 5)


def test_a_second_request_for_a_pending_window_gets_the_same_run_and_sends_nothing(
    db, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks() as first_callbacks:
        first = export_runs_request(data_types=["events"], start_date=DAY, end_date=DAY)
    with django_capture_on_commit_callbacks() as second_callbacks:
        second = export_runs_request(data_types=["events", "tasks"], start_date=DAY, end_date=DAY)
    assert len(first_callbacks) == 1 and len(second_callbacks) == 1  # the second only for tasks
    assert second.queued[0].pk == first.queued[0].pk
    assert ExportRun.objects.filter(data_type="events", status="pending").count() == 1
    assert ExportRun.objects.filter(data_type="tasks", status="pending").count() == 1


def test_concurrent_requests_for_one_window_queue_one_run(transactional_db, monkeypatch):
    sent: list[int] = []
    lock = threading.Lock()

    def enqueue(run_ids: list[int]) -> None:
        with lock:
            sent.extend(run_ids)

    monkeypatch.setattr(export_service, "_enqueue", enqueue)
    barrier = threading.Barrier(6)

    def request() -> int:
        try:
            barrier.wait()
            return export_runs_request(data_types=["events"], start_date=DAY, end_date=DAY).queued[0].pk
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(lambda _: request(), range(6)))
    [run] = ExportRun.objects.filter(data_type="events")
    assert answers == [run.pk] * 6
    assert sent == [run.pk]


def test_the_migration_fails_duplicate_pending_runs_and_keeps_the_oldest(db):
    constraint = next(c for c in ExportRun._meta.constraints if c.name == "export_runs_one_pending_per_window")
    window = window_for(DAY, DAY)
    with connection.schema_editor() as editor:  # undone with the test's transaction
        editor.remove_constraint(ExportRun, constraint)
    same = {"data_type": "events", "format": "jsonl", "window_start": window.start, "window_end": window.end}
    oldest, duplicate = ExportRun.objects.create(**same), ExportRun.objects.create(**same)
    other_type = ExportRun.objects.create(**{**same, "data_type": "tasks"})
    migration = importlib.import_module("training_export.migrations.0006_export_runs_one_pending_per_window")
    migration.fail_duplicate_pending_runs(apps, None)
    with connection.cursor() as cursor:
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")  # no pending foreign-key checks before DDL
    with connection.schema_editor() as editor:  # the rows left now satisfy the constraint
        editor.add_constraint(ExportRun, constraint)
    statuses = dict(ExportRun.objects.values_list("pk", "status"))
    assert statuses == {oldest.pk: "pending", duplicate.pk: "failed", other_type.pk: "pending"}
    duplicate.refresh_from_db()
    assert duplicate.error == f"a duplicate request of pending export run {oldest.pk}"


def test_requests_naming_types_in_opposite_orders_do_not_deadlock(transactional_db, monkeypatch):
    monkeypatch.setattr(export_service, "_enqueue", lambda run_ids: None)
    barrier = threading.Barrier(2)

    def request(types: list[str]) -> list[int]:
        try:
            barrier.wait()
            return sorted(run.pk for run in export_runs_request(data_types=types, start_date=DAY, end_date=DAY).queued)
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=2) as pool:
        answers = list(pool.map(request, [["events", "tasks", "workflows"], ["workflows", "tasks", "events"]]))
    assert answers[0] == answers[1]
    assert ExportRun.objects.filter(status="pending").count() == 3
