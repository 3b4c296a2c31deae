from __future__ import annotations

import datetime as dt
from typing import Any

from django import forms
from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.safestring import SafeString

from orchestration.admin.base import (
    EMPTY,
    BoundedTabularInline,
    ChangedFieldsOnlyMixin,
    changelist_url,
    json_display,
    links,
    object_link,
    text_display,
    utc_storable,
)
from orchestration.admin.operations import Operation, OperationsMixin, console_actor, console_reason
from orchestration.admin.scale import IndexedRelatedOnlyFieldListFilter, IndexedValuesFieldListFilter, LargeTableAdmin
from orchestration.db import database_now
from orchestration.event_types import EventType
from orchestration.models import AgentInteraction, Event, TaskExecution, Workflow
from orchestration.services.events import Actor, workflow_event
from orchestration.services.workflows import (
    CANCELLABLE_WORKFLOW,
    RESUMABLE_WORKFLOW,
    workflow_cancel,
    workflow_resume,
)


def _failed_already(ended: list[Workflow]) -> str | None:
    """A cancel of a workflow that had failed already ends it failed (workflow_fail): say so."""
    failed = [str(workflow) for workflow in ended if workflow.status == Workflow.Status.FAILED]
    if not failed:
        return None
    return (
        f"Had failed already, so ended failed with their failure kept (their running tasks were cancelled): "
        f"{', '.join(failed)}."
    )


# A workflow's JSON documents that grow with its tasks (a list of workflows, or of what joins
# them, shows none of them).
WORKFLOW_DOCUMENTS = ("spec", "state_data", "step_results", "checkpoints", "metadata")

WORKFLOW_OPERATIONS = (
    Operation(
        "cancel",
        "cancel",
        "cancelled",
        lambda request, workflow: workflow_cancel(
            workflow_id=workflow.pk, reason=console_reason(request, "cancelled"), actor=console_actor(request)
        ),
        lambda workflow: workflow.status in CANCELLABLE_WORKFLOW,
        _failed_already,
    ),
    Operation(
        "resume",
        "resume",
        "resumed",
        lambda request, workflow: workflow_resume(workflow_id=workflow.pk, actor=console_actor(request)),
        lambda workflow: workflow.status in RESUMABLE_WORKFLOW,
    ),
)


class TaskExecutionInline(BoundedTabularInline):
    model = TaskExecution
    fk_name = "workflow"
    fields = (
        "task_link",
        "agent",
        "status",
        "priority",
        "depends_on_names",
        "retries",
        "tokens_used",
        "cost_usd",
        "started_at",
        "completed_at",
        "execution_time_ms",
    )
    readonly_fields = fields
    ordering = ("created_at", "execution_id")

    def get_queryset(self, request: HttpRequest) -> QuerySet[TaskExecution]:
        return super().get_queryset(request).select_related("agent")

    def all_url(self, obj: Workflow) -> str:
        return changelist_url(TaskExecution, {"workflow__workflow_id__exact": obj.pk})

    @admin.display(description="task")
    def task_link(self, obj: TaskExecution) -> SafeString:
        return object_link(TaskExecution, obj.pk, obj.task_name)

    @admin.display(description="depends on")
    def depends_on_names(self, obj: TaskExecution) -> str:
        return ", ".join(str(name) for name in obj.depends_on or []) or EMPTY

    @admin.display(description="retries")
    def retries(self, obj: TaskExecution) -> str:
        return f"{obj.retry_count}/{obj.max_retries}"


class WorkflowAdminForm(forms.ModelForm):
    """Refuses a new deadline already past, as a submission does (specs.py, on the database's
    clock, which every claim checks it on): the workflow would fail at its next claim, and a
    finished one could never be resumed."""

    def clean_deadline(self) -> dt.datetime | None:
        deadline = self.cleaned_data.get("deadline")
        if "deadline" not in self.changed_data or deadline is None:
            return deadline
        deadline = utc_storable(deadline)  # read in TIME_ZONE
        if deadline <= database_now():
            raise forms.ValidationError(f"{deadline.isoformat()} is in the past")
        return deadline


@admin.register(Workflow)
class WorkflowAdmin(OperationsMixin, ChangedFieldsOnlyMixin, LargeTableAdmin):
    """Workflows are submitted through the REST API (`workflow_submit`), which validates the
    task graph and writes the workflow, its tasks and the workflow_created event together;
    the admin edits only descriptive fields and never the state the engine owns. Nor does it
    delete a workflow: its attempts are the immutable record of what ran (retention deletes
    finished workflows, tasks and attempts together). Operators cancel a running workflow and
    resume a failed or cancelled one (orchestration.admin.operations)."""

    operations = WORKFLOW_OPERATIONS
    form = WorkflowAdminForm
    change_event = EventType.WORKFLOW_CHANGED

    list_display = (
        "workflow_id",
        "name",
        "workflow_type",
        "status",
        "priority",
        "owner",
        "progress",
        "total_tokens_used",
        "total_cost_usd",
        "created_at",
        "duration_ms",
    )
    list_display_links = ("workflow_id", "name")
    list_filter = (
        "status",
        "priority",
        ("workflow_type", IndexedValuesFieldListFilter),
        ("owner", IndexedRelatedOnlyFieldListFilter),
        "created_at",
        "started_at",
        "completed_at",
    )
    list_select_related = ("owner",)
    list_deferred = WORKFLOW_DOCUMENTS
    search_fields = ("=workflow_id", "name", "=idempotency_key", "owner__username", "initiator")
    client_chosen_ids = ("idempotency_key",)
    ordering = ("-created_at",)
    inlines = (TaskExecutionInline,)
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "workflow_id",
                    "name",
                    "description",
                    "workflow_type",
                    "status",
                    "priority",
                    "owner",
                    "initiator",
                    "idempotency_key",
                    "continue_on_failure",
                    "deadline",
                    "related",
                )
            },
        ),
        (
            "Progress",
            {
                "fields": (
                    "current_step",
                    ("total_steps", "completed_steps", "failed_steps"),
                    "error_count",
                    "error_display",
                )
            },
        ),
        (
            "Timing and usage",
            {
                "fields": (
                    ("created_at", "updated_at"),
                    ("started_at", "completed_at", "duration_ms"),
                    ("total_tokens_used", "total_cost_usd", "wasted_cost_usd"),
                )
            },
        ),
        (
            "Data",
            {
                "fields": (
                    "spec_display",
                    "state_data_display",
                    "step_results_display",
                    "assigned_agents_display",
                    "checkpoints_display",
                    "tags_display",
                    "metadata_display",
                )
            },
        ),
    )
    readonly_fields = (
        "workflow_id",
        "status",
        "owner",
        "initiator",
        "idempotency_key",
        "related",
        "current_step",
        "total_steps",
        "completed_steps",
        "failed_steps",
        "error_count",
        "error_display",
        "created_at",
        "updated_at",
        "started_at",
        "completed_at",
        "duration_ms",
        "total_tokens_used",
        "total_cost_usd",
        "wasted_cost_usd",
        "spec_display",
        "state_data_display",
        "step_results_display",
        "assigned_agents_display",
        "checkpoints_display",
        "tags_display",
        "metadata_display",
    )

    error_display = text_display("error")
    spec_display = json_display("spec")
    state_data_display = json_display("state_data", "state data")
    step_results_display = json_display("step_results", "step results")
    assigned_agents_display = json_display("assigned_agents", "assigned agents")
    checkpoints_display = json_display("checkpoints")
    tags_display = json_display("tags")
    metadata_display = json_display("metadata")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Workflow | None = None) -> bool:
        return False

    def change_record(self, obj: Workflow, changes: dict[str, dict[str, Any]], actor: Actor) -> None:
        workflow_event(obj, EventType.WORKFLOW_CHANGED, payload={"changes": changes, **actor})

    @admin.display(description="steps done/total (failed)")
    def progress(self, obj: Workflow) -> str:
        return f"{obj.completed_steps}/{obj.total_steps} ({obj.failed_steps})"

    @admin.display(description="related")
    def related(self, obj: Workflow) -> SafeString:
        return links(
            [
                (changelist_url(Event, {"workflow_id": obj.pk}), "events"),
                (changelist_url(TaskExecution, {"workflow__workflow_id__exact": obj.pk}), "tasks"),
                (changelist_url(AgentInteraction, {"workflow__workflow_id__exact": obj.pk}), "agent interactions"),
            ]
        )
