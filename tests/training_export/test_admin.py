"""The export runs in the operations console."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from tests.factories import ExportRunFactory, UserFactory
from training_export.models import ExportRun

pytestmark = pytest.mark.django_db

CHANGELIST = reverse("admin:training_export_exportrun_changelist")


def _change(run: ExportRun) -> str:
    return reverse("admin:training_export_exportrun_change", args=[run.pk])


@pytest.fixture
def su_client(client: Client) -> Client:
    client.force_login(UserFactory(is_staff=True, is_superuser=True))
    return client


def _delete(run: ExportRun) -> str:
    return reverse("admin:training_export_exportrun_delete", args=[run.pk])


def _queries(client: Client, url: str) -> int:
    with CaptureQueriesContext(connection) as queries:
        assert client.get(url).status_code == 200
    return len(queries.captured_queries)


def test_superuser_views_export_runs_but_cannot_add_or_edit_them(su_client: Client) -> None:
    run = ExportRunFactory(requested_by=UserFactory(), path="data/training/events.jsonl")

    changelist = su_client.get(CHANGELIST)
    change = su_client.get(_change(run))

    assert changelist.status_code == 200
    assert changelist.context["cl"].result_count == 1
    assert change.status_code == 200
    assert change.context["has_change_permission"] is False
    assert b'name="_save"' not in change.content
    assert b"data/training/events.jsonl" in change.content
    assert su_client.get(reverse("admin:training_export_exportrun_add")).status_code == 403
    assert su_client.post(_change(run), {"status": "succeeded"}).status_code == 403


def test_viewer_role_does_not_see_export_runs(client: Client) -> None:
    run = ExportRunFactory()
    client.force_login(UserFactory(role="viewer"))

    assert client.get(CHANGELIST).status_code == 403
    assert client.get(_change(run)).status_code == 403


def test_changelist_query_count_does_not_grow_with_rows(su_client: Client) -> None:
    def make(count: int) -> None:
        for _ in range(count):
            ExportRunFactory(requested_by=UserFactory())

    make(3)
    su_client.get(CHANGELIST)
    with_3_rows = _queries(su_client, CHANGELIST)
    make(12)

    assert _queries(su_client, CHANGELIST) == with_3_rows


def test_only_runs_retention_would_delete_can_be_deleted(su_client: Client) -> None:
    """A succeeded run is the record of its files (the API downloads through it); a pending or
    running one has a worker on its way to it."""
    kept = {status: ExportRunFactory(status=status) for status in ("succeeded", "pending", "running")}
    failed = ExportRunFactory(status="failed")

    for run in kept.values():
        refused = su_client.post(_delete(run), {"post": "yes"})
        assert refused.status_code == 200 and refused.context["protected"], run.status
    mixed = su_client.post(
        CHANGELIST, {"action": "delete_selected", "_selected_action": [failed.pk, kept["succeeded"].pk], "post": "yes"}
    )
    assert mixed.status_code == 200 and mixed.context["protected"]
    assert ExportRun.objects.count() == 4
    deleted = su_client.post(_delete(failed), {"post": "yes"})

    assert deleted.status_code == 302
    assert set(ExportRun.objects.values_list("status", flat=True)) == set(kept)


@pytest.mark.parametrize("how", ["delete page", "delete selected"])
def test_a_run_that_may_not_be_deleted_is_refused_saying_why(su_client: Client, how: str) -> None:
    """Even a superuser was told "your account doesn't have permission to delete ... export
    run" (the delete page answered 403): the page says why the run is kept."""
    run = ExportRunFactory(status="succeeded")
    if how == "delete page":
        page = su_client.get(_delete(run))
    else:
        page = su_client.post(CHANGELIST, {"action": "delete_selected", "_selected_action": [run.pk]})
    text = page.content.decode()

    assert page.status_code == 200
    assert "doesn&#x27;t have permission" not in text and "have permission" not in text
    assert f"Export run {run.pk}, {run}: a succeeded run is the record of its files" in text.replace("&#x27;", "'")
    assert "only failed and superseded runs can be deleted" in text
    assert ExportRun.objects.filter(pk=run.pk).exists()
