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
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import orjson
from django.conf import settings
from django.core.exceptions import EmptyResultSet, FullResultSet
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import connection, connections
from django.db.models import IntegerField, JSONField, Model, Q, QuerySet
from django.db.models.sql import Query
from django.db.models.sql.datastructures import Join
from rest_framework.exceptions import ValidationError
from rest_framework.pagination import BasePagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.utils.urls import remove_query_param, replace_query_param

from orchestration.api.parsers import unstorable_text
from orchestration.db import timestamptz_fast_loader

Converter = Callable[[Any, Any, Any], Any]


def _encode_value(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return value


# orjson reads an integer beyond 64 bits as a float; the standard library keeps it exact.
_LONG_NUMBER = re.compile(r"\d{19}")


def _json_value(value: Any) -> Any:
    """JSONField.from_db_value (without a custom decoder), parsed by orjson unless the text
    may hold an integer beyond 64 bits."""
    if value is None:
        return None
    try:
        if not isinstance(value, str) or _LONG_NUMBER.search(value):
            return json.loads(value)
        return orjson.loads(value)
    except ValueError:  # both libraries' decode errors
        return value


class _PageStatement(NamedTuple):
    """A compiled `values_list(...)[:limit]` statement and how to read its rows."""

    sql: str
    columns: int
    json_columns: tuple[int, ...]
    converted: tuple[tuple[int, tuple[Converter, ...], Any], ...]


class _StatementCache:
    """Compiled page statements by shape (see _statement_key), least recently used first
    out beyond `size`: list shapes are few, but nothing may grow without bound."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[tuple, _PageStatement] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> _PageStatement | None:
        with self._lock:
            statement = self._entries.get(key)
            if statement is not None:
                self._entries.move_to_end(key)
            return statement

    def put(self, key: tuple, statement: _PageStatement) -> None:
        with self._lock:
            self._entries[key] = statement
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


page_statements = _StatementCache(size=256)


def _cacheable(query: Query) -> bool:
    """Whether the statement of `values_list(...)[:limit]` on `query` is a function of
    _statement_key's parts alone. Not with annotations, extra select or tables, DISTINCT,
    FOR UPDATE, a slice, UNION, GROUP BY, a filtered relation or an expression in ORDER BY
    (parts that may carry parameters or that the key does not hold): those are compiled
    every time."""
    return not (
        query.annotations
        or query.extra
        or query.extra_tables
        or query.extra_order_by
        or query.distinct
        or query.distinct_fields
        or query.select_for_update
        or query.combinator
        or query.group_by is not None
        or query.select
        or query.values_select
        or query.is_sliced
        or query._filtered_relations
        or not all(isinstance(entry, str) for entry in query.order_by)
    )


def _statement_key(query: Query, names: Sequence[str], limit: int, db: Any, where: str) -> tuple:
    """Everything the statement of `values_list(*names)[:limit]` on a _cacheable `query`
    depends on but its WHERE clause's parameters: the database (alias and vendor), the
    model, the columns, the tables and joins, the ordering, the limit and the WHERE clause
    as SQL text (values are parameters: one filter shape, one key). The WHERE text is last."""
    tables = tuple(
        (alias, query.alias_refcount.get(alias), table.identity, getattr(table, "join_type", None), table.nullable)
        if isinstance(table, Join)
        else (alias, query.alias_refcount.get(alias), table.identity)
        for alias, table in query.alias_map.items()
    )
    return (
        db.alias,
        db.vendor,
        type(query),
        query.model,
        tuple(names),
        limit,
        tables,
        query.order_by,
        query.standard_ordering,
        query.default_ordering,
        where,
    )


def _compile_page(queryset: QuerySet, names: Sequence[str], limit: int) -> tuple[_PageStatement, tuple] | None:
    """Django's statement for the page and its parameters; None when it selects nothing."""
    selected = queryset.values_list(*names)[:limit]
    compiler = selected.query.get_compiler(selected.db)
    try:
        sql, params = compiler.as_sql()
    except EmptyResultSet:
        return None
    columns = [column for column, _, _ in compiler.select[: compiler.col_count]]
    json_columns = []
    converted = []
    for i, (converters, expression) in compiler.get_converters(columns).items():
        field = getattr(expression, "output_field", None)
        if isinstance(field, JSONField) and field.decoder is None and converters == [field.from_db_value]:
            json_columns.append(i)
        else:
            converted.append((i, tuple(converters), expression))
    return _PageStatement(sql, len(columns), tuple(json_columns), tuple(converted)), tuple(params)


def fetch_rows(queryset: QuerySet, names: Sequence[str], *, limit: int) -> list[dict[str, Any]]:
    """The first `limit` rows of `queryset.values(*names)`, read on a bare cursor with each
    column's converters looked up once per query rather than through Django's per-row
    iterators (JSON columns parsed by orjson). The statement is the one Django compiles,
    compiled once per shape (_statement_key): after that a request compiles only its WHERE
    clause, for the parameters, where Django's full compilation of the same statement (the
    columns, joins, ordering) cost more than running it."""
    query = queryset.query
    if query.extra_select or query.annotation_select:
        selected = queryset.values_list(*names).query
        if selected.extra_select or selected.annotation_select:
            return list(queryset.values(*names)[:limit])  # columns not in `names` order: Django's way
    db = connections[queryset.db]
    key = where_params = None
    if _cacheable(query):
        try:
            where, where_params = query.get_compiler(connection=db).compile(query.where)
        except EmptyResultSet:
            return []
        except FullResultSet:
            where, where_params = "", []
        key = _statement_key(query, names, limit, db, where)
    statement = page_statements.get(key) if key is not None else None
    if statement is not None:
        params = tuple(where_params)
    else:
        compiled = _compile_page(queryset, names, limit)
        if compiled is None:
            return []
        statement, params = compiled
        # Replayed with a later request's WHERE parameters: only a statement whose
        # parameters are exactly its WHERE clause's.
        if key is not None and params == tuple(where_params) and key[-1] in statement.sql:
            page_statements.put(key, statement)
    with db.cursor() as cursor:
        timestamptz_fast_loader(cursor.cursor, db)
        cursor.execute(statement.sql, params)
        raw = cursor.fetchall()
    rows = []
    for row in raw:
        values = list(row[: statement.columns])
        for i in statement.json_columns:
            values[i] = _json_value(values[i])
        for i, converters, expression in statement.converted:
            for converter in converters:
                values[i] = converter(values[i], expression, db)
        rows.append(dict(zip(names, values, strict=True)))
    return rows


class KeysetPagination(BasePagination):
    cursor_query_param = "cursor"
    page_size_query_param = "limit"

    def get_page_size(self, request: Request) -> int:
        raw = request.query_params.get(self.page_size_query_param)
        if raw is None:
            return settings.API_PAGE_SIZE
        # Digits 0-9 only: int() also reads "1_0", " 5 " and other scripts' digits.
        try:
            size = int(raw) if raw.isascii() and raw.isdigit() else 0
        except ValueError:  # more digits than int() reads (4 300)
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
            if unstorable_text(values):  # NUL, a lone surrogate, 1e400: PostgreSQL takes none of them
                raise ValueError
            model_fields = [model._meta.get_field(name) for name, _ in fields]
            # Each value as handed out (an integer column's an integer, any other's a string) and
            # in its column's range: to_python reads `true` as 1 and an object as its repr, and
            # 2**70 reaches PostgreSQL, which answers a page that no cursor here led to.
            if any(
                type(value) is not (int if isinstance(field, IntegerField) else str)
                for field, value in zip(model_fields, values, strict=True)
            ):
                raise ValueError
            values = [field.to_python(value) for field, value in zip(model_fields, values, strict=True)]
            for field, value in zip(model_fields, values, strict=True):
                field.run_validators(value)
            if any(value is None for value in values):
                raise ValueError
            # In UTC, as handed out: PostgreSQL refuses UTC offsets beyond 15:59.
            values = [
                value.astimezone(dt.UTC) if isinstance(value, dt.datetime) and value.utcoffset() is not None else value
                for value in values
            ]
        except (
            ValueError,
            KeyError,
            TypeError,
            OverflowError,
            RecursionError,
            binascii.Error,
            UnicodeError,
            DjangoValidationError,
        ):
            raise ValidationError({"cursor": ["is not a cursor this endpoint handed out"]}) from None
        return values, reverse

    def _encode(self, row: Model | dict[str, Any], fields: list[tuple[str, bool]], *, reverse: bool) -> str:
        if isinstance(row, dict):
            values = [_encode_value(row[name]) for name, _ in fields]
        else:
            values = [_encode_value(getattr(row, name)) for name, _ in fields]
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

    @staticmethod
    def _fixed_prefix_bound(
        model: type[Model], fields: list[tuple[str, bool]], values: list[Any], fixed: dict[str, Any], *, reverse: bool
    ) -> dict[str, Any]:
        """When the leading ordering fields are fixed by an equality filter (`fixed`: field
        -> the filter's value) and the cursor holds those same values, the rows after it are
        the rows after it in the next field: that field's bound, as a filter. Implied by
        the row comparison, but PostgreSQL positions its index scan on it, where with an
        equality on the first column it would walk that column's entries from the start
        and check the row comparison on each (a page 50 000 events deep: 3 ms, not 0.3)."""
        k = 0
        while k < len(fields) - 1 and fields[k][0] in fixed:
            name = fields[k][0]
            try:
                if model._meta.get_field(name).to_python(fixed[name]) != values[k]:
                    break
            except DjangoValidationError:
                break
            k += 1
        if k == 0:
            return {}
        name, descending = fields[k]
        lookup = "lt" if descending != reverse else "gt"
        return {f"{name}__{lookup if k == len(fields) - 1 else lookup + 'e'}": values[k]}

    def _after_rows(
        self,
        queryset: QuerySet,
        fields: list[tuple[str, bool]],
        values: list[Any],
        *,
        reverse: bool,
        fixed: dict[str, Any] | None = None,
    ) -> QuerySet:
        """Rows after the cursor. With one direction throughout (every ordering here), as a
        row comparison, `(a, b) > (x, y)`, which PostgreSQL turns into one index range
        condition; the equivalent OR of ANDs only bounds the first column, so a deep page of
        a filtered list would read every entry before it."""
        if fixed:
            queryset = queryset.filter(
                **self._fixed_prefix_bound(queryset.model, fields, values, fixed, reverse=reverse)
            )
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

    def paginate_queryset(
        self, queryset: QuerySet, request: Request, view: Any = None, *, values: Sequence[str] | None = None
    ) -> list[Any]:
        """The page as model instances, or with `values` (names for QuerySet.values()) as
        dicts of those values."""
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
            fixed = getattr(view, "cursor_fixed", None)
            queryset = self._after_rows(queryset, fields, cursor[0], reverse=reverse, fixed=fixed)
        if values is None:
            rows = list(queryset[: page_size + 1])
        else:
            names = [*values, *(name for name, _ in fields if name not in values)]
            rows = fetch_rows(queryset, names, limit=page_size + 1)
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
