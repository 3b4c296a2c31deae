from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import flatten_fieldsets, unquote
from django.db import models
from django.http import HttpRequest
from django.utils.safestring import SafeString

from orchestration.admin.base import (
    EMPTY,
    ChangedFieldsOnlyMixin,
    CheckedFiltersMixin,
    MaskedLookupsMixin,
    RecordOnlyMixin,
    changelist_url,
    json_display,
    links,
)
from orchestration.admin.scale import LargeTableAdmin
from orchestration.errors import SpecError
from orchestration.models import Agent, AgentMetric, Event, TaskExecution
from orchestration.services.agent_registry import agent_change_record, agent_check
from orchestration.services.agents import OPERATOR_FIELDS


def agent_has_record(agent: Agent) -> bool:
    return (
        agent.task_executions.exists()
        or agent.messages.exists()
        or agent.interactions_sent.exists()
        or agent.interactions_received.exists()
        or agent.metrics.exists()
    )


AGENT_STATS = ("total_tasks_completed", "total_tokens_used", "average_latency_ms", "success_rate")


class AgentAdminForm(forms.ModelForm):
    """Makes the checks of the API and load_agents (agent_check): an agent that could not run,
    or an API key typed where the name of its variable belongs, is a form error. (The admin
    gives it its model and fields.)"""

    def _post_clean(self) -> None:
        super()._post_clean()
        if self.errors:
            return
        try:
            agent_check(self.instance)
        except SpecError as exc:
            listed = exc.listed
            if self.instance.definition_path:
                # A file's agent: the form changes only the operator's fields, and load_agents
                # checks what its file defines. A problem of that (a setting narrowed since the
                # sync) is not the form's to fix, and must not keep an operator from taking the
                # agent out of service or limiting it.
                listed = SpecError([p for p in exc.problems if p.split(":", 1)[0] in OPERATOR_FIELDS]).listed
            for problem in listed:
                self.add_error(None, problem)


@admin.register(Agent)
class AgentAdmin(CheckedFiltersMixin, MaskedLookupsMixin, ChangedFieldsOnlyMixin, admin.ModelAdmin):
    """Agents are synced from their definition files; the stats columns belong to the rollup.
    An agent made here (or through the API) is checked like the API's and every change is an
    agent_registered event, as the API records it."""

    form = AgentAdminForm

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
                    "definition_root",
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
        "definition_root",
        "created_at",
        "updated_at",
    )

    capabilities_display = json_display("capabilities")
    specialties_display = json_display("specialties")
    config_display = json_display("config")
    metadata_display = json_display("metadata")

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        readonly = tuple(super().get_readonly_fields(request, obj))
        if obj is not None and obj.definition_path:
            # Its file is the definition: an edit here would silently diverge from it (or be
            # undone by the next load_agents), as the API's 409 says. Edit the file instead; but
            # for the operator's fields (status, max_concurrency), which load_agents keeps.
            shown = (*flatten_fieldsets(self.get_fieldsets(request, obj)), *readonly)
            return tuple(name for name in dict.fromkeys(shown) if name not in OPERATOR_FIELDS)
        # Changing a primary key in a form would save a second agent, not rename this one.
        return readonly if obj is None else ("id", *readonly)

    def save_model(self, request: HttpRequest, obj: Agent, form: forms.ModelForm, change: bool) -> None:
        super().save_model(request, obj, form, change)
        if not change:
            agent_change_record(obj, "created", request.user)
        elif form.changed_data:
            deactivated = "status" in form.changed_data and obj.status == Agent.Status.INACTIVE
            agent_change_record(obj, "deactivated" if deactivated else "updated", request.user)

    def delete_model(self, request: HttpRequest, obj: Agent) -> None:
        """A deletion is a change of the agent too, recorded as the others are (an
        agent_registered event with the definition deleted), in the delete view's transaction:
        otherwise the audit log ends at the agent's creation, as if it were still there."""
        agent_change_record(obj, "deleted", request.user)
        super().delete_model(request, obj)

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        # Deletion goes one agent at a time, where has_delete_permission sees which agent.
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)
        return actions

    def has_delete_permission(self, request: HttpRequest, obj: Agent | None = None) -> bool:
        """Only an agent nothing was recorded for (a mistake just made) can be deleted: its
        tasks and interactions would refuse, and its messages would lose their agent.
        An agent that worked is deactivated instead (status inactive)."""
        if not super().has_delete_permission(request, obj):
            return False
        return obj is None or not agent_has_record(obj)

    def change_view(
        self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: dict[str, Any] | None = None
    ) -> Any:
        agent = self.get_object(request, unquote(object_id))
        # Only to staff who may see the agent: Django refuses the page after this (403), and a
        # message queued here would show the agent's file on the next page they open.
        if (
            request.method == "GET"
            and agent is not None
            and agent.definition_path
            and self.has_view_or_change_permission(request, agent)
        ):
            messages.info(
                request,
                f"This agent is defined in {agent.definition_path}: edit that file and run "
                "`manage.py load_agents` to change it. Its status and max concurrency are set here, "
                "and load_agents keeps what is set here.",
            )
        return super().change_view(request, object_id, form_url, extra_context)

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
class AgentMetricAdmin(RecordOnlyMixin, LargeTableAdmin):
    """Metrics are written by the rollup: eleven rows per agent and period, millions of them
    over the retention's 400 days (read as the other big tables are, `admin/scale.py`; newest
    first by the index of migration 0032)."""

    list_display = ("recorded_at", "agent", "metric_type", "metric_value", "metric_unit", "period", "period_start")
    list_filter = ("metric_type", "period", "agent", "recorded_at")
    list_select_related = ("agent",)
    search_fields = ("agent__id", "agent__name")
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
