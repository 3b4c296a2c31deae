"""Input and output shapes of the exports API. Every field of a run is server-owned."""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.conf import settings
from django.urls import reverse
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from orchestration.api.serializers import StrictFieldsMixin
from orchestration.isodates import is_iso_day_form
from training_export.api.filters import DAY_FORM, DAY_FORMATS
from training_export.models import ExportRun
from training_export.services.export import DATA_TYPES, export_relative_path, run_days

ALL = "all"
# An API export runs on a shared worker queue; longer backfills are for the command.
MAX_WINDOW_DAYS = 366


class IsoDayField(serializers.DateField):
    """A UTC day written YYYY-MM-DD (orchestration.isodates): `%Y-%m-%d` alone would read
    `2024-3-5` too."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(input_formats=DAY_FORMATS, **kwargs)

    def to_internal_value(self, value: Any) -> dt.date:
        if isinstance(value, str) and not is_iso_day_form(value):
            self.fail("invalid", format=DAY_FORM)
        return super().to_internal_value(value)


class ExportRequestSerializer(StrictFieldsMixin, serializers.Serializer):
    """A request to export data types over a window of UTC days."""

    data_type = serializers.ChoiceField(
        choices=[*DATA_TYPES, ALL], help_text="the type to export, or `all` for every type"
    )
    # YYYY-MM-DD only (as the list's filters): DRF's ISO 8601 reads `2020-W01-1` as 30 December
    # 2019 and takes `20200101` too, days the client may not have meant.
    start_date = IsoDayField(help_text="first UTC day, YYYY-MM-DD")
    end_date = IsoDayField(help_text="last UTC day (included), YYYY-MM-DD")
    force = serializers.BooleanField(
        required=False, default=False, help_text="export again even if the window was exported and is intact"
    )

    def validate_end_date(self, value: dt.date) -> dt.date:
        if value >= dt.date.max:
            raise serializers.ValidationError(f"must be before {dt.date.max.isoformat()}")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        start, end = attrs["start_date"], attrs["end_date"]
        if end < start:
            raise serializers.ValidationError({"end_date": f"{end} is before start_date {start}"})
        if (end - start).days + 1 > MAX_WINDOW_DAYS:
            raise serializers.ValidationError(
                {"end_date": f"the window is {(end - start).days + 1} days; at most {MAX_WINDOW_DAYS} per request"}
            )
        return attrs


class ExportRunSerializer(serializers.ModelSerializer):
    """An export run with the facts of its manifest."""

    start_date = serializers.SerializerMethodField(help_text="first UTC day of the window")
    end_date = serializers.SerializerMethodField(help_text="last UTC day of the window (included)")
    sha256 = serializers.CharField(source="checksum", help_text="sha256 of the data file (empty until succeeded)")
    path = serializers.SerializerMethodField(help_text="the data file below the export directory")
    error = serializers.SerializerMethodField()
    requested_by = serializers.SerializerMethodField(help_text="username of who asked for it (none: beat or command)")
    download = serializers.SerializerMethodField(help_text="URL of the data file, once the run succeeded")

    class Meta:
        model = ExportRun
        fields = (
            "id",
            "data_type",
            "format",
            "status",
            "start_date",
            "end_date",
            "window_start",
            "window_end",
            "rows",
            "bytes",
            "sha256",
            "schema_version",
            "watermark",
            "path",
            "error",
            "requested_by",
            "created_at",
            "started_at",
            "finished_at",
            "download",
        )
        read_only_fields = fields

    @extend_schema_field(serializers.DateField())
    def get_start_date(self, run: ExportRun) -> str:
        return run_days(run)[0].isoformat()

    @extend_schema_field(serializers.DateField())
    def get_end_date(self, run: ExportRun) -> str:
        return run_days(run)[1].isoformat()

    def get_path(self, run: ExportRun) -> str:
        return export_relative_path(run.path)

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_error(self, run: ExportRun) -> str | None:
        if run.error is None:
            return None
        # An OS error names the file it failed on: show it below the export directory only.
        return run.error.replace(str(settings.TRAINING_EXPORT_DIR), "<export dir>")

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_requested_by(self, run: ExportRun) -> str | None:
        return run.requested_by.get_username() if run.requested_by is not None else None

    @extend_schema_field(serializers.URLField(allow_null=True))
    def get_download(self, run: ExportRun) -> str | None:
        if run.status != ExportRun.Status.SUCCEEDED:
            return None
        url = reverse("api:export-download", kwargs={"pk": run.pk})
        request = self.context.get("request")
        return request.build_absolute_uri(url) if request is not None else url


class ExportAcceptedSerializer(serializers.Serializer):
    status = serializers.ChoiceField(
        choices=["accepted", "already_exported"],
        help_text="`accepted` (202): runs were queued, poll them; `already_exported` (200): every requested "
        "window was exported before and its files are intact, nothing was queued",
    )
    queued = serializers.ListField(child=serializers.IntegerField(), help_text="ids of the runs queued now")
    already_exported = serializers.ListField(
        child=serializers.IntegerField(), help_text="ids of earlier succeeded runs returned instead (no `force`)"
    )
    runs = ExportRunSerializer(many=True)
