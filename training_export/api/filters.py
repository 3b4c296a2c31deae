"""Filters of the export runs list."""

from __future__ import annotations

import datetime as dt
from typing import Any

import django_filters
from django import forms
from django.core.exceptions import ValidationError
from django.db.models import QuerySet

from orchestration.api.filters import StrictFilterSet
from orchestration.isodates import is_iso_day_form
from training_export.models import ExportRun, ExportRunDataType, ExportRunFormat, ExportRunStatus

DAY_FORMATS = ["%Y-%m-%d"]
DAY_FORM = "YYYY-MM-DD"


class IsoDayField(forms.DateField):
    """A UTC day written YYYY-MM-DD (orchestration.isodates): `%Y-%m-%d` alone would read
    `2024-3-5` too."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs["input_formats"] = DAY_FORMATS
        super().__init__(**kwargs)

    def to_python(self, value: Any) -> dt.date | None:
        # Refused with spaces around it too, as the export request's serializer refuses it.
        if isinstance(value, str) and value and not is_iso_day_form(value):
            raise ValidationError("Enter a valid date: %(form)s.", code="invalid", params={"form": DAY_FORM})
        return super().to_python(value)


class IsoDayFilter(django_filters.DateFilter):
    field_class = IsoDayField


def _midnight(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)


class ExportRunFilter(StrictFilterSet):
    data_type = django_filters.ChoiceFilter(
        choices=ExportRunDataType.choices,
        method="filter_data_type",
        help_text="runs of this type; `all`, as in a request to export, every type",
    )
    status = django_filters.ChoiceFilter(choices=ExportRunStatus.choices)
    format = django_filters.ChoiceFilter(choices=ExportRunFormat.choices)
    # YYYY-MM-DD only, as a request to export reads its days: Django's default formats also
    # take month-first dates (05/03/2024 is 3 May), which would answer another day's runs.
    start_date = IsoDayFilter(method="filter_start_date", help_text="windows starting on this UTC day, YYYY-MM-DD")
    end_date = IsoDayFilter(method="filter_end_date", help_text="windows whose last UTC day is this one, YYYY-MM-DD")
    day = IsoDayFilter(method="filter_day", help_text="windows that include this UTC day, YYYY-MM-DD")

    class Meta:
        model = ExportRun
        fields = ("data_type", "status", "format", "start_date", "end_date", "day")

    def filter_data_type(self, queryset: QuerySet[ExportRun], name: str, value: str) -> QuerySet[ExportRun]:
        # No run has the type `all`: a request for `all` records one run per type.
        return queryset if value == ExportRunDataType.ALL else queryset.filter(data_type=value)

    def filter_start_date(self, queryset: QuerySet[ExportRun], name: str, value: dt.date) -> QuerySet[ExportRun]:
        return queryset.filter(window_start=_midnight(value))

    def filter_end_date(self, queryset: QuerySet[ExportRun], name: str, value: dt.date) -> QuerySet[ExportRun]:
        if value >= dt.date.max:
            return queryset.none()
        return queryset.filter(window_end=_midnight(value + dt.timedelta(days=1)))

    def filter_day(self, queryset: QuerySet[ExportRun], name: str, value: dt.date) -> QuerySet[ExportRun]:
        return queryset.filter(window_start__lte=_midnight(value), window_end__gt=_midnight(value))
