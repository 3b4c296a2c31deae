from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest
from django.utils.text import Truncator

from orchestration.admin.base import (
    CheckedFiltersMixin,
    MaskedLookupsMixin,
    RecordOnlyMixin,
    json_display,
    masked,
    text_display,
)
from orchestration.admin.scale import IndexedRelatedOnlyFieldListFilter, LargeTableAdmin
from orchestration.admin.tasks import VIEW_MESSAGES
from orchestration.admin.workflows import WORKFLOW_DOCUMENTS
from orchestration.models import AgentInteraction, AgentPlaygroundMessage, AgentPromptVersion


@admin.register(AgentPlaygroundMessage)
class AgentPlaygroundMessageAdmin(RecordOnlyMixin, LargeTableAdmin):
    """Messages are written by the conversation runtime and are training data as stored."""

    list_display = (
        "created_at",
        "instance_id",
        "agent",
        "owner",
        "role",
        "short_content",
        "is_error",
        "tokens_used",
    )
    list_filter = ("role", "is_error", "agent", ("owner", IndexedRelatedOnlyFieldListFilter), "created_at")
    list_select_related = ("agent", "owner")
    search_fields = ("=message_id", "=instance_id", "content", "=execution__execution_id")
    # Newest first by the primary key (UUIDv7: the order they were written); created_at has no
    # index of its own, and sorting the table for a page took seconds.
    ordering = ("-message_id",)
    fields = (
        "message_id",
        "instance_id",
        "agent",
        "owner",
        "role",
        "content_display",
        "tool_call_id",
        "is_error",
        ("execution", "attempt"),
        ("input_tokens", "output_tokens", "tokens_used"),
        "created_at",
        "tool_calls_display",
        "metadata_display",
    )
    readonly_fields = ("content_display", "tool_calls_display", "metadata_display")

    content_display = text_display("content")
    tool_calls_display = json_display("tool_calls", "tool calls")
    metadata_display = json_display("metadata")

    @admin.display(description="content")
    def short_content(self, obj: AgentPlaygroundMessage) -> str:
        return Truncator(masked(obj.content)).chars(80)


@admin.register(AgentInteraction)
class AgentInteractionAdmin(RecordOnlyMixin, LargeTableAdmin):
    """Interactions are recorded by the agents as they hand off and collaborate."""

    list_display = ("created_at", "interaction_type", "from_agent", "to_agent", "workflow", "short_message")
    list_filter = ("interaction_type", "from_agent", "to_agent", "created_at")
    list_select_related = ("workflow", "from_agent", "to_agent")
    list_deferred = ("payload", *(f"workflow__{name}" for name in WORKFLOW_DOCUMENTS))
    search_fields = ("=workflow__workflow_id", "workflow__name", "message")
    ordering = ("-id",)  # as the messages' (UUIDv7)
    fields = (
        "interaction_type",
        ("from_agent", "to_agent"),
        ("workflow", "execution"),
        "message_display",
        "created_at",
        "payload_display",
    )
    readonly_fields = ("message_display", "payload_display")
    message_display = text_display("message")

    payload_display = json_display("payload")

    def get_list_display(self, request: HttpRequest) -> Any:
        list_display = super().get_list_display(request)
        if request.user.has_perm(VIEW_MESSAGES):
            return list_display
        return tuple("message_unless_conversation" if name == "short_message" else name for name in list_display)

    def get_fields(self, request: HttpRequest, obj: AgentInteraction | None = None) -> Any:
        """An interaction of a conversation's reply task (a hand-off it made while answering)
        carries the conversation (its message, the input and output in its payload): shown only
        to staff who may view the conversation messages, as the reply task's own data is."""
        fields = super().get_fields(request, obj)
        if obj is None or not _of_conversation(obj) or request.user.has_perm(VIEW_MESSAGES):
            return fields
        return [name for name in fields if name not in ("message_display", "payload_display")]

    @admin.display(description="message")
    def short_message(self, obj: AgentInteraction) -> str:
        return Truncator(masked(obj.message or "")).chars(80)

    @admin.display(description="message")
    def message_unless_conversation(self, obj: AgentInteraction) -> str:
        return "(a conversation's: hidden)" if _of_conversation(obj) else self.short_message(obj)


def _of_conversation(interaction: AgentInteraction) -> bool:
    """Whether `interaction` was made by a conversation's reply task, the only task outside
    any workflow (services.conversations)."""
    return interaction.workflow_id is None and interaction.execution_id is not None


@admin.register(AgentPromptVersion)
class AgentPromptVersionAdmin(CheckedFiltersMixin, MaskedLookupsMixin, RecordOnlyMixin, admin.ModelAdmin):
    """Prompt versions are recorded with the replies that ran under them; an exported window
    depends on them."""

    list_display = ("sha256", "created_at", "short_prompt")
    search_fields = ("=sha256", "system_prompt")
    ordering = ("-created_at",)
    fields = ("sha256", "created_at", "system_prompt", "tools_display")
    readonly_fields = ("tools_display",)

    tools_display = json_display("tools")

    @admin.display(description="system prompt")
    def short_prompt(self, obj: AgentPromptVersion) -> str:
        return Truncator(obj.system_prompt).chars(80)
