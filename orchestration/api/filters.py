"""django-filter filter sets. Every filter maps onto an indexed column."""

from __future__ import annotations

import datetime as dt
from typing import Any

import django_filters
from django.core.exceptions import ValidationError
from django_filters.fields import IsoDateTimeField

from orchestration.event_types import EntityType, EventType, Severity
from orchestration.models import Agent, Event, TaskExecution, Workflow
from orchestration.models.agents import AgentExecutor, AgentStatus
from orchestration.models.workflows import Priority, TaskExecutionStatus, WorkflowStatus


class UtcDateTimeField(IsoDateTimeField):
    def clean(self, value: Any) -> dt.datetime | None:
        parsed = super().clean(value)
        if parsed is None:
            return None
        try:
            # PostgreSQL accepts UTC offsets up to 15:59; ISO 8601 allows more.
            return parsed.astimezone(dt.UTC)
        except OverflowError:
            raise ValidationError("is out of range") from None


class UtcDateTimeFilter(django_filters.IsoDateTimeFilter):
    field_class = UtcDateTimeField


class StrictFilterSet(django_filters.FilterSet):
    """A filter given with no value is an error, not "no filter": `?status=` most likely
    means a client bug, and answering with everything would hide it."""

    def is_valid(self) -> bool:
        valid = super().is_valid()
        for name in self.filters:
            if name in self.data and self.data.get(name) == "":
                self.form.add_error(name, "must not be empty")
                valid = False
        return valid


class WorkflowFilter(StrictFilterSet):
    status = django_filters.ChoiceFilter(choices=WorkflowStatus.choices)
    workflow_type = django_filters.CharFilter()
    priority = django_filters.ChoiceFilter(choices=Priority.choices)
    created_after = UtcDateTimeFilter(field_name="created_at", lookup_expr="gte")
    created_before = UtcDateTimeFilter(field_name="created_at", lookup_expr="lt")

    class Meta:
        model = Workflow
        fields = ("status", "workflow_type", "priority", "created_after", "created_before")


class TaskFilter(StrictFilterSet):
    status = django_filters.ChoiceFilter(choices=TaskExecutionStatus.choices)
    workflow = django_filters.CharFilter(field_name="workflow_id")
    agent = django_filters.CharFilter(field_name="agent_id")
    created_after = UtcDateTimeFilter(field_name="created_at", lookup_expr="gte")
    created_before = UtcDateTimeFilter(field_name="created_at", lookup_expr="lt")

    class Meta:
        model = TaskExecution
        fields = ("status", "workflow", "agent", "created_after", "created_before")


class EventFilter(StrictFilterSet):
    entity_type = django_filters.ChoiceFilter(choices=EntityType.choices)
    entity_id = django_filters.CharFilter()
    event_type = django_filters.ChoiceFilter(choices=EventType.choices)
    workflow = django_filters.CharFilter(field_name="workflow_id")
    agent = django_filters.CharFilter(field_name="agent_id")
    severity = django_filters.ChoiceFilter(choices=Severity.choices)
    since = UtcDateTimeFilter(field_name="created_at", lookup_expr="gte")
    until = UtcDateTimeFilter(field_name="created_at", lookup_expr="lt")

    class Meta:
        model = Event
        fields = ("entity_type", "entity_id", "event_type", "workflow", "agent", "severity", "since", "until")


class AgentFilter(StrictFilterSet):
    status = django_filters.ChoiceFilter(choices=AgentStatus.choices)
    category = django_filters.CharFilter()
    executor = django_filters.ChoiceFilter(choices=AgentExecutor.choices)

    class Meta:
        model = Agent
        fields = ("status", "category", "executor")
