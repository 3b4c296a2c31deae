from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.utils.html import format_html
from django.utils.safestring import SafeString

from orchestration.admin.base import EMPTY, json_display, local_datetime, object_link
from orchestration.admin.scale import LargeTableAdmin
from orchestration.admin.tasks import VIEW_MESSAGES
from orchestration.event_types import EntityType
from orchestration.models import Agent, Event, TaskAttempt, TaskExecution, Workflow
from orchestration.services.conversations import event_holds_conversation

ENTITY_MODELS = {
    EntityType.WORKFLOW: Workflow,
    EntityType.TASK: TaskExecution,
    EntityType.ATTEMPT: TaskAttempt,
    EntityType.AGENT: Agent,
}


@admin.register(Event)
class EventAdmin(LargeTableAdmin):
    """The audit log is append-only: nobody adds, changes or deletes events here, superusers
    included (the database rejects UPDATE and DELETE anyway). Viewing follows the usual
    permissions."""

    list_display = (
        "sequence",
        "created",
        "type",
        "entity",
        "workflow",
        "agent",
        "severity",
        "source",
    )
    list_filter = ("event_type", "entity_type", "severity", "created_at")
    search_fields = ("event_id", "entity_id", "workflow_id", "agent_id", "session_id")
    search_help_text = "An exact event, entity, workflow, agent or session id, or a sequence number."
    ordering = ("-sequence",)
    # Sorted only in the order the events were written ("created at" too: its BRIN index gives no
    # order). By another column the page sorted the whole log, or all the events of the column's
    # first value, before showing any: at 1 M events 1.0 s by created at, 1.5 s by severity or
    # source, 0.85 s by type, 0.6 s by agent. The other columns are links to filter by.
    sortable_by = ("sequence", "created")
    fields = (
        "sequence",
        "event_id",
        "type",
        "entity",
        "workflow",
        "agent",
        "session_id",
        "source",
        "severity",
        "created",
        "payload_display",
    )
    readonly_fields = fields

    payload_display = json_display("payload")

    def get_fields(self, request: HttpRequest, obj: Event | None = None) -> Any:
        """A conversation's tool calls and hand-offs show their payload only to staff who may
        view the conversation messages, as its reply task's data is
        (admin.tasks.TaskExecutionAdmin.get_fieldsets)."""
        fields = super().get_fields(request, obj)
        if obj is None or request.user.has_perm(VIEW_MESSAGES):
            return fields
        if not event_holds_conversation(event_type=obj.event_type, workflow_id=obj.workflow_id, payload=obj.payload):
            return fields
        return [name for name in fields if name != "payload_display"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Event], search_term: str
    ) -> tuple[QuerySet[Event], bool]:
        # Ids are pasted whole: exact matches can use the indexes, a substring search of the
        # whole log cannot.
        term = search_term.strip()
        if not term:
            return queryset, False
        condition = Q(event_id=term) | Q(entity_id=term) | Q(workflow_id=term) | Q(agent_id=term) | Q(session_id=term)
        # ASCII digits only: "²" is a digit to str.isdigit, and int() refuses it (a 500).
        if term.isascii() and term.isdigit() and len(term) < 19:
            condition |= Q(sequence=int(term))
        return queryset.filter(condition), False

    @admin.display(description="created at", ordering="sequence")
    def created(self, obj: Event) -> str:
        return local_datetime(obj.created_at)

    @admin.display(description="event type", ordering="event_type")
    def type(self, obj: Event) -> SafeString:
        return format_html('<span title="{}">{}</span>', obj.get_event_type_display(), obj.event_type)

    @admin.display(description="entity", ordering="entity_id")
    def entity(self, obj: Event) -> SafeString | str:
        if not obj.entity_id:
            return obj.entity_type or EMPTY
        model = ENTITY_MODELS.get(obj.entity_type)
        text = f"{obj.entity_type}:{obj.entity_id}"
        return object_link(model, obj.entity_id, text) if model else text

    @admin.display(description="workflow", ordering="workflow_id")
    def workflow(self, obj: Event) -> SafeString | str:
        return object_link(Workflow, obj.workflow_id)

    @admin.display(description="agent", ordering="agent_id")
    def agent(self, obj: Event) -> SafeString | str:
        return object_link(Agent, obj.agent_id)
