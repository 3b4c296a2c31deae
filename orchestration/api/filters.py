"""django-filter filter sets. Every filter maps onto an indexed column."""

from __future__ import annotations

import copy
import datetime as dt
import logging
from functools import cache
from typing import Any

import django_filters
import redis
from django import forms
from django.core.exceptions import ValidationError
from django.utils import timezone
from django_filters.fields import ChoiceField, IsoDateTimeField
from django_filters.filters import QuerySetRequestMixin
from django_filters.filterset import FilterSetMetaclass
from rest_framework.exceptions import ValidationError as RequestInvalid

from orchestration.api.exceptions import Unavailable
from orchestration.api.redis_store import redis_client
from orchestration.event_types import EntityType, EventType, Severity
from orchestration.isodates import is_iso_datetime_form, iso_datetime_canonical, parse_iso_datetime
from orchestration.models import Agent, Event, TaskAttempt, TaskExecution, Workflow
from orchestration.models.agents import AgentExecutor, AgentStatus
from orchestration.models.workflows import (
    Priority,
    TaskAttemptCause,
    TaskAttemptStatus,
    TaskExecutionStatus,
    WorkflowStatus,
)
from orchestration.services.relay import settled_sequence

logger = logging.getLogger(__name__)


# What a date-time refused for a space where its offset's '+' was is told.
PLUS_AS_SPACE = "a '+' in a query string means a space; write it as %2B"
# What one in another form is told (orchestration.isodates).
DATETIME_FORM = "YYYY-MM-DD, or YYYY-MM-DDThh:mm[:ss[.f]] with an optional offset (Z, +hh:mm)"


def plus_read_as_space(value: Any) -> bool:
    """Whether `value`, not a date-time, is one with its last space a '+': a query string
    decodes an unencoded '+' into a space (`?since=2026-12-01T00:00:00+00:00`)."""
    if not isinstance(value, str) or " " not in value:
        return False
    head, _, tail = value.rpartition(" ")
    try:
        return parse_iso_datetime(f"{head}+{tail}") is not None
    except ValueError:  # ISO 8601 in form, not a date
        return False


class UtcDateTimeField(IsoDateTimeField):
    def to_python(self, value: Any) -> dt.datetime | None:
        if isinstance(value, str) and value.strip() and not is_iso_datetime_form(value.strip()):
            if plus_read_as_space(value):
                raise ValidationError(self.error_messages["invalid"], code="invalid")  # clean() says why
            raise ValidationError("Enter a valid date/time: %(hint)s.", code="invalid", params={"hint": DATETIME_FORM})
        # One without an offset is UTC (README), not TIME_ZONE's: Django's field reads it in the
        # current time zone, and refuses one a daylight-saving change skips or repeats there.
        if isinstance(value, str):
            value = iso_datetime_canonical(value.strip())
        with timezone.override(dt.UTC):
            return super().to_python(value)

    def clean(self, value: Any) -> dt.datetime | None:
        try:
            parsed = super().clean(value)
        except ValidationError as exc:
            if exc.code == "invalid" and plus_read_as_space(value):
                # The hint as a parameter: django-filter formats every message with its
                # parameters, and the `%` of %2B in the message itself would break that.
                raise ValidationError(
                    "Enter a valid date/time: %(hint)s.", code="invalid", params={"hint": PLUS_AS_SPACE}
                ) from None
            raise
        if parsed is None:
            return None
        try:
            # PostgreSQL accepts UTC offsets up to 15:59; ISO 8601 allows more.
            return parsed.astimezone(dt.UTC)
        except OverflowError:
            raise ValidationError("is out of range") from None


class UtcDateTimeFilter(django_filters.IsoDateTimeFilter):
    field_class = UtcDateTimeField


class StrictBooleanField(forms.NullBooleanField):
    """true/false (or 1/0) only: a NullBooleanField reads any other value as unset, so a
    typo would quietly drop the filter (and so would its widgets, which map them to None)."""

    widget = forms.TextInput

    def to_python(self, value: Any) -> bool | None:
        if value in (None, ""):
            return None
        if str(value).lower() in ("true", "1"):
            return True
        if str(value).lower() in ("false", "0"):
            return False
        # The value as a parameter, not in the message: django-filter formats every message with
        # its parameters, and a `%` in the message itself (`?settled=%`) would make that a 500.
        raise ValidationError("%(value)r is not a boolean: use true or false", code="invalid", params={"value": value})

    def validate(self, value: Any) -> None:
        pass


class StrictBooleanFilter(django_filters.BooleanFilter):
    field_class = StrictBooleanField


class DigitsField(forms.IntegerField):
    """A whole number written in the digits 0-9 only: an IntegerField also reads "10.0", "1_0",
    " 5 " and other scripts' digits."""

    def to_python(self, value: Any) -> int | None:
        if value in self.empty_values:
            return None
        if not (isinstance(value, str) and value.isascii() and value.isdigit()):
            raise ValidationError(
                "%(value)r is not a whole number written in digits 0-9", code="invalid", params={"value": value}
            )
        try:
            return int(value)
        except ValueError:  # more digits than int() reads (4 300): no sequence or size has them
            raise ValidationError(
                "%(digits)d digits: too many for a number here", code="invalid", params={"digits": len(value)}
            ) from None


class IntegerFilter(django_filters.NumberFilter):
    """A whole number of 0 or more (NumberFilter takes any decimal: `after=1.5` read as `> 1`)."""

    field_class = DigitsField

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("min_value", 0)
        super().__init__(*args, **kwargs)


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


def _filter_copy(filter_: django_filters.Filter) -> django_filters.Filter:
    """A filter set instance's own copy of a declared filter: django-filter then sets its
    `model` and `parent`, the only state a filter takes per instance. A shallow copy (with
    its own `extra`) is as independent as django-filter's deep copy for that; a filter with
    a `method` is deep-copied, since its bound FilterMethod must point at the copy."""
    if filter_.method is not None:
        return copy.deepcopy(filter_)
    result = copy.copy(filter_)
    result.extra = dict(filter_.extra)
    return result


class _DeclaredFilters(dict):
    """`base_filters` of a StrictFilterSet. django-filter deep-copies them for every filter
    set instance, that is on every list request, down to each filter's choices and lazy
    labels; this copies each filter once, shallowly (see _filter_copy)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, django_filters.Filter]:
        return {name: _filter_copy(filter_) for name, filter_ in self.items()}


class _SharedFormFields(dict):
    """`base_fields` of a filter form. A Django form deep-copies its fields per instance so
    that one instance may change its own (widgets, choices, required); a filter form never
    does: it only cleans the query string. Each form gets its own dict of the same field
    objects, which cleaning only reads (to_python, validate, run_validators, the widget's
    value_from_datadict), so errors and cleaned values are the same as with copies."""

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, forms.Field]:
        return dict(self)


# Query parameters of a list that are not filters: the keyset pagination's, the ordering and
# DRF's format override.
LIST_PARAMETERS = frozenset({"cursor", "limit", "ordering", "format"})


def unknown_parameters(data: Any, allowed: set[str]) -> dict[str, list[str]]:
    """The query parameters in `data` that are not `allowed`, each with the problem to answer
    (a parameter nothing reads would be ignored: the answer would not be what was asked)."""
    listed = f"allowed: {', '.join(sorted(allowed))}" if allowed else "this operation takes none"
    return {name: [f"unknown query parameter ({listed})"] for name in sorted(set(data) - allowed)}


def check_list_parameters(data: Any) -> None:
    """For a list without filters (a workflow's events, a conversation's messages): a query
    parameter that is not the page's, the ordering's or the format's is refused, as a
    StrictFilterSet refuses one no filter reads (`?event_type=` would answer every event)."""
    unknown = unknown_parameters(data, set(LIST_PARAMETERS))
    if unknown:
        raise RequestInvalid(unknown)


class StrictFilterSetMetaclass(FilterSetMetaclass):
    def __new__(cls, name: str, bases: tuple[type, ...], attrs: dict[str, Any]) -> type:
        new_class = super().__new__(cls, name, bases, attrs)
        new_class.base_filters = _DeclaredFilters(new_class.base_filters)
        return new_class


class StrictFilterSet(django_filters.FilterSet, metaclass=StrictFilterSetMetaclass):
    """A filter given with no value is an error, not "no filter": `?status=` most likely
    means a client bug, and answering with everything would hide it. So is a parameter that
    no filter reads.

    The form class is built once per filter set rather than on every request (django-filter
    builds one, with a new form field per filter, each time: about half its cost per
    request). Its fields are shared by its instances and the declared filters are copied
    shallowly per instance (_SharedFormFields, _DeclaredFilters): the two deep copies were
    about a sixth of a filtered list request's Python time (cProfile of
    `GET /events/?entity_id=`), 0.2-0.3 ms per request."""

    def get_form_class(self) -> type[forms.Form]:
        return _form_class(type(self))

    # (start, end) filter pairs: an end not after its start is an error, not an empty list.
    ranges: tuple[tuple[str, str], ...] = ()

    def is_valid(self) -> bool:
        valid = super().is_valid()
        # A parameter no filter reads would be ignored: `?workflow_id=` (the answer's name for
        # the `workflow` filter) would answer with every row.
        unknown = unknown_parameters(self.data, {*self.filters, *LIST_PARAMETERS})
        if unknown:
            raise RequestInvalid(unknown)
        for name in self.filters:
            # Blanks too: a text field strips them, which leaves no filter at all.
            if name in self.data and not str(self.data.get(name)).strip():
                self.form.add_error(name, "must not be empty")
                valid = False
        if valid:
            cleaned = self.form.cleaned_data
            for start, end in self.ranges:
                if cleaned.get(start) is not None and cleaned.get(end) is not None and cleaned[end] <= cleaned[start]:
                    self.form.add_error(end, f"must be after {start}")
                    valid = False
        return valid


@cache
def _form_class(filterset: type[StrictFilterSet]) -> type[forms.Form]:
    filters = filterset.base_filters
    if any(isinstance(f, QuerySetRequestMixin) for f in filters.values()):
        raise TypeError(f"{filterset.__name__}: a filter whose choices depend on the request cannot share a form")
    # From copies: a filter caches its form field, and every request deep-copies the filters.
    fields = {name: copy.copy(f).field for name, f in filters.items()}
    if any(isinstance(field, forms.MultiValueField) for field in fields.values()):
        # Rendering one changes its subfields' widgets: it cannot be shared by forms.
        raise TypeError(f"{filterset.__name__}: a multi-value filter (a range) cannot share a form")
    form_class = type(f"{filterset.__name__}Form", (filterset._meta.form,), fields)
    form_class.base_fields = _SharedFormFields(form_class.base_fields)
    return form_class


class WorkflowFilter(StrictFilterSet):
    status = FixedChoiceFilter(choices=WorkflowStatus.choices)
    workflow_type = django_filters.CharFilter()
    priority = FixedChoiceFilter(choices=Priority.choices)
    created_after = UtcDateTimeFilter(field_name="created_at", lookup_expr="gte")
    created_before = UtcDateTimeFilter(field_name="created_at", lookup_expr="lt")
    ranges = (("created_after", "created_before"),)

    class Meta:
        model = Workflow
        fields = ("status", "workflow_type", "priority", "created_after", "created_before")


class TaskFilter(StrictFilterSet):
    status = FixedChoiceFilter(choices=TaskExecutionStatus.choices)
    workflow = django_filters.CharFilter(field_name="workflow_id")
    agent = django_filters.CharFilter(field_name="agent_id")
    created_after = UtcDateTimeFilter(field_name="created_at", lookup_expr="gte")
    created_before = UtcDateTimeFilter(field_name="created_at", lookup_expr="lt")
    ranges = (("created_after", "created_before"),)

    class Meta:
        model = TaskExecution
        fields = ("status", "workflow", "agent", "created_after", "created_before")


class AttemptFilter(StrictFilterSet):
    """A workflow's attempts (`workflows/{id}/attempts/`): the workflow is the URL's."""

    status = FixedChoiceFilter(choices=TaskAttemptStatus.choices)
    cause = FixedChoiceFilter(choices=TaskAttemptCause.choices)

    class Meta:
        model = TaskAttempt
        fields = ("status", "cause")


class EventFilter(StrictFilterSet):
    entity_type = FixedChoiceFilter(choices=EntityType.choices)
    entity_id = django_filters.CharFilter()
    event_type = FixedChoiceFilter(choices=EventType.choices)
    workflow = django_filters.CharFilter(field_name="workflow_id")
    agent = django_filters.CharFilter(field_name="agent_id")
    severity = FixedChoiceFilter(choices=Severity.choices)
    since = UtcDateTimeFilter(field_name="created_at", lookup_expr="gte")
    until = UtcDateTimeFilter(field_name="created_at", lookup_expr="lt")
    after = IntegerFilter(
        field_name="sequence",
        lookup_expr="gt",
        help_text="only events after this sequence: to follow the log, the last sequence read so far",
    )
    settled = StrictBooleanFilter(
        method="filter_settled",
        help_text="true: only events up to the relay's position on the Synapse stream, below which no "
        "transaction can still commit: read with ordering=sequence and after=, no event is ever missed",
    )
    ranges = (("since", "until"),)

    class Meta:
        model = Event
        fields = (
            "entity_type",
            "entity_id",
            "event_type",
            "workflow",
            "agent",
            "severity",
            "since",
            "until",
            "after",
            "settled",
        )

    # `value: bool`, not `bool | None`: the schema's type for the parameter is this hint's (a
    # union is documented as a string), and django-filter never calls a method without a value.
    def filter_settled(self, queryset: Any, name: str, value: bool) -> Any:
        if not value:
            return queryset
        client = redis_client()
        if client is None:
            raise StreamPositionUnknown("settled=true needs the Synapse stream, and REDIS_URL is not set.")
        try:
            settled = settled_sequence(client)
        except redis.RedisError:
            # The error's text names hosts: it stays in the log, as the rate limit's does.
            logger.warning("settled=true: the Synapse stream did not answer", exc_info=True)
            raise StreamPositionUnknown() from None
        return queryset.filter(sequence__lte=settled)


class StreamPositionUnknown(Unavailable):
    default_detail = (
        "settled=true needs the relay's position on the Synapse stream, which is unknown: Redis is not "
        "answering; retry shortly."
    )
    wait = 5  # Retry-After


class AgentFilter(StrictFilterSet):
    status = FixedChoiceFilter(choices=AgentStatus.choices)
    category = django_filters.CharFilter()
    executor = FixedChoiceFilter(choices=AgentExecutor.choices)

    class Meta:
        model = Agent
        fields = ("status", "category", "executor")
