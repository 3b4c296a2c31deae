from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db import models
from django.http import HttpRequest
from django.utils.safestring import SafeString

from orchestration.admin.base import EMPTY, NoAddChangeMixin, changelist_url, json_display, links
from orchestration.models import Agent, AgentMetric, Event, TaskExecution

AGENT_STATS = ("total_tasks_completed", "total_tokens_used", "average_latency_ms", "success_rate")


@admin.register(Agent)
class AgentAdmin(admin.ModelAdmin):
    """Agents are synced from their definition files; the stats columns belong to the rollup."""

    list_display = (
        "id",
        "name",
        "role",
        "category",
        "executor",
        "provider",
        "model",
        "status",
        *AGENT_STATS,
        "updated_at",
    )
    list_display_links = ("id", "name")
    list_filter = ("status", "executor", "provider", "category", "created_at")
    search_fields = ("id", "name", "role", "category", "model", "provider")
    date_hierarchy = "created_at"
    ordering = ("id",)
    formfield_overrides = {models.URLField: {"assume_scheme": "http"}}
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "id",
                    "name",
                    "role",
                    "description",
                    "category",
                    "version",
                    "status",
                    "personality_emoji",
                    "backstory",
                    "related",
                )
            },
        ),
        (
            "Execution",
            {
                "fields": (
                    "executor",
                    "entrypoint",
                    ("provider", "model"),
                    "url",
                    "api_key_env",
                    "system_prompt",
                    ("temperature", "max_tokens"),
                    "max_concurrency",
                )
            },
        ),
        ("Statistics", {"fields": (AGENT_STATS,)}),
        (
            "Definition",
            {
                "fields": (
                    "capabilities_display",
                    "specialties_display",
                    "config_display",
                    "metadata_display",
                    ("definition_path", "definition_hash"),
                    ("created_at", "updated_at"),
                )
            },
        ),
    )
    readonly_fields = (
        *AGENT_STATS,
        "related",
        "capabilities_display",
        "specialties_display",
        "config_display",
        "metadata_display",
        "definition_path",
        "definition_hash",
        "created_at",
        "updated_at",
    )

    capabilities_display = json_display("capabilities")
    specialties_display = json_display("specialties")
    config_display = json_display("config")
    metadata_display = json_display("metadata")

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        readonly = tuple(super().get_readonly_fields(request, obj))
        # Changing a primary key in a form would save a second agent, not rename this one.
        return readonly if obj is None else ("id", *readonly)

    @admin.display(description="related")
    def related(self, obj: Agent) -> SafeString | str:
        if obj._state.adding:
            return EMPTY
        return links(
            [
                (changelist_url(TaskExecution, {"agent__id__exact": obj.pk}), "tasks"),
                (changelist_url(Event, {"agent_id": obj.pk}), "events"),
                (changelist_url(AgentMetric, {"agent__id__exact": obj.pk}), "metrics"),
            ]
        )


@admin.register(AgentMetric)
class AgentMetricAdmin(NoAddChangeMixin, admin.ModelAdmin):
    """Metrics are written by the rollup."""

    list_display = ("recorded_at", "agent", "metric_type", "metric_value", "metric_unit", "period", "period_start")
    list_filter = ("metric_type", "period", "agent", "recorded_at")
    list_select_related = ("agent",)
    search_fields = ("agent__id", "agent__name")
    date_hierarchy = "recorded_at"
    ordering = ("-recorded_at",)
    fields = (
        "agent",
        "metric_type",
        ("metric_value", "metric_unit"),
        ("period", "period_start"),
        "recorded_at",
        "created_at",
        "context_display",
    )
    readonly_fields = ("context_display",)

    context_display = json_display("context")
