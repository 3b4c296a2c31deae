"""Keyset (cursor) pagination: stable under inserts, no COUNT, cost independent of depth.

DRF's CursorPagination keys on the first ordering field only and falls back to an OFFSET
for ties, which breaks down when many rows share a timestamp (every task of a workflow is
created in one transaction, so they all share created_at). Here the cursor holds every
ordering field of the row it stops at, ending in a unique one, and the next page is the
rows strictly after it in that order: WHERE created_at <= :c AND (created_at < :c OR
(created_at = :c AND pk < :p)).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import connection
from django.db.models import Model, Q, QuerySet
from rest_framework.exceptions import ValidationError
from rest_framework.pagination import BasePagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.utils.urls import remove_query_param, replace_query_param


def _encode_value(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return value


class KeysetPagination(BasePagination):
    cursor_query_param = "cursor"
    page_size_query_param = "limit"

    def get_page_size(self, request: Request) -> int:
        raw = request.query_params.get(self.page_size_query_param)
        if raw is None:
            return settings.API_PAGE_SIZE
        try:
            size = int(raw)
        except ValueError:
            size = 0
        if not 1 <= size <= settings.API_MAX_PAGE_SIZE:
            raise ValidationError({"limit": [f"must be an integer between 1 and {settings.API_MAX_PAGE_SIZE}"]})
        return size

    def _fields(self, model: type[Model]) -> list[tuple[str, bool]]:
        """(attribute, descending) per ordering entry; 'pk' means the primary key."""
        fields = []
        for entry in self.ordering:
            name = entry.lstrip("-")
            if name == "pk":
                name = model._meta.pk.name
            fields.append((name, entry.startswith("-")))
        return fields

    def _decode(self, request: Request, model: type[Model]) -> tuple[list[Any], bool] | None:
        raw = request.query_params.get(self.cursor_query_param)
        if raw is None:
            return None
        try:
            data = json.loads(base64.urlsafe_b64decode(raw.encode("ascii") + b"=" * (-len(raw) % 4)))
            values, reverse = data["v"], bool(data.get("r", False))
            fields = self._fields(model)
            if not isinstance(values, list) or len(values) != len(fields):
                raise ValueError
            values = [
                model._meta.get_field(name).to_python(value) for (name, _), value in zip(fields, values, strict=True)
            ]
            if any(value is None for value in values):
                raise ValueError
        except (ValueError, KeyError, TypeError, binascii.Error, UnicodeError, DjangoValidationError):
            raise ValidationError({"cursor": ["is not a cursor this endpoint handed out"]}) from None
        return values, reverse

    def _encode(self, instance: Model, fields: list[tuple[str, bool]], *, reverse: bool) -> str:
        values = [_encode_value(getattr(instance, name)) for name, _ in fields]
        data = {"v": values, "r": True} if reverse else {"v": values}
        raw = base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode()).decode().rstrip("=")
        return replace_query_param(self.base_url, self.cursor_query_param, raw)

    @staticmethod
    def _after(fields: list[tuple[str, bool]], values: list[Any], *, reverse: bool) -> Q:
        """Rows strictly after `values` in the order (before them when reverse)."""
        condition = Q()
        for i, (name, descending) in enumerate(fields):
            lookup = "lt" if descending != reverse else "gt"
            term = Q(**{f"{fields[j][0]}": values[j] for j in range(i)}) & Q(**{f"{name}__{lookup}": values[i]})
            condition |= term
        first, descending = fields[0]
        bound = "lte" if descending != reverse else "gte"
        # The redundant bound on the first field lets PostgreSQL range-scan its index.
        return Q(**{f"{first}__{bound}": values[0]}) & condition

    def _after_rows(
        self, queryset: QuerySet, fields: list[tuple[str, bool]], values: list[Any], *, reverse: bool
    ) -> QuerySet:
        """Rows after the cursor. With one direction throughout (every ordering here), as a
        row comparison, `(a, b) > (x, y)`, which PostgreSQL turns into one index range
        condition; the equivalent OR of ANDs only bounds the first column, so a deep page of
        a filtered list would read every entry before it."""
        if len({descending for _, descending in fields}) != 1:
            return queryset.filter(self._after(fields, values, reverse=reverse))
        model = queryset.model
        quote = connection.ops.quote_name
        columns = []
        params = []
        for (name, _), value in zip(fields, values, strict=True):
            field = model._meta.get_field(name)
            columns.append(f"{quote(model._meta.db_table)}.{quote(field.column)}")
            params.append(field.get_db_prep_value(value, connection))
        operator = "<" if fields[0][1] != reverse else ">"
        placeholders = ", ".join(["%s"] * len(params))
        # Column names come from the model, values are parameters: nothing from the client is
        # spliced into the SQL.
        where = f"({', '.join(columns)}) {operator} ({placeholders})"
        first, descending = fields[0]
        bound = {f"{first}__{'lte' if descending != reverse else 'gte'}": values[0]}  # for an index on `first` alone
        return queryset.filter(**bound).extra(where=[where], params=params)  # noqa: S610

    def paginate_queryset(self, queryset: QuerySet, request: Request, view: Any = None) -> list[Model]:
        self.ordering = tuple(getattr(view, "cursor_ordering", ("-created_at", "-pk")))
        self.base_url = request.build_absolute_uri()
        page_size = self.get_page_size(request)
        model = queryset.model
        fields = self._fields(model)
        cursor = self._decode(request, model)
        reverse = bool(cursor and cursor[1])
        order = [f"{'-' if descending != reverse else ''}{name}" for name, descending in fields]
        queryset = queryset.order_by(*order)
        if cursor is not None:
            queryset = self._after_rows(queryset, fields, cursor[0], reverse=reverse)
        rows = list(queryset[: page_size + 1])
        more = len(rows) > page_size
        page = rows[:page_size]
        if reverse:
            page.reverse()
        self.next_link = self.previous_link = None
        if page:
            if more if not reverse else True:
                self.next_link = self._encode(page[-1], fields, reverse=False)
            if more if reverse else cursor is not None:
                self.previous_link = self._encode(page[0], fields, reverse=True)
        if not page and cursor is not None:
            self.previous_link = remove_query_param(self.base_url, self.cursor_query_param)
        return page

    def get_paginated_response(self, data: list[Any]) -> Response:
        return Response({"next": self.next_link, "previous": self.previous_link, "results": data})

    def get_paginated_response_schema(self, schema: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "object",
            "required": ["next", "previous", "results"],
            "properties": {
                "next": {"type": "string", "nullable": True, "format": "uri", "description": "the next page"},
                "previous": {"type": "string", "nullable": True, "format": "uri", "description": "the page before"},
                "results": schema,
            },
        }

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        return [
            {
                "name": self.cursor_query_param,
                "required": False,
                "in": "query",
                "description": "Opaque position from a previous page's `next` or `previous` link.",
                "schema": {"type": "string"},
            },
            {
                "name": self.page_size_query_param,
                "required": False,
                "in": "query",
                "description": f"Results per page (default {settings.API_PAGE_SIZE}).",
                "schema": {"type": "integer", "minimum": 1, "maximum": settings.API_MAX_PAGE_SIZE},
            },
        ]
