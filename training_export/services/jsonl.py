"""JSONL records per data type, read from the database (the source of truth).

Every exporter streams rows with a server-side cursor (a psycopg named cursor on PostgreSQL,
`QuerySet.iterator(chunk_size=...)` elsewhere) in chunks of CHUNK_SIZE rows, the next chunk
fetched in a thread while the current one is encoded, in a stable order with a unique
tiebreaker, and encodes each record as JSON with sorted keys and fixed separators, so the same
rows always give the same bytes (however they are chunked). Every record is redacted before it
is encoded: every text value (the event_id, the dedupe key the CSV partitions keep as it is
too, aside) and every JSON value. JSON values are read from their text (`json_load`), so a number
a float cannot hold is written as PostgreSQL stores it (`store.json_dumps_exact`).

Which rows belong to a window [start, end):
- events: created_at in the window, ordered by sequence;
- tool_executions: `tool_executed` events in the window, the call read from the payload (its
  execution_id, attempt_number and tool_call_id join it to the conversations' tool calls);
- tasks / workflows: finished (terminal status) with completed_at in the window, ordered by
  completed_at then id;
- conversations (chat format, services/chat.py): threads with a message in the window, each
  with its history up to the window end.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import math
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from itertools import islice
from typing import Any

import orjson
from django.db import connection
from django.db.models import BigIntegerField, Func, Max, QuerySet, TextField, Value
from django.db.models.functions import Cast, Coalesce

from orchestration.db import timestamptz_fast_loader
from orchestration.event_types import EventType
from orchestration.models import Event, TaskExecution, Workflow
from training_export.services.redaction import Redactor, current_redactor
from training_export.services.store import EVENTS, SCHEMAS, TASKS, TOOL_EXECUTIONS, WORKFLOWS, json_dumps_exact

# Rows per FETCH, decoded and encoded together: decoded rows take several times the memory of
# fetched ones, and with the next chunk fetched meanwhile, a larger chunk saves no time.
CHUNK_SIZE = 500
# At most this many bytes of row text per chunk (but at least one row): with the rows' size
# unbounded, a day of 500 tasks with 10 MB outputs was fetched, decoded and encoded at once.
CHUNK_BYTES = 8 * 1024 * 1024

# A change to any record layout below is a new schema version (recorded in every manifest).
SCHEMA_VERSION = "3"


def _default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    # A Decimal is a JSON number parsed exactly (json_load): written by json_dumps_exact.
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_ORJSON_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE | orjson.OPT_PASSTHROUGH_DATETIME


# The characters JSON lets a string hold unescaped that Python's str.splitlines() (and any reader
# splitting on Unicode line boundaries) ends a line at: written as they are, they cut their record
# in two pieces, neither of them JSON. Their escapes read back as the same text. (The other
# characters splitlines() breaks at are control characters, which JSON escapes.) Each UTF-8 form
# begins with a lead byte, so it matches only the character itself.
_UNICODE_LINE_BREAKS = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"))


def _line_breaks_escaped(line: bytes) -> bytes:
    """`line` with the Unicode line breaks above written as JSON escapes."""
    if line.isascii():
        return line
    for raw, escaped in _UNICODE_LINE_BREAKS:
        line = line.replace(raw, escaped)
    return line


def json_line(record: Any) -> bytes:
    """One deterministic JSONL line (UTF-8, sorted keys, no spaces, trailing newline, no other
    line break)."""
    try:
        line = orjson.dumps(record, default=_default, option=_ORJSON_OPTIONS)
    except TypeError:
        # orjson refuses integers beyond 64 bits and Decimals (exact JSON numbers, json_load):
        # the standard library, same layout, every number exact.
        line = (json_dumps_exact(record, default=_default) + "\n").encode("utf-8")
    return _line_breaks_escaped(line)


# Every ASCII digit but 0 maps to 0: a run of 19 zeros afterwards is a run of 19 digits. One
# translation and one substring search, several times faster than a regex search for \d{19}.
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_NINETEEN_DIGITS = b"0" * 19


def _may_hold_long_number(text: str) -> bool:
    """Whether JSON `text` may hold an integer of 19 digits or more (numbers in JSON are ASCII
    digits; a run inside a string only costs the slower parser)."""
    return _NINETEEN_DIGITS in text.encode("utf-8", "surrogatepass").translate(_DIGITS_TO_ZERO)


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def json_load_exact(text: str) -> Any:
    """Parse JSON text keeping every number exact: integers as int, numbers with a fraction or
    an exponent as Decimal (written back digit for digit by json_dumps_exact). NaN and
    Infinity, which Python's parser accepts, are refused (ValueError): they are not JSON."""
    return json.loads(text, parse_float=Decimal, parse_constant=_not_json)


def json_load(text: str) -> Any:
    """Parse JSON text (a jsonb value as PostgreSQL writes it, or a stream payload).

    Numbers: orjson reads them as int or float, which is exact for any number a 64-bit float
    holds to 15 significant digits or more. Text that may hold a number a float cannot hold
    (any run of 19 digits: an integer beyond 64 bits, a magnitude beyond a float's range, which
    would become Infinity and be written `null`, or one below 1e-18, which would become 0;
    PostgreSQL writes jsonb numbers without exponents, so their digits show), and text orjson
    refuses (`1e400`), is parsed by the standard library: its numbers stay exact, and one a
    float holds is a float as on the fast path (`_float_or_decimal`), so that a record with an
    id of 19 digits is still written by orjson."""
    if _may_hold_long_number(text):
        return _json_load_exact_floats(text)
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return _json_load_exact_floats(text)  # a number beyond a float's range, or an error to report


def _float_or_decimal(text: str) -> float | Decimal:
    """A JSON number with a fraction or an exponent: the float orjson would read when it holds
    the number (its shortest text is the same number, and it is 0 or at least 1e-18, the rule
    of `json_load`), else the exact Decimal. A Decimal anywhere in a record sends it down the
    standard library's slow path (`json_line`): a float is written 3 times faster."""
    exact = Decimal(text)
    value = float(text)
    if math.isfinite(value) and (value == 0 or abs(value) >= 1e-18) and Decimal(repr(value)) == exact:
        return value
    return exact


def _json_load_exact_floats(text: str) -> Any:
    return json.loads(text, parse_float=_float_or_decimal, parse_constant=_not_json)


def json_load_many(texts: list[str]) -> list[Any]:
    """`json_load` of each text, with one check for long numbers over all of them (joined by
    a newline, which no digit run crosses) instead of one per text."""
    if _may_hold_long_number("\n".join(texts)):
        return [json_load(text) for text in texts]
    loads = orjson.loads
    try:
        return [loads(text) for text in texts]
    except orjson.JSONDecodeError:
        return [json_load(text) for text in texts]


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(dt.UTC).isoformat()


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    """The time in UTC, for `record_line` to write (what `_iso` would give, encoded in C)."""
    if value is None or value.tzinfo is dt.UTC:
        return value
    return value.astimezone(dt.UTC)


_RECORD_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE


def record_line(record: Any) -> bytes:
    """`json_line` of a record whose datetimes are all in UTC (`_utc`): orjson writes those
    itself, exactly as `isoformat()` does (`2024-01-01T00:00:00.5+00:00`, no fraction when the
    microseconds are 0), instead of calling back into Python for each."""
    try:
        line = orjson.dumps(record, default=_default, option=_RECORD_OPTIONS)
    except TypeError:
        line = (json_dumps_exact(record, default=_default) + "\n").encode("utf-8")
    return _line_breaks_escaped(line)


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Lists of up to `size` consecutive items (itertools.batched from Python 3.12)."""
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: encoding a chunk allocates thousands of acyclic
    objects (freed by reference counting), each allocation counting toward a collection that
    would also traverse everything the process holds (measured: decoding a chunk took half
    the CPU time without them). Garbage made meanwhile is collected after."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def prefetched(fetch: Callable[[], list[Any]]) -> Iterator[list[Any]]:
    """What `fetch` returns, until it returns an empty list; the next call runs in a thread
    while the caller works on the current result. One call at a time (never two at once on
    the same cursor), and closing the generator waits for the call in flight."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="export-prefetch") as pool:
        pending = pool.submit(fetch)
        while rows := pending.result():
            pending = pool.submit(fetch)
            yield rows


@dataclass(frozen=True)
class Exporter:
    """How one data type becomes JSONL: the rows of a window and the record of a row."""

    data_type: str
    columns: tuple[str, ...]
    queryset: Callable[[dt.datetime, dt.datetime], QuerySet]
    record: Callable[[tuple[Any, ...], Redactor], dict[str, Any]]
    watermark_column: str
    json_columns: frozenset[str] = frozenset()
    record_columns: tuple[str, ...] = ()
    """The keys of every record, as the manifest lists them (`columns`: the rows' source)."""

    def count(self, start: dt.datetime, end: dt.datetime) -> int:
        return self.queryset(start, end).count()

    def watermark(self, start: dt.datetime, end: dt.datetime) -> str:
        """The highest `watermark_column` value read (deterministic for a closed window)."""
        highest = self.queryset(start, end).aggregate(highest=Max(self.watermark_column))["highest"]
        if isinstance(highest, dt.datetime):
            highest = _iso(highest)
        return f"{self.watermark_column}:{'' if highest is None else highest}"

    def lines(self, start: dt.datetime, end: dt.datetime) -> Iterator[bytes]:
        for batch in self.line_batches(start, end):
            yield from batch

    def line_batches(self, start: dt.datetime, end: dt.datetime) -> Iterator[list[bytes]]:
        """The window's JSONL lines in order, one list per chunk of rows."""
        redactor = current_redactor()
        for chunk in self.chunks(start, end):
            with gc_paused():
                lines = self._encode(chunk, redactor)
            yield lines

    def _encode(self, chunk: list[tuple[Any, ...]], redactor: Redactor) -> list[bytes]:
        record = self.record
        return [record_line(record(row, redactor)) for row in self._decoded(chunk)]

    def rows(self, start: dt.datetime, end: dt.datetime) -> Iterator[tuple[Any, ...]]:
        """The window's rows as tuples in `columns` order, JSON columns decoded."""
        for chunk in self.chunks(start, end):
            yield from self._decoded(chunk)

    def chunks(self, start: dt.datetime, end: dt.datetime) -> Iterator[list[tuple[Any, ...]]]:
        """The window's rows as tuples in `columns` order, in chunks of up to CHUNK_SIZE,
        streamed with a server-side cursor (JSON columns as their text on PostgreSQL).

        On PostgreSQL the queryset's SQL runs on a psycopg named cursor directly (the ORM's
        per-row conversions cost more than the rest of the export), and the next chunk is
        fetched in a thread while the caller encodes the current one, so the server produces
        rows meanwhile instead of waiting for the next FETCH (at most two chunks are held).
        A chunk also holds at most CHUNK_BYTES of row text (or one row): a second cursor over
        the same rows, in the same order and snapshot, gives each row's size before it is
        fetched. Must run inside a transaction (named cursors live in one)."""
        queryset = self.queryset(start, end).values_list(*self.columns)
        if connection.vendor != "postgresql":
            yield from batched(queryset.iterator(chunk_size=CHUNK_SIZE), CHUNK_SIZE)
            return
        sql, params = queryset.query.get_compiler(connection=connection).as_sql()
        size_sql, size_params = self._sizes(start, end).query.get_compiler(connection=connection).as_sql()
        connection.ensure_connection()
        with (
            connection.connection.cursor(name=f"export_{uuid.uuid4().hex}") as cursor,
            connection.connection.cursor(name=f"export_sizes_{uuid.uuid4().hex}") as size_cursor,
        ):
            # Parsing dates with Django's loader was a third of the fetch time.
            timestamptz_fast_loader(cursor, connection)
            cursor.execute(sql, params)
            size_cursor.execute(size_sql, size_params)
            sizes: deque[int] = deque()

            def fetch() -> list[tuple[Any, ...]]:
                count, total = 0, 0
                while count < CHUNK_SIZE:
                    if not sizes:
                        sizes.extend(size for (size,) in size_cursor.fetchmany(CHUNK_SIZE))
                        if not sizes:
                            break
                    if count and total + sizes[0] > CHUNK_BYTES:
                        break
                    total += sizes.popleft()
                    count += 1
                return cursor.fetchmany(count) if count else []

            yield from prefetched(fetch)

    def _sizes(self, start: dt.datetime, end: dt.datetime) -> QuerySet:
        """The size of each of the window's rows (the bytes of its columns as text), in the
        rows' order."""
        as_bytes = BigIntegerField()
        size = sum(
            (
                Coalesce(Func(Cast(column, TextField()), function="octet_length", output_field=as_bytes), 0)
                for column in self.columns
            ),
            Value(0, output_field=as_bytes),
        )
        return self.queryset(start, end).annotate(export_row_bytes=size).values_list("export_row_bytes")

    def _decoded(self, chunk: list[tuple[Any, ...]]) -> list[Any]:
        """The chunk's rows with their JSON columns decoded (the ORM's rows, not PostgreSQL's,
        arrive decoded already)."""
        positions = [i for i, column in enumerate(self.columns) if column in self.json_columns]
        if not positions or connection.vendor != "postgresql":
            return chunk
        rows = [list(row) for row in chunk]
        for i in positions:
            values = iter(json_load_many([row[i] for row in chunk if row[i] is not None]))
            for row in rows:
                if row[i] is not None:
                    row[i] = next(values)
        return rows


def _events_queryset(start: dt.datetime, end: dt.datetime) -> QuerySet:
    return Event.objects.filter(created_at__gte=start, created_at__lt=end).order_by("sequence")


_EVENT_COLUMNS = SCHEMAS[EVENTS].columns
# Every text column but the event_id, the dedupe key (never redacted in the CSV partitions either).
_EVENT_TEXT_COLUMNS = tuple(
    column for column in _EVENT_COLUMNS if column not in ("event_id", "sequence", "created_at", "payload")
)


def _event_record(row: tuple[Any, ...], redactor: Redactor) -> dict[str, Any]:
    record = dict(zip(_EVENT_COLUMNS, row, strict=True))
    record["created_at"] = _utc(record["created_at"])
    text = redactor.text
    for column in _EVENT_TEXT_COLUMNS:
        value = record[column]
        if type(value) is str:
            record[column] = text(value)
        elif value is not None:
            record[column] = redactor.value(value)
    record["payload"] = redactor.value(record["payload"])
    return record


def _tool_queryset(start: dt.datetime, end: dt.datetime) -> QuerySet:
    return _events_queryset(start, end).filter(event_type=EventType.TOOL_EXECUTED)


_TOOL_SOURCE_COLUMNS = ("sequence", "event_id", "entity_id", "agent_id", "workflow_id", "created_at", "payload")
# The call's fields in the event's payload: the CSV partitions' columns up to the error (with
# execution_id, `attempt_number` and `tool_call_id` join a call to the assistant message that
# asked for it; the conversations export's keys file names the same three for each call).
_TOOL_PAYLOAD_FIELDS = SCHEMAS[TOOL_EXECUTIONS].columns[: SCHEMAS[TOOL_EXECUTIONS].columns.index("error")]


def _tool_record(row: tuple[Any, ...], redactor: Redactor) -> dict[str, Any]:
    sequence, event_id, entity_id, agent_id, workflow_id, created_at, payload = row
    payload = payload if isinstance(payload, dict) else {}
    record = {name: payload.get(name) for name in _TOOL_PAYLOAD_FIELDS}
    # The event's own columns name the tool call and the agent when the payload does not
    # (the same rule as the CSV partitions, services/synapse.py).
    record["execution_id"] = record["execution_id"] or entity_id
    record["agent_id"] = record["agent_id"] or agent_id
    record.update(
        error=payload.get("error"),
        event_id=event_id,
        sequence=sequence,
        workflow_id=workflow_id,
        created_at=_utc(created_at),
    )
    # The record's own keys are the schema's fixed columns, never credentials by name (as in
    # the CSV partitions): only their values are redacted.
    value = redactor.value
    return {name: value(item) for name, item in record.items()} | {"event_id": event_id, "sequence": sequence}


def _tasks_queryset(start: dt.datetime, end: dt.datetime) -> QuerySet:
    return TaskExecution.objects.filter(
        completed_at__gte=start, completed_at__lt=end, status__in=TaskExecution.TERMINAL_STATUSES
    ).order_by("completed_at", "execution_id")


_TASK_COLUMNS = tuple(column for column in SCHEMAS[TASKS].columns if column != "event_id")
_DATETIME_COLUMNS = frozenset({"created_at", "started_at", "completed_at"})


def _plain_record(
    columns: tuple[str, ...], json_columns: frozenset[str] = frozenset()
) -> Callable[[tuple[Any, ...], Redactor], dict[str, Any]]:
    def record(row: tuple[Any, ...], redactor: Redactor) -> dict[str, Any]:
        out = {}
        for column, value in zip(columns, row, strict=True):
            if column in _DATETIME_COLUMNS:
                out[column] = _utc(value)
            elif isinstance(value, Decimal) and column not in json_columns:
                out[column] = float(value)  # a numeric(14, 6) cost: 14 digits, which a float prints back
            else:
                out[column] = redactor.value(value)
        return out

    return record


def _workflows_queryset(start: dt.datetime, end: dt.datetime) -> QuerySet:
    return Workflow.objects.filter(
        completed_at__gte=start, completed_at__lt=end, status__in=Workflow.TERMINAL_STATUSES
    ).order_by("completed_at", "workflow_id")


_WORKFLOW_COLUMNS = tuple(column for column in SCHEMAS[WORKFLOWS].columns if column != "event_id")

TOOL_RECORD_COLUMNS = (*_TOOL_PAYLOAD_FIELDS, "error", "workflow_id", "created_at", "event_id", "sequence")

EXPORTERS: dict[str, Exporter] = {
    EVENTS: Exporter(
        EVENTS,
        _EVENT_COLUMNS,
        _events_queryset,
        _event_record,
        "sequence",
        frozenset({"payload"}),
        record_columns=_EVENT_COLUMNS,
    ),
    TOOL_EXECUTIONS: Exporter(
        TOOL_EXECUTIONS,
        _TOOL_SOURCE_COLUMNS,
        _tool_queryset,
        _tool_record,
        "sequence",
        frozenset({"payload"}),
        record_columns=TOOL_RECORD_COLUMNS,
    ),
    TASKS: Exporter(
        TASKS,
        _TASK_COLUMNS,
        _tasks_queryset,
        _plain_record(_TASK_COLUMNS, frozenset({"input_data", "output_data"})),
        "completed_at",
        frozenset({"input_data", "output_data"}),
        record_columns=_TASK_COLUMNS,
    ),
    WORKFLOWS: Exporter(
        WORKFLOWS,
        _WORKFLOW_COLUMNS,
        _workflows_queryset,
        _plain_record(_WORKFLOW_COLUMNS),
        "completed_at",
        record_columns=_WORKFLOW_COLUMNS,
    ),
}
