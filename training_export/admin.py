from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from orchestration.admin.base import CheckedFiltersMixin, NoAddChangeMixin
from training_export.models import ExportRun


@admin.register(ExportRun)
class ExportRunAdmin(CheckedFiltersMixin, NoAddChangeMixin, admin.ModelAdmin):
    """Export runs are written by the export service; the admin shows what was exported. Only
    the runs retention would delete (failed, superseded) can be deleted here: a succeeded run is
    the record of its files (and what the API downloads), a pending or running one has a worker
    on its way to it. The delete page says so (get_deleted_objects)."""

    DELETABLE = (ExportRun.Status.FAILED, ExportRun.Status.SUPERSEDED)

    list_display = (
        "id",
        "data_type",
        "format",
        "window_start",
        "window_end",
        "status",
        "rows",
        "bytes",
        "requested_by",
        "started_at",
        "finished_at",
    )
    list_filter = ("status", "data_type", "format", "window_start", "created_at")
    list_select_related = ("requested_by",)
    search_fields = ("path", "=checksum", "requested_by__username")
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    fields = (
        ("data_type", "format"),
        ("window_start", "window_end"),
        "status",
        "requested_by",
        "path",
        ("rows", "bytes"),
        "checksum",
        ("schema_version", "watermark"),
        "error",
        ("started_at", "finished_at", "deadline_at"),
        ("created_at", "updated_at"),
    )

    KEPT_BECAUSE = {
        ExportRun.Status.SUCCEEDED: "a succeeded run is the record of its files, which the API downloads through it",
        ExportRun.Status.PENDING: "a pending run has a worker on its way to it",
        ExportRun.Status.RUNNING: "a running run has a worker on it",
    }

    def get_deleted_objects(
        self, objs: Any, request: HttpRequest
    ) -> tuple[list[Any], dict[str, int], set[str], list[str]]:
        """A run that may not be deleted is listed as protected, saying why, as Django lists a
        protected object (the delete page and the "delete selected" action then delete
        nothing): refusing it in has_delete_permission told even a superuser that the account
        may not delete export runs, or answered 403."""
        deleted, counts, perms_needed, protected = super().get_deleted_objects(objs, request)
        kept = [run for run in objs if run.status not in self.DELETABLE]
        for run in kept:
            why = self.KEPT_BECAUSE.get(run.status, f"a {run.status} run is kept")
            protected.append(f"Export run {run.pk}, {run}: {why}; only failed and superseded runs can be deleted")
        return deleted, counts, perms_needed, protected
