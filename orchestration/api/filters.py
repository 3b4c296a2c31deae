"""django-filter filter sets. Every filter maps onto an indexed column."""

from __future__ import annotations

import copy
import datetime as dt
from functools import cache
from typing import Any

import django_filters
from django import forms
from django.core.exceptions import ValidationError
from django_filters.fields import ChoiceField, IsoDateTimeField
from django_filters.filters import QuerySetRequestMixin

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


class FixedChoiceField(ChoiceField):
    """A choice field whose choices are fixed in code: form instances share them, where a
    ChoiceField deep-copies its choices for every form instance (every request)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> FixedChoiceField:
        return forms.Field.__deepcopy__(self, memo)


class FixedChoiceFilter(django_filters.ChoiceFilter):
    """ChoiceFilter over choices fixed in code. A filter set deep-copies its filters for
    every request; this one's copy shares the choices (it only ever reads them)."""

    field_class = FixedChoiceField

    def __deepcopy__(self, memo: dict[int, Any]) -> FixedChoiceFilter:
        result = copy.copy(self)
        memo[id(self)] = result
        result.extra = dict(self.extra)
        return result


class StrictFilterSet(django_filters.FilterSet):
    """A filter given with no value is an error, not "no filter": `?status=` most likely
    means a client bug, and answering with everything would hide it.

    The form class is built once per filter set rather than on every request (django-filter
    builds one, with a new form field per filter, each time: about half its cost per
    request); each form instance still gets its own copies of the fields, as Django forms do."""

    def get_form_class(self) -> type[forms.Form]:
        return _form_class(type(self))

    def is_valid(self) -> bool:
        valid = super().is_valid()
        for name in self.filters:
            if name in self.data and self.data.get(name) == "":
                self.form.add_error(name, "must not be empty")
                valid = False
        return valid


@cache
def _form_class(filterset: type[StrictFilterSet]) -> type[forms.Form]:
    filters = filterset.base_filters
    if any(isinstance(f, QuerySetRequestMixin) for f in filters.values()):
        raise TypeError(f"{filterset.__name__}: a filter whose choices depend on the request cannot share a form")
    # From copies: a filter caches its form field, and every request deep-copies the filters.
    fields = {name: copy.copy(f).field for name, f in filters.items()}
    return type(f"{filterset.__name__}Form", (filterset._meta.form,), fields)


class WorkflowFilter(StrictFilterSet):
    status = FixedChoiceFilter(choices=WorkflowStatus.choices)
    workflow_type = django_filters.CharFilter()
    priority = FixedChoiceFilter(choices=Priority.choices)
    created_after = UtcDateTimeFilter(field_name="created_at", lookup_expr="gte")
    created_before = UtcDateTimeFilter(field_name="created_at", lookup_expr="lt")

    class Meta:
        model = Workflow
        fields = ("status", "workflow_type", "priority", "created_after", "created_before")


class TaskFilter(StrictFilterSet):
    status = FixedChoiceFilter(choices=TaskExecutionStatus.choices)
    workflow = django_filters.CharFilter(field_name="workflow_id")
    agent = django_filters.CharFilter(field_name="agent_id")
    created_after = UtcDateTimeFilter(field_name="created_at", lookup_expr="gte")
    created_before = UtcDateTimeFilter(field_name="created_at", lookup_expr="lt")

    class Meta:
        model = TaskExecution
        fields = ("status", "workflow", "agent", "created_after", "created_before")


class EventFilter(StrictFilterSet):
    entity_type = FixedChoiceFilter(choices=EntityType.choices)
    entity_id = django_filters.CharFilter()
    event_type = FixedChoiceFilter(choices=EventType.choices)
    workflow = django_filters.CharFilter(field_name="workflow_id")
    agent = django_filters.CharFilter(field_name="agent_id")
    severity = FixedChoiceFilter(choices=Severity.choices)
    since = UtcDateTimeFilter(field_name="created_at", lookup_expr="gte")
    until = UtcDateTimeFilter(field_name="created_at", lookup_expr="lt")

    class Meta:
        model = Event
        fields = ("entity_type", "entity_id", "event_type", "workflow", "agent", "severity", "since", "until")


class AgentFilter(StrictFilterSet):
    status = FixedChoiceFilter(choices=AgentStatus.choices)
    category = django_filters.CharFilter()
    executor = FixedChoiceFilter(choices=AgentExecutor.choices)

    class Meta:
        model = Agent
        fields = ("status", "category", "executor")
