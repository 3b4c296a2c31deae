from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin
from django.db.models import CharField, Q, QuerySet
from django.db.models.functions import Cast
from django.http import HttpRequest
from django.utils.safestring import SafeString

from orchestration.admin.base import (
    EMPTY,
    BoundedTabularInline,
    ChangedFieldsOnlyMixin,
    EventsShownMixin,
    RecordOnlyMixin,
    changelist_url,
    events_table,
    json_display,
    link,
    object_link,
    text_display,
)
from orchestration.admin.operations import Operation, OperationsMixin, console_actor, console_reason
from orchestration.admin.scale import IndexedRelatedOnlyFieldListFilter, LargeTableAdmin
from orchestration.admin.workflows import WORKFLOW_DOCUMENTS
from orchestration.errors import TransitionError
from orchestration.event_types import EntityType, EventType
from orchestration.models import Event, TaskAttempt, TaskExecution, Workflow
from orchestration.services.conversations import is_conversation_reply
from orchestration.services.events import Actor, task_event
from orchestration.services.workflows import (
    RETRIABLE_TASK,
    TASK_DISPATCH_FIELDS,
    task_cancel,
    task_dispatch_change_check,
    task_retry,
)

TASK_EVENTS_SHOWN = 200
# A task's input and output (a model's whole answer), which no list shows.
TASK_DOCUMENTS = ("input_data", "output_data", "metadata")
# Who may read the conversations (the message list refuses the others).
VIEW_MESSAGES = "orchestration.view_agentplaygroundmessage"


def task_events(execution: TaskExecution) -> QuerySet[Event]:
    """Events of a task, including those of its attempts: the engine records those as task
    events with the attempt number in the payload; events with entity_type "attempt" (entity_id
    the attempt's id) are included as well."""
    attempt_ids = TaskAttempt.objects.filter(execution=execution).annotate(id_text=Cast("id", CharField()))
    return Event.objects.filter(
        Q(entity_type=EntityType.TASK, entity_id=execution.pk)
        | Q(entity_type=EntityType.ATTEMPT, entity_id__in=attempt_ids.values("id_text"))
    ).order_by("sequence")


class TaskAttemptInline(BoundedTabularInline):
    model = TaskAttempt
    fields = (
        "attempt_link",
        "status",
        "cause",
        "error_class",
        "error_display",
        "worker",
        "delivery_count",
        "redelivered",
        "tokens_used",
        "cost_usd",
        "started_at",
        "finished_at",
        "duration_ms",
        "timeout_seconds",
    )
    readonly_fields = fields
    ordering = ("attempt_number",)
    error_display = text_display("error")

    @admin.display(description="attempt")
    def attempt_link(self, obj: TaskAttempt) -> SafeString:
        return object_link(TaskAttempt, obj.pk, obj.attempt_number)

    def all_url(self, obj: TaskExecution) -> str:
        return changelist_url(TaskAttempt, {"execution__execution_id__exact": obj.pk})


def task_limits() -> dict[str, tuple[int, int, str]]:
    """The ranges a submitted spec is held to (specs.py), with the setting that bounds each: a
    timeout above TASK_MAX_TIMEOUT_SECONDS outlasts the broker's visibility timeout, which is
    sized for it, and a healthy task would be delivered twice."""
    return {
        "max_retries": (0, settings.TASK_MAX_RETRIES_LIMIT, "TASK_MAX_RETRIES_LIMIT"),
        "timeout_seconds": (1, settings.TASK_MAX_TIMEOUT_SECONDS, "TASK_MAX_TIMEOUT_SECONDS"),
    }


class TaskExecutionAdminForm(forms.ModelForm):
    """Holds a changed limit to the range the API holds it to, and refuses a new timeout or
    priority while the task's message is in the broker (task_dispatch_change_check)."""

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        for name, (low, high, setting) in task_limits().items():
            value = cleaned.get(name)
            if name in self.changed_data and value is not None and not low <= value <= high:
                self.add_error(name, f"must be between {low} and {high} ({setting})")
        if self.instance.pk and not self.errors and set(TASK_DISPATCH_FIELDS) & set(self.changed_data):
            # The change view's transaction holds the locks taken here until the change is saved.
            try:
                task_dispatch_change_check(execution_id=self.instance.pk)
            except TransitionError as exc:
                raise forms.ValidationError(str(exc)) from None
        return cleaned


TASK_OPERATIONS = (
    Operation(
        "cancel",
        "cancel",
        "cancelled",
        lambda request, task: task_cancel(
            execution_id=task.pk, reason=console_reason(request, "cancelled"), actor=console_actor(request)
        ),
        lambda task: not task.is_terminal,
    ),
    Operation(
        "retry",
        "retry",
        "retried",
        lambda request, task: task_retry(execution_id=task.pk, actor=console_actor(request)),
        lambda task: task.status in RETRIABLE_TASK,
    ),
)


@admin.register(TaskExecution)
class TaskExecutionAdmin(OperationsMixin, ChangedFieldsOnlyMixin, EventsShownMixin, LargeTableAdmin):
    """Tasks are created with their workflow (REST API); the admin edits only the task's
    description, priority and limits, never the state the engine owns. A task is not deleted
    here: its workflow counts it (total_steps, the progress counters, usage) and its attempts
    are the immutable record of what ran. Operators cancel an unfinished task and retry a
    failed, timed-out or cancelled one (orchestration.admin.operations)."""

    operations = TASK_OPERATIONS
    form = TaskExecutionAdminForm
    change_event = EventType.TASK_CHANGED

    list_display = (
        "execution_id",
        "task_name",
        "workflow_link",
        "agent",
        "status",
        "priority",
        "retry_count",
        "tokens_used",
        "cost_usd",
        "created_at",
        "execution_time_ms",
    )
    list_display_links = ("execution_id", "task_name")
    list_filter = (
        "status",
        "priority",
        "agent",
        ("workflow__owner", IndexedRelatedOnlyFieldListFilter),
        "created_at",
        "started_at",
        "completed_at",
    )
    list_select_related = ("workflow", "agent")
    list_deferred = (
        *TASK_DOCUMENTS,
        *(f"workflow__{name}" for name in WORKFLOW_DOCUMENTS),
        *(f"parent_task__{name}" for name in TASK_DOCUMENTS),
    )
    search_fields = (
        "=execution_id",
        "task_name",
        "=workflow__workflow_id",
        "workflow__name",
        # The Celery id a worker logged is its attempt's (indexed there; not on the task).
        "=attempts__celery_task_id",
        "worker",
    )
    # Ids of new_id() and Celery's uuid4() (a paste upper-cased is found too). Matched by
    # Django's search, a term in no row cost 2.3-4 s a page at 900 000 tasks: UPPER() of each id
    # and the attempts joined and read DISTINCT; the names' substrings alone cost a tenth of it.
    lower_case_ids = ("execution_id", "workflow__workflow_id", "attempts__celery_task_id")
    ordering = ("-created_at",)
    inlines = (TaskAttemptInline,)
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "execution_id",
                    "task_name",
                    "workflow",
                    "agent",
                    "parent_task",
                    "task_type",
                    "description",
                    "status",
                    "priority",
                    "depends_on_display",
                )
            },
        ),
        ("Limits and retries", {"fields": (("max_retries", "retry_count"), "timeout_seconds")}),
        (
            "Execution",
            {
                "fields": (
                    ("celery_task_id", "worker"),
                    ("created_at", "updated_at"),
                    ("queued_at", "started_at", "completed_at"),
                    "execution_time_ms",
                    "error_display",
                )
            },
        ),
        ("Usage", {"fields": (("input_tokens", "output_tokens", "tokens_used"), "cost_usd")}),
        ("Data", {"fields": ("input_data_display", "output_data_display", "metadata_display")}),
        ("Events", {"fields": ("events_link", "events_display")}),
    )
    readonly_fields = (
        "execution_id",
        "task_name",
        "workflow",
        "agent",
        "parent_task",
        "task_type",
        "status",
        "depends_on_display",
        "retry_count",
        "celery_task_id",
        "worker",
        "created_at",
        "updated_at",
        "queued_at",
        "started_at",
        "completed_at",
        "execution_time_ms",
        "error_display",
        "input_tokens",
        "output_tokens",
        "tokens_used",
        "cost_usd",
        "input_data_display",
        "output_data_display",
        "metadata_display",
        "events_link",
        "events_display",
    )

    error_display = text_display("error")
    depends_on_display = json_display("depends_on", "depends on")
    input_data_display = json_display("input_data", "input data")
    output_data_display = json_display("output_data", "output data")
    metadata_display = json_display("metadata")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: TaskExecution | None = None) -> bool:
        return False

    def get_queryset(self, request: HttpRequest) -> QuerySet[TaskExecution]:
        return super().get_queryset(request).select_related("workflow", "agent", "parent_task")

    def get_fieldsets(self, request: HttpRequest, obj: TaskExecution | None = None) -> Any:
        """A conversation's reply task shows its data (the user's message, the agent's reply)
        only to staff who may view the conversation messages: the viewer role may view tasks,
        not conversations, and read every user's here."""
        fieldsets = super().get_fieldsets(request, obj)
        if obj is None or request.user.has_perm(VIEW_MESSAGES):
            return fieldsets
        if not is_conversation_reply(workflow_id=obj.workflow_id, task_type=obj.task_type):
            return fieldsets
        return [(name, options) for name, options in fieldsets if name != "Data"]

    def change_record(self, obj: TaskExecution, changes: dict[str, dict[str, Any]], actor: Actor) -> None:
        task_event(obj, EventType.TASK_CHANGED, payload={"changes": changes, **actor})

    @admin.display(description="workflow", ordering="workflow__name")
    def workflow_link(self, obj: TaskExecution) -> SafeString | str:
        if obj.workflow is None:
            return EMPTY
        return object_link(Workflow, obj.workflow_id, obj.workflow.name)

    @admin.display(description="all events")
    def events_link(self, obj: TaskExecution) -> SafeString:
        return link(changelist_url(Event, {"entity_id": obj.pk}), "events of this task in the event list")

    @admin.display(description="events of the task and its attempts")
    def events_display(self, obj: TaskExecution) -> SafeString:
        return events_table(task_events(obj)[: TASK_EVENTS_SHOWN + 1], limit=TASK_EVENTS_SHOWN)


@admin.register(TaskAttempt)
class TaskAttemptAdmin(RecordOnlyMixin, EventsShownMixin, LargeTableAdmin):
    """Attempts are written by the execution engine; a finished one is immutable in the database,
    and none is deleted here (the database's rule is on UPDATE: a DELETE would go through)."""

    list_display = (
        "id",
        "execution_link",
        "workflow_link",
        "attempt_number",
        "status",
        "cause",
        "error_class",
        "worker",
        "redelivered",
        "tokens_used",
        "cost_usd",
        "started_at",
        "duration_ms",
    )
    list_filter = ("status", "cause", "redelivered", "retryable", "execution__agent", "started_at", "finished_at")
    list_select_related = ("execution__workflow",)
    list_deferred = (
        "traceback",
        *(f"execution__{name}" for name in TASK_DOCUMENTS),
        *(f"execution__workflow__{name}" for name in WORKFLOW_DOCUMENTS),
    )
    search_fields = (
        "=execution__execution_id",
        "execution__task_name",
        "=execution__workflow__workflow_id",
        "=celery_task_id",
        "worker",
        "error_class",
    )
    # The order they started in (an attempt is written as it starts), read from the primary key:
    # started_at has no index of its own, and sorting the table for a page took seconds.
    ordering = ("-id",)
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "execution",
                    "workflow_link",
                    "attempt_number",
                    "status",
                    ("cause", "retryable"),
                    "error_class",
                    "error_display",
                    "traceback_display",
                )
            },
        ),
        (
            "Delivery",
            {
                "fields": (
                    ("worker", "celery_task_id"),
                    ("worker_pid", "worker_started_at", "pool_pid"),
                    ("delivery_count", "redelivered"),
                    "timeout_seconds",
                )
            },
        ),
        (
            "Timing and usage",
            {
                "fields": (
                    ("started_at", "finished_at", "duration_ms"),
                    ("input_tokens", "output_tokens", "tokens_used"),
                    "cost_usd",
                    ("created_at", "updated_at"),
                )
            },
        ),
        ("Events", {"fields": ("events_display",)}),
    )
    readonly_fields = ("workflow_link", "error_display", "traceback_display", "events_display")
    error_display = text_display("error")
    traceback_display = text_display("traceback")

    @admin.display(description="task", ordering="execution__task_name")
    def execution_link(self, obj: TaskAttempt) -> SafeString:
        return object_link(TaskExecution, obj.execution_id, obj.execution.task_name)

    @admin.display(description="workflow")
    def workflow_link(self, obj: TaskAttempt) -> SafeString | str:
        workflow = obj.execution.workflow
        return EMPTY if workflow is None else object_link(Workflow, workflow.pk, workflow.name)

    @admin.display(description="events of this attempt")
    def events_display(self, obj: TaskAttempt) -> SafeString:
        # The engine records attempt events as task events naming the attempt number.
        events = Event.objects.filter(
            Q(entity_type=EntityType.TASK, entity_id=obj.execution_id, payload__attempt=obj.attempt_number)
            | Q(entity_type=EntityType.ATTEMPT, entity_id=str(obj.pk))
        ).order_by("sequence")
        return events_table(events[: TASK_EVENTS_SHOWN + 1], limit=TASK_EVENTS_SHOWN)

    def get_queryset(self, request: HttpRequest) -> QuerySet[TaskAttempt]:
        return super().get_queryset(request).select_related("execution__workflow")
