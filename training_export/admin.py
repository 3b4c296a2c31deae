from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from orchestration.admin.base import CheckedFiltersMixin, NoAddChangeMixin
from training_export.models import ExportRun


@admin.register(ExportRun)
class ExportRunAdmin(CheckedFiltersMixin, NoAddChangeMixin, admin.ModelAdmin):
    """Export runs are written by the export service; the admin shows what was exported. Only
    the runs retention would delete (failed, superseded) can be deleted here: a succeeded run is
    the record of its files (and what the API downloads), a pending or running one has a worker
    on its way to it."""

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

    def has_delete_permission(self, request: HttpRequest, obj: ExportRun | None = None) -> bool:
        return super().has_delete_permission(request, obj) and (obj is None or obj.status in self.DELETABLE)
