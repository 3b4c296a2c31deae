"""The console's lists over tables of millions of rows (events, workflows, tasks, attempts,
messages): a page must not cost a scan of the table.

Django's changelist counts the filtered rows for its paginator, and its `date_hierarchy` and
"all values" filters read every row (`SELECT DISTINCT`); at 1 M workflows and 5 M events each
of these took 0.3 to 2.5 s per page view. Here the count stops at ADMIN_COUNT_LIMIT rows (the
page says "more than 10000"; filters and search narrow a list further), and the values a filter
offers come from a loose index scan: one index probe per distinct value instead of a pass
over the table.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from django.contrib import admin
from django.core.paginator import Paginator
from django.db import connections, models
from django.db.models import Q, QuerySet
from django.db.models.constants import LOOKUP_SEP
from django.http import HttpRequest
from django.utils.text import smart_split, unescape_string_literal

from orchestration.admin.base import CheckedChangeList, MaskedLookupsMixin

ADMIN_COUNT_LIMIT = 10_000
# At most this many values in a filter's list (a column with more is searched instead).
FILTER_VALUES_LIMIT = 200


class CappedCountPaginator(Paginator):
    """Counts at most ADMIN_COUNT_LIMIT + 1 rows (`SELECT count(*) FROM (… LIMIT n)`): the last
    pages of a longer list are reached by narrowing it, not by paging through it."""

    @cached_property
    def count(self) -> int:
        # Any n rows count the same: without the list's order, the database stops at the n-th
        # row it reads. With it (a LIMIT keeps the ORDER BY), a list sorted by a column no
        # index holds sorted the whole table to count it (0.5 s of events by "created at" at
        # 4 M events, as much again as the page itself).
        return self.object_list.order_by()[: ADMIN_COUNT_LIMIT + 1].count()

    @property
    def capped(self) -> bool:
        return self.count > ADMIN_COUNT_LIMIT


class DeferringChangeList(CheckedChangeList):
    """A changelist whose rows leave out what its page does not show (its ModelAdmin's
    `list_deferred`): JSON documents of the row or of the rows `list_select_related` joins
    (a workflow's spec and step results grow with its tasks), which the database would send
    and Python decode for every line (a page of tasks of 5,000-task workflows took 12 s, 8 of
    them decoding their workflows' specs, once per line)."""

    def get_queryset(self, request: HttpRequest, exclude_parameters: Any = None) -> QuerySet:
        queryset = super().get_queryset(request, exclude_parameters)
        return queryset.defer(*self.model_admin.list_deferred) if self.model_admin.list_deferred else queryset

    def get_ordering_field(self, field_name: Any) -> Any:
        """No order for a column the ModelAdmin's `sortable_by` leaves out: Django leaves out only
        its header's link, and still sorts by the column a URL's `?o=` names."""
        if self.sortable_by is not None and field_name not in self.sortable_by:
            return None
        return super().get_ordering_field(field_name)


class LargeTableAdmin(MaskedLookupsMixin, admin.ModelAdmin):
    """A ModelAdmin for a table of millions of rows: capped count, no count of the whole table.
    Leave `date_hierarchy` unset on such tables (it reads every row's date); a date
    `list_filter` offers the same ranges without reading any."""

    paginator = CappedCountPaginator
    show_full_result_count = False
    # `=` search fields whose values a client chooses (an idempotency key): one may be another
    # row's name, so a row found by it does not end the search as a generated id does.
    client_chosen_ids: tuple[str, ...] = ()
    # `=` search fields holding ids the platform writes lower-case (the UUIDs it generates,
    # Celery's message ids): a term is matched to them as typed and lower-cased, each by the
    # column's index, never by Django's UPPER(column), and through a to-many relation by a
    # subquery, not by a join the list must read DISTINCT. Any other `=` field keeps Django's
    # case-insensitive match (a client's own string may differ in case from what is pasted).
    lower_case_ids: tuple[str, ...] = ()
    # Columns (of the row, or `relation__column` of a joined row) the list does not show.
    list_deferred: tuple[str, ...] = ()

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[CheckedChangeList]:
        return DeferringChangeList

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str) -> tuple[QuerySet, bool]:
        """An id pasted whole (the `=` search fields) is found by its index. Django's search reads
        every row for it: its `=` compares UPPER(column), which no index holds, OR-ed with the
        substring fields, which none can serve either (0.7 s for one id at 300 000 workflows,
        twice per page). Each id column is probed on its own (an OR across joined tables is no
        index condition); the substring search runs only when no row has the id."""
        term = search_term.strip()
        ids = [
            name[1:]
            for name in self.get_search_fields(request)
            if name.startswith("=") and name[1:] not in self.client_chosen_ids
        ]
        if term and ids:
            pks = self._found_by_id(queryset, ids, term)
            if pks:
                return queryset.filter(pk__in=pks), False
        if not self.lower_case_ids:
            return super().get_search_results(request, queryset, search_term)
        return queryset.filter(self._words_match(request, queryset, search_term)), False

    def _found_by_id(self, queryset: QuerySet, ids: list[str], value: str) -> set[Any]:
        """The rows (at most ADMIN_COUNT_LIMIT + 1 per column) whose id columns hold `value`,
        each column probed on its own (an OR across joined tables is no index condition)."""
        pks: set[Any] = set()
        for name in ids:
            values = {value, value.lower()} if name in self.lower_case_ids else {value}
            matching = queryset.filter(**{f"{name}__in": sorted(values)})
            pks.update(matching.values_list("pk", flat=True)[: ADMIN_COUNT_LIMIT + 1])
        return pks

    def _words_match(self, request: HttpRequest, queryset: QuerySet, search_term: str) -> Q:
        """Django's search (each word of the term in one of the search fields, a quoted phrase
        as one word), with the `lower_case_ids` looked up first by their indexes and the rows
        found named by their primary keys: a word in no row then costs one read of the table
        for the substring fields. Left in the statement (as an IN subquery, or an OR-ed
        UPPER(id) that Django writes), they turned the planner to the list's date index, read
        backwards to its end for the first rows that match: 1.1 s of a page at 900 000 tasks."""
        words = [
            unescape_string_literal(bit) if bit.startswith(('"', "'")) and bit[0] == bit[-1] else bit
            for bit in smart_split(search_term)
        ]
        condition = Q()
        for word in words:
            # No rows found by an id is an IN of nothing, which Django leaves out of the OR (an
            # empty Q() instead would match every row when the word is in no other field).
            either = Q(pk__in=self._found_by_id(queryset, list(self.lower_case_ids), word))
            for name in self.get_search_fields(request):
                path = name.lstrip("^=@")
                if name.startswith("=") and path in self.lower_case_ids:
                    continue
                either |= self._substring_match(name, path, word)
            condition &= either
        return condition

    def _substring_match(self, name: str, path: str, word: str) -> Q:
        lookup = {"^": "istartswith", "=": "iexact", "@": "search"}.get(name[0], "icontains")
        relation, _, column = path.partition(LOOKUP_SEP)
        if not column:
            return Q(**{f"{path}__{lookup}": word})
        field = self.opts.get_field(relation)
        if field.one_to_many or field.many_to_many:
            # Joined, a row with several matching related rows (a task's attempts) would be listed
            # once per match, and this search tells Django's list there are no duplicates.
            return Q(pk__in=self.model._default_manager.filter(**{f"{path}__{lookup}": word}).values("pk"))
        # A joined row's column (the workflow's name) is matched in its own table first: across
        # the join, every row of the list was joined to its workflow to compare it (1.2 s of a
        # count's 1.6 s at 900 000 tasks). A few rows found are named; more, by a subquery.
        related = field.related_model._default_manager
        matching = related.filter(**{f"{column}__{lookup}": word}).values_list("pk", flat=True)
        found = list(matching[: FILTER_VALUES_LIMIT + 1])
        return Q(**{f"{relation}__in": found if len(found) <= FILTER_VALUES_LIMIT else matching})


def distinct_indexed_values(
    model: type[models.Model], column: str, *, limit: int | None = FILTER_VALUES_LIMIT
) -> list[Any]:
    """The distinct non-NULL values of `column` (the first column of a btree index), in order,
    at most `limit`: on PostgreSQL a recursive query that probes the index once per value (it
    has no skip scan of its own); elsewhere a plain DISTINCT."""
    connection = connections[model.objects.db]
    if connection.vendor != "postgresql":
        values = model.objects.exclude(**{f"{column}__isnull": True}).order_by(column)
        return list(values.values_list(column, flat=True).distinct()[:limit])
    quote = connection.ops.quote_name
    table, col = quote(model._meta.db_table), quote(column)
    # Names come from the model; the limit is a parameter.
    sql = f"""
        WITH RECURSIVE walk(value) AS (
            (SELECT {col} FROM {table} WHERE {col} IS NOT NULL ORDER BY {col} LIMIT 1)
            UNION ALL
            SELECT (SELECT {col} FROM {table} WHERE {col} > walk.value ORDER BY {col} LIMIT 1)
            FROM walk WHERE walk.value IS NOT NULL
        )
        SELECT value FROM walk WHERE value IS NOT NULL LIMIT %s
    """  # noqa: S608
    with connection.cursor() as cursor:
        cursor.execute(sql, [limit])
        return [row[0] for row in cursor.fetchall()]


def _has_null(model: type[models.Model], column: str) -> bool:
    return model.objects.filter(**{f"{column}__isnull": True}).exists()


class IndexedValuesFieldListFilter(admin.AllValuesFieldListFilter):
    """`AllValuesFieldListFilter` whose values come from an index of the column
    (`distinct_indexed_values`), not from a DISTINCT over the table."""

    def __init__(self, field: models.Field, request: Any, params: Any, model: Any, model_admin: Any, field_path: str):
        super().__init__(field, request, params, model, model_admin, field_path)
        values = distinct_indexed_values(field.model, field.column)
        if field.null and _has_null(field.model, field.column):
            values.append(None)
        self.lookup_choices = values


class IndexedRelatedOnlyFieldListFilter(admin.RelatedFieldListFilter):
    """`RelatedOnlyFieldListFilter` (the related objects that occur) whose ids come from an index
    of the foreign key's column (`distinct_indexed_values`), not from a DISTINCT over the table.
    For a path through a relation (`workflow__owner`), the related objects that occur in the
    relation's table (the owners of any workflow)."""

    def field_choices(self, field: models.Field, request: Any, model_admin: Any) -> list[tuple[Any, str]]:
        # Every related object that occurs, as Django's filter offers (one index probe each): a
        # cut at FILTER_VALUES_LIMIT would silently drop the newest owners.
        ids = distinct_indexed_values(field.model, field.column, limit=None)
        ordering = self.field_admin_ordering(field, request, model_admin)
        return field.get_choices(include_blank=False, limit_choices_to={"pk__in": ids}, ordering=ordering)
