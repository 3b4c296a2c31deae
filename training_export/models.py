from django.conf import settings
from django.db import models

from orchestration.models.base import TimestampedModel, in_choices


class ExportRunDataType(models.TextChoices):
    EVENTS = "events"
    TASKS = "tasks"
    TOOL_EXECUTIONS = "tool_executions"
    WORKFLOWS = "workflows"
    CONVERSATIONS = "conversations"
    ALL = "all"


class ExportRunFormat(models.TextChoices):
    JSONL = "jsonl"
    CSV = "csv"
    CHAT_JSONL = "chat_jsonl", "chat fine-tuning JSONL"


class ExportRunStatus(models.TextChoices):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SUPERSEDED = "superseded", "superseded by a later run of the same window"


class ExportRun(TimestampedModel):
    """One export of training data for a type and a window. Makes exports visible in the
    admin and idempotent: a window already exported successfully is not written again."""

    DataType = ExportRunDataType

    Format = ExportRunFormat

    Status = ExportRunStatus

    data_type = models.CharField(max_length=30, choices=DataType.choices)
    format = models.CharField(max_length=20, choices=Format.choices, default=Format.JSONL)
    window_start = models.DateTimeField()
    window_end = models.DateTimeField()
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING)
    path = models.CharField(max_length=1000, blank=True, default="")
    rows = models.BigIntegerField(default=0)
    bytes = models.BigIntegerField(default=0)
    checksum = models.CharField(max_length=64, blank=True, default="", help_text="sha256 of the file")
    schema_version = models.CharField(max_length=20, blank=True, default="")
    watermark = models.CharField(max_length=100, blank=True, default="", help_text="data read up to here")
    error = models.TextField(null=True, blank=True)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="export_runs",
        db_column="requested_by_id",
    )
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    deadline_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="a run still running after this was lost (set for runs in Celery workers, which have a hard "
        "time limit; a run from manage.py has none)",
    )

    class Meta:
        db_table = "export_runs"
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["data_type", "window_start"], name="idx_export_runs_type_window"),
            models.Index(fields=["status"], name="idx_export_runs_status"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=in_choices("data_type", ExportRunDataType), name="export_runs_data_type_valid"
            ),
            models.CheckConstraint(condition=in_choices("format", ExportRunFormat), name="export_runs_format_valid"),
            models.CheckConstraint(condition=in_choices("status", ExportRunStatus), name="export_runs_status_valid"),
            models.CheckConstraint(
                condition=models.Q(window_end__gt=models.F("window_start")), name="export_runs_window_order"
            ),
            models.CheckConstraint(
                condition=models.Q(rows__gte=0, bytes__gte=0), name="export_runs_sizes_non_negative"
            ),
            models.UniqueConstraint(
                fields=["data_type", "format", "window_start", "window_end"],
                condition=models.Q(status="succeeded"),
                name="export_runs_one_success_per_window",
            ),
            # Requests for a window already waiting for a worker get that run back, even when
            # they race (export_runs_request): one pending run per type and window.
            models.UniqueConstraint(
                fields=["data_type", "format", "window_start", "window_end"],
                condition=models.Q(status="pending"),
                name="export_runs_one_pending_per_window",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.data_type} {self.window_start:%Y-%m-%d}..{self.window_end:%Y-%m-%d} [{self.status}]"
