"""The one form of date-time the API and specs read: ISO 8601's calendar date in the
extended format (2026-03-05), alone (its midnight) or with a time, hh:mm[:ss[.f]], after a
`T` (or RFC 3339's lowercase `t`) or a space, and an optional offset (Z or RFC 3339's `z`,
+hh:mm, +hhmm, +hh).

Python's fromisoformat, and so Django's and DRF's parsers, also read week dates
(2020-W01-1 is 30 December 2019), the basic format (20200101T0000) and a bare hour
(2020-01-01T10): none is the documented form, and a client who sent one by mistake would
get another moment than the one it meant, silently."""

from __future__ import annotations

import datetime as dt
import re

from django.utils.dateparse import parse_datetime

_DATETIME_FORM = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
    r"(?:[Tt ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:[.,][0-9]+)?)?(?:[Zz]|[+-][0-9]{2}(?::?[0-9]{2})?)?)?"
)


def is_iso_datetime_form(value: str) -> bool:
    """Whether `value` has the documented form (whether it is a real date is the parser's
    question: 2026-02-30 has the form)."""
    return _DATETIME_FORM.fullmatch(value) is not None


def iso_datetime_canonical(value: str) -> str:
    """`value`, of the documented form, as Python's and Django's parsers read it: they take a
    lowercase `t` but not a lowercase `z` (RFC 3339 allows both)."""
    return value[:-1] + "Z" if value.endswith("z") else value


def parse_iso_datetime(value: str) -> dt.datetime | None:
    """django.utils.dateparse.parse_datetime for the documented form only: None for any
    other; ValueError, as Django's, for one in form that is no date (month 13)."""
    return parse_datetime(iso_datetime_canonical(value)) if is_iso_datetime_form(value) else None


_DAY_FORM = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def is_iso_day_form(value: str) -> bool:
    """Whether `value` is a day in the documented form, YYYY-MM-DD: strptime's `%Y-%m-%d`
    also reads `2024-3-5`, and fromisoformat `20240305` and week dates."""
    return _DAY_FORM.fullmatch(value) is not None
