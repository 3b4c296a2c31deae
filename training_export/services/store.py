"""The training data store (seed 002): daily CSV partitions per data type.

Layout: `{TRAINING_DATA_DIR}/{type}/{type}_YYYY-MM-DD.csv` (UTC day), a header line, then one
row per record. Every row carries the `event_id` it came from, and a file never holds an
event_id twice: a redelivered stream entry or a repeated call is written once.

Every value is redacted (services/redaction.py) before it is encoded; a batch is first checked
as a whole (`Redactor.dirty`), and only the rows that check cannot clear are walked value by
value. Lines are built without the csv module, with the same bytes (`_csv_line`). A write is
durable when
it returns: the rows are appended with one write() under an exclusive
flock, then the file is fsynced (and its directory, when the file is new). The lock lets
several processes share a file (consumers of one group, workers calling the store API): under
it a process first reads whatever the others appended since it last looked, so its set of
written event_ids is complete before it filters. A torn last row (power lost between write and
fsync, so nothing acknowledged depends on it) is cut off before the next append. A file begun
under an earlier version's columns (`Schema.previous_columns`) keeps them to the day's end:
rows are appended to it in place, without the new columns (`_begun_with`).

JSON values are written with every number exact (`json_dumps_exact`); a float that is not
finite (NaN, Infinity: JSON has none) as no value.
"""

from __future__ import annotations

import csv
import datetime as dt
import fcntl
import io
import json
import logging
import math
import os
import re
import secrets
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from itertools import repeat
from pathlib import Path
from typing import Any, NamedTuple

import orjson
from django.conf import settings
from django.utils import timezone

from orchestration.ids import new_id
from training_export.services.files import fsync_dir, makedirs_durable, naming
from training_export.services.redaction import Redactor, current_redactor

logger = logging.getLogger(__name__)

# Payloads and model outputs easily exceed the csv module's default 128 KiB field limit,
# and the store must be able to re-read every row it wrote.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

EVENTS = "events"
TASKS = "tasks"
TOOL_EXECUTIONS = "tool_executions"
WORKFLOWS = "workflows"


@dataclass(frozen=True)
class Schema:
    columns: tuple[str, ...]
    json_columns: frozenset[str] = frozenset()
    # The columns of earlier versions: a day's file begun under one of them keeps them to its end
    # (rows appended to it leave the new columns out, `_begun_with`).
    previous_columns: tuple[tuple[str, ...], ...] = ()


SCHEMAS: dict[str, Schema] = {
    EVENTS: Schema(
        columns=(
            "event_id",
            "sequence",
            "event_type",
            "entity_type",
            "entity_id",
            "workflow_id",
            "agent_id",
            "session_id",
            "source",
            "severity",
            "created_at",
            "payload",
        ),
        json_columns=frozenset({"payload"}),
    ),
    TASKS: Schema(
        columns=(
            "execution_id",
            "workflow_id",
            "agent_id",
            "task_name",
            "task_type",
            "status",
            "input_data",
            "output_data",
            "error",
            "retry_count",
            "max_retries",
            "timeout_seconds",
            "execution_time_ms",
            "input_tokens",
            "output_tokens",
            "tokens_used",
            "cost_usd",
            "created_at",
            "started_at",
            "completed_at",
            "event_id",
        ),
        json_columns=frozenset({"input_data", "output_data"}),
    ),
    TOOL_EXECUTIONS: Schema(
        # With execution_id, attempt_number and tool_call_id join a call to the assistant
        # message that asked for it (as in the JSONL export).
        columns=(
            "execution_id",
            "attempt_number",
            "agent_id",
            "tool_name",
            "tool_call_id",
            "input_params",
            "output_result",
            "execution_time_ms",
            "error",
            "created_at",
            "event_id",
        ),
        json_columns=frozenset({"input_params", "output_result"}),
        previous_columns=(
            (
                "execution_id",
                "agent_id",
                "tool_name",
                "input_params",
                "output_result",
                "execution_time_ms",
                "error",
                "created_at",
                "event_id",
            ),
        ),
    ),
    WORKFLOWS: Schema(
        # cancelled_steps (continue_on_failure cancels what depends on a failure) and
        # wasted_cost_usd (what its failed, timed-out and lost tries cost) make the row's steps
        # and spend whole, as the API and the console show them.
        columns=(
            "workflow_id",
            "name",
            "workflow_type",
            "status",
            "total_steps",
            "completed_steps",
            "failed_steps",
            "cancelled_steps",
            "error",
            "duration_ms",
            "total_tokens_used",
            "total_cost_usd",
            "wasted_cost_usd",
            "created_at",
            "started_at",
            "completed_at",
            "event_id",
        ),
        previous_columns=(
            (
                "workflow_id",
                "name",
                "workflow_type",
                "status",
                "total_steps",
                "completed_steps",
                "failed_steps",
                "error",
                "duration_ms",
                "total_tokens_used",
                "total_cost_usd",
                "created_at",
                "started_at",
                "completed_at",
                "event_id",
            ),
        ),
    ),
}


_PARTITION_NAME = re.compile(r"(?P<type>[a-z_]+)_(?P<day>\d{4}-\d{2}-\d{2})\.csv")


def partitions_remove(root: Path, *, before: dt.date) -> list[Path]:
    """Delete the daily CSV partitions (of every type, under `root`) of days before `before`,
    for retention. Only files named as the store names them; the JSONL exports and anything
    else under `root` are left alone."""
    removed = []
    for data_type in SCHEMAS:
        directory = Path(root) / data_type
        if not directory.is_dir():
            continue
        for path in directory.iterdir():
            match = _PARTITION_NAME.fullmatch(path.name)
            if match is None or match["type"] != data_type or not path.is_file():
                continue
            try:
                day = dt.date.fromisoformat(match["day"])
            except ValueError:
                continue
            if day < before:
                path.unlink(missing_ok=True)
                removed.append(path)
    return sorted(removed)


def _schema(data_type: str) -> Schema:
    try:
        return SCHEMAS[data_type]
    except KeyError:
        raise ValueError(f"unknown data type {data_type!r}; expected one of {sorted(SCHEMAS)}") from None


class StoreError(RuntimeError):
    """A partition file the store cannot safely append to (foreign header, corrupt middle)."""


def json_text(value: Any) -> str:
    """Compact JSON with sorted keys, UTF-8 (non-ASCII characters are not escaped); numbers
    as `json_dumps_exact` writes them."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:
        # What orjson refuses: integers beyond 64 bits, Decimals (exact JSON numbers, see
        # jsonl.json_load) and non-string keys (which JSON turns into strings).
        return json_dumps_exact(value)


def json_dumps_exact(
    value: Any, *, separators: tuple[str, str] = (",", ":"), default: Callable[[Any], Any] | None = None
) -> str:
    """JSON text with sorted keys, non-ASCII characters as they are, and every number exact:
    an int as its digits whatever its size, a Decimal (a JSON number parsed exactly,
    `jsonl.json_load_exact`) as its digits (`decimal_text`). A float that is not finite
    (NaN, Infinity: JSON has none) is written `null`, as orjson writes it on the fast path.
    `default` serializes other types."""
    numbers: list[str] = []
    token = ""

    def number(item: Any) -> Any:
        if isinstance(item, Decimal):
            if not item.is_finite():
                return None
            numbers.append(decimal_text(item))
            return f"\x00{token}{len(numbers) - 1}\x00"
        if default is None:
            raise TypeError(f"{type(item).__name__} is not JSON serializable")
        return default(item)

    while True:
        token = secrets.token_hex(8)
        numbers.clear()
        try:
            text = json.dumps(
                value, sort_keys=True, separators=separators, ensure_ascii=False, allow_nan=False, default=number
            )
        except ValueError:
            numbers.clear()
            text = json.dumps(
                finite_or_none(value), sort_keys=True, separators=separators, ensure_ascii=False, default=number
            )
        if not numbers:
            return text
        # Each Decimal was written as a string holding a NUL, the token and its index, and the
        # digits go in its place. A string of the value may hold the same text (a NUL is written
        # escaped like the placeholder's): one holding the token, a chance of 2**-64, takes
        # another token rather than a number.
        if text.count(f"\\u0000{token}") == len(numbers):
            break
    placeholder = re.compile(f'"\\\\u0000{token}(\\d+)\\\\u0000"')
    return placeholder.sub(lambda match: numbers[int(match[1])], text)


# A Decimal is written without an exponent unless that takes more zeros than this beyond its
# digits (`1e1000000000`, from a tool call's arguments, would be a gigabyte of zeros).
PLAIN_DECIMAL_MAX_ZEROS = 1000


def decimal_text(value: Decimal) -> str:
    """A finite Decimal as JSON number text: its digits as PostgreSQL writes a jsonb number
    (no exponent), or with an exponent past PLAIN_DECIMAL_MAX_ZEROS zeros."""
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and abs(exponent) <= len(value.as_tuple().digits) + PLAIN_DECIMAL_MAX_ZEROS:
        return format(value, "f")
    return str(value)


def finite_or_none(value: Any) -> Any:
    """`value` with every float that is not finite (NaN, Infinity) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(item) for item in value]
    return value


def utc_isoformat(value: dt.datetime) -> str:
    if timezone.is_naive(value):
        raise ValueError(f"naive datetime {value.isoformat()}: the store needs timezone-aware datetimes")
    return value.astimezone(dt.UTC).isoformat()


def utc_day(value: dt.datetime) -> dt.date:
    if timezone.is_naive(value):
        raise ValueError(f"naive datetime {value.isoformat()}: the store needs timezone-aware datetimes")
    return value.astimezone(dt.UTC).date()


def _cell(value: Any, *, as_json: bool, redactor: Redactor) -> str:
    """The CSV text of one value, redacted."""
    kind = type(value)
    if value is None:
        return ""
    if kind is str and not as_json:
        return redactor.text(value)
    if as_json or kind is dict or kind is list:
        return json_text(redactor.value(value))
    if kind is int:
        return str(value)
    if kind is float:
        return str(value) if math.isfinite(value) else ""  # JSON's rule: not a number, none
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dt.datetime):
        return utc_isoformat(value)
    if isinstance(value, dict | list | tuple):
        return json_text(redactor.value(value))
    if isinstance(value, str):
        return str(redactor.text(value))
    return redactor.text(str(value))


def _encode_rows(schema: Schema, rows: Sequence[Mapping[str, Any]], *, clean: bool = False) -> list[tuple[str, str]]:
    """(event_id, CSV line) per row, every cell but the event_id redacted; the whole batch is
    validated and encoded before any file is touched. `clean`: the caller has checked that
    redaction changes none of the values (they are parts of values it checked)."""
    redactor = current_redactor()
    known = frozenset(schema.columns)
    json_columns = schema.json_columns
    plan = [(column, column in json_columns) for column in schema.columns if column != "event_id"]
    event_id_index = schema.columns.index("event_id")
    event_ids = []
    encoded: list[list[str]] = []
    texts: list[list[str]] = []  # per row: what the redactor would see, for Redactor.dirty
    json_texts: list[list[str]] = []
    json_values: list[list[Any]] = []
    for row in rows:
        if not known.issuperset(row):
            raise ValueError(f"unknown columns {sorted(set(row) - known)}")
        event_id = row.get("event_id")
        if not event_id:
            raise ValueError("every row needs an event_id (the dedupe key)")
        cells = []
        row_texts = []
        row_json = []
        row_values = []
        for column, as_json in plan:
            value = row.get(column)
            kind = type(value)
            if value is None:
                cells.append("")
            elif kind is str and not as_json:
                cells.append(value)
                row_texts.append(value)
            elif as_json or kind is dict or kind is list or isinstance(value, dict | list | tuple):
                text = json_text(value)
                cells.append(text)
                row_json.append(text)
                row_values.append(value)
            elif kind is int:
                cells.append(str(value))
            elif kind is float:
                cells.append(str(value) if math.isfinite(value) else "")
            elif isinstance(value, bool):
                cells.append("true" if value else "false")
            elif isinstance(value, dt.datetime):
                cells.append(utc_isoformat(value))
            else:
                text = str(value)
                cells.append(text)
                row_texts.append(text)
        event_ids.append(str(event_id))
        encoded.append(cells)
        texts.append(row_texts)
        json_texts.append(row_json)
        json_values.append(row_values)
    for index in () if clean else redactor.dirty(texts, json_texts, json_values):
        row = rows[index]
        encoded[index] = [_cell(row.get(column), as_json=as_json, redactor=redactor) for column, as_json in plan]
    lines = []
    for event_id, cells in zip(event_ids, encoded, strict=True):
        cells.insert(event_id_index, event_id)  # the dedupe key, never a secret: written as it is
        lines.append((event_id, _csv_line(cells)))
    return lines


def _check_encodable(encoded: list[tuple[str, str]]) -> None:
    """Refuse, before any file is touched, a row holding text no UTF-8 file can hold: a lone
    surrogate (from JSON text that escapes half of a pair, read by Python's parser). Found only
    when the batch was written, it failed the write with a UnicodeEncodeError naming no row,
    and left a new day's partition behind empty, without its header. (The consumer's rows come
    from PostgreSQL, or are dead-lettered when not UTF-8: they cannot hold one.)"""
    for event_id, line in encoded:
        try:
            line.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"the row of event_id {event_id!r} holds {line[exc.start : exc.end]!r}, a lone surrogate, which no "
                "UTF-8 file can hold: nothing was written"
            ) from None


class EventCells(NamedTuple):
    """An events row as text: `texts` are the cells from sequence to severity, in column order;
    `created_at` is the UTC ISO text; `payload_json` is `json_text(payload)`."""

    event_id: str
    texts: Sequence[str]
    created_at: str
    payload: Any
    payload_json: str


# The events columns between event_id and created_at, payload (the last two).
EVENT_TEXT_COLUMNS = SCHEMAS[EVENTS].columns[1:-2]


def encode_rows(data_type: str, rows: Sequence[Mapping[str, Any]], *, clean: bool = False) -> list[tuple[str, str]]:
    """The rows as (event_id, CSV line), redacted, for `TrainingDataStore.write_encoded`.
    `clean`: redaction is known to change none of their values (see `_encode_rows`)."""
    return _encode_rows(_schema(data_type), rows, clean=clean)


def encode_event_cells(rows: Sequence[EventCells]) -> list[tuple[str, str]]:
    """`encode_rows` of events rows whose cells are text already (the stream consumer's hot
    path, which skips building a row dict per entry): the same redaction and the same bytes."""
    return encode_event_cells_checked(rows)[0]


def encode_event_cells_checked(rows: Sequence[EventCells]) -> tuple[list[tuple[str, str]], list[str], set[int]]:
    """`encode_event_cells`, with each row's payload JSON as its line holds it (masked where
    the row needed it) and the indexes of the rows redaction changed or may have changed: the
    relay publishes those payloads, and a row that is not among them holds nothing to mask in
    any of its values (a tool_executions row taken from its payload, say)."""
    redactor = current_redactor()
    dirty = redactor.dirty(
        [row.texts for row in rows], [[row.payload_json] for row in rows], [[row.payload] for row in rows]
    )
    lines = []
    payloads = []
    for index, (event_id, texts, created_at, payload, payload_json) in enumerate(rows):
        if not event_id:
            raise ValueError("every row needs an event_id (the dedupe key)")
        if index in dirty:
            texts = [redactor.text(text) for text in texts]
            payload_json = json_text(redactor.value(payload))
        head = _csv_line([event_id, *texts, created_at])
        lines.append((event_id, f"{head[:-1]},{_csv_field(payload_json)}\n"))
        payloads.append(payload_json)
    return lines, payloads, dirty


def _csv_field(cell: str) -> str:
    if _NEEDS_QUOTES.search(cell) is None:
        return cell
    return '"' + cell.replace('"', '""') + '"'


def _quoted_characters() -> str:
    """The characters that make the csv module quote a field (delimiter, quote character and
    the line ends it treats as special), asked of the module itself, and a carriage return:
    the csv module's reader refuses one outside quotes ("new-line character seen in unquoted
    field"), which the writer of Python 3.11 leaves bare with lineterminator="\\n"."""
    found = "\r"
    for char in ',"\n\t\x00\x0b\x0c ;':
        buffer = io.StringIO()
        csv.writer(buffer, quoting=csv.QUOTE_MINIMAL, lineterminator="\n").writerow([f"a{char}b", "c"])
        if buffer.getvalue().startswith('"'):
            found += char
    return found


_QUOTED = _quoted_characters()
_NEEDS_QUOTES = re.compile(f"[{re.escape(_QUOTED)}]")
_NEEDS_QUOTES_BESIDES_COMMA = re.compile(f"[{re.escape(_QUOTED.replace(',', ''))}]")


def _csv_line(cells: list[str]) -> str:
    """The line `csv.writer(quoting=QUOTE_MINIMAL, lineterminator="\\n").writerow(cells)` writes,
    but with a field holding a carriage return quoted (`_quoted_characters`)."""
    if len(cells) == 1 and not cells[0]:
        return '""\n'  # the writer quotes a lone empty field, or the line would read as no field
    line = ",".join(cells)
    if line.count(",") == len(cells) - 1 and _NEEDS_QUOTES_BESIDES_COMMA.search(line) is None:
        return line + "\n"
    search = _NEEDS_QUOTES.search
    return ",".join([cell if search(cell) is None else '"' + cell.replace('"', '""') + '"' for cell in cells]) + "\n"


def _header_line(schema: Schema) -> str:
    return _csv_line(list(schema.columns))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@dataclass
class WriteResult:
    path: Path
    written: int = 0
    duplicates: int = 0


@dataclass
class _FileState:
    """What this process knows of one partition file."""

    ino: int
    dev: int
    end: int = 0  # bytes read or written so far: rows past it were appended by someone else
    seen: set[str] = field(default_factory=set)
    touched: float = 0.0  # time.monotonic() of the last write


class TrainingDataStore:
    """Appends rows to the daily CSV partitions under `root`, at most once per event_id per file.

    An instance caches the event_ids of the files it touched (rebuilt from the file the first
    time); several instances and processes may write the same files at once.
    """

    # A long-running consumer moves on to a new day's files every day: the event_ids of a file
    # are dropped once it has not been written for max_idle_seconds (a late event for it
    # scans the file again), and beyond max_cached_files, least recently written first.
    max_cached_files = 64
    max_idle_seconds = 15 * 60

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._files: OrderedDict[Path, _FileState] = OrderedDict()
        self._lock = threading.Lock()

    def path(self, data_type: str, day: dt.date) -> Path:
        _schema(data_type)
        return self.root / data_type / f"{data_type}_{day.isoformat()}.csv"

    def write_rows(self, data_type: str, day: dt.date, rows: Sequence[Mapping[str, Any]]) -> WriteResult:
        """Append the rows whose event_id the file does not hold yet; durable on return."""
        encoded = encode_rows(data_type, rows)
        _check_encodable(encoded)
        return self._append(data_type, day, encoded)

    def write_encoded(self, data_type: str, day: dt.date, encoded: list[tuple[str, str]]) -> WriteResult:
        """`write_rows` of rows encoded beforehand (`encode_rows`, `encode_event_cells`), so that
        a caller writing several files finds any row it cannot encode before touching one."""
        _schema(data_type)
        return self._append(data_type, day, encoded)

    def _append(self, data_type: str, day: dt.date, encoded: list[tuple[str, str]]) -> WriteResult:
        path = self.path(data_type, day)
        schema = SCHEMAS[data_type]
        result = WriteResult(path=path)
        with self._lock:
            makedirs_durable(path.parent)
            fd = _open_locked(path)
            written_from: int | None = None
            try:
                begun = _begun_with(fd, schema)
                if begun is not schema:
                    encoded = _relaid(encoded, schema, begun)
                    schema = begun
                state, first_look = self._catch_up(path, fd, schema)
                new_file = state.end == 0
                fresh_lines = [_header_line(schema)] if new_file else []
                seen = state.seen
                ids = [event_id for event_id, _ in encoded]
                fresh_ids = set(ids)
                if len(fresh_ids) == len(ids) and seen.isdisjoint(fresh_ids):
                    fresh_lines += [line for _, line in encoded]  # nothing to skip: the common case
                else:
                    fresh_ids = set()
                    for event_id, line in encoded:
                        if event_id in seen or event_id in fresh_ids:
                            result.duplicates += 1
                            continue
                        fresh_ids.add(event_id)
                        fresh_lines.append(line)
                text = "".join(fresh_lines)
                if text:
                    data = text.encode("utf-8")
                    written_from = state.end
                    _write_all(fd, data)
                    os.fsync(fd)
                    state.end += len(data)
                    state.seen |= fresh_ids
                    result.written = len(fresh_ids)
                    if new_file or first_look:
                        fsync_dir(path.parent)
                elif result.duplicates:
                    # Rows already in the file may be another writer's that never reached its
                    # fsync (it died in between; this process's own failed attempt, too), and
                    # the caller acknowledges them on return: make them durable first, with
                    # the file's directory entry when another writer created it.
                    os.fsync(fd)
                    if first_look:
                        fsync_dir(path.parent)
            except BaseException as exc:
                # The cached state may now claim rows that never reached the disk.
                self._files.pop(path, None)
                if written_from is not None:
                    # Rows of a short write or a failed fsync: after a reported writeback error
                    # Linux marks their pages clean, so a later fsync would not write them, and
                    # a retry would find them in the page cache and take them for durable. Cut
                    # them off (the lock is still held: nobody appended after them); the retry
                    # writes them again. Rows other writers left unsynced before them were
                    # covered by the failed fsync too and are not cut (they may be another
                    # writer's, synced and acknowledged): like any fsync error, this one is
                    # logged for an operator, since it may have cost rows on disk.
                    logger.error(
                        "%s: writing %d rows failed; cutting them off to write them again", path, len(fresh_ids)
                    )
                    try:
                        os.ftruncate(fd, written_from)
                    except OSError:
                        logger.exception(
                            "%s: cutting off the rows of a failed write failed: they stay in the file", path
                        )
                elif isinstance(exc, OSError):
                    logger.error("%s: %s", path, exc)  # an fsync of rows found in the file, say
                if isinstance(exc, OSError):
                    raise naming(exc, path) from exc
                raise
            finally:
                os.close(fd)  # also releases the flock
        return result

    def _catch_up(self, path: Path, fd: int, schema: Schema) -> tuple[_FileState, bool]:
        """The file's state, with the rows others appended since this process last looked;
        and whether this is the process's first look at the file (as it is now)."""
        stat = os.fstat(fd)
        state = self._files.get(path)
        first_look = state is None or (state.ino, state.dev) != (stat.st_ino, stat.st_dev) or state.end > stat.st_size
        if first_look:
            state = _FileState(ino=stat.st_ino, dev=stat.st_dev)
        if state.end < stat.st_size:
            good_end = _scan(path, fd, state.end, stat.st_size, schema, state.seen)
            if good_end < stat.st_size:
                logger.warning(
                    "%s: cutting off a torn last row (%d bytes) left by an interrupted write",
                    path,
                    stat.st_size - good_end,
                )
                os.ftruncate(fd, good_end)
                os.fsync(fd)
            state.end = good_end
        now = time.monotonic()
        state.touched = now
        self._files[path] = state
        self._files.move_to_end(path)
        files = self._files
        while files and (
            len(files) > self.max_cached_files or next(iter(files.values())).touched < now - self.max_idle_seconds
        ):
            files.popitem(last=False)
        return state, first_look


def _open_locked(path: Path) -> int:
    """The partition file, open for appending under an exclusive flock: the file now at `path`.
    Retention (`partitions_remove`) may remove it while this writer waits for the lock; rows
    appended to the removed file would be acknowledged and lost."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            stat = os.fstat(fd)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
        except BaseException:
            os.close(fd)
            raise
        if current is not None and (current.st_ino, current.st_dev) == (stat.st_ino, stat.st_dev):
            return fd
        os.close(fd)  # removed or replaced meanwhile: open what is there now


def _begun_with(fd: int, schema: Schema) -> Schema:
    """The layout of the file: the schema's, or the earlier one its header names (a file begun
    by an earlier release keeps its columns to the day's end; the next day's file has the new
    ones). Rewriting it with the new columns would replace the file, and a writer of the
    earlier release waiting for its lock would append to the replaced one, rows it then
    acknowledges lost: a rolling deploy must be safe."""
    if not schema.previous_columns:
        return schema
    for columns in schema.previous_columns:
        header = _csv_line(list(columns)).encode("utf-8")
        if os.pread(fd, len(header), 0) == header:
            return Schema(columns=columns, json_columns=schema.json_columns)
    return schema


def _relaid(encoded: list[tuple[str, str]], schema: Schema, begun: Schema) -> list[tuple[str, str]]:
    """Lines encoded in the schema's columns, in the columns of a file begun with earlier ones:
    the cells of its columns, as they were (a column it lacks is left out)."""
    index = {name: i for i, name in enumerate(schema.columns)}
    relaid = []
    for event_id, line in encoded:
        cells = next(csv.reader(io.StringIO(line, newline="")))
        relaid.append((event_id, _csv_line([cells[index[name]] for name in begun.columns])))
    return relaid


def _scan(path: Path, fd: int, start: int, size: int, schema: Schema, seen: set[str]) -> int:
    """Add the event_ids of the complete rows from `start` on to `seen`; return the offset just
    past the last complete row. Only the tail may be incomplete: anything else is refused."""
    good_end = _scan_whole_rows(fd, start, size, schema, seen)
    if good_end is not None:
        return good_end
    return _scan_lines(path, fd, start, size, schema, seen)


# Rows another writer appended since the last look are far fewer (a batch is about 1 MiB).
ONE_READ_MAX_BYTES = 16 * 2**20


def _scan_whole_rows(fd: int, start: int, size: int, schema: Schema, seen: set[str]) -> int | None:
    """`_scan` in one read, for the rule: rows that another writer appended whole since this
    process last looked. Each line is then one row: a quoted field holds an even number of
    quotes and an unquoted one none, so a line with an odd number ends inside a quoted field
    (a row with a raw newline). The event_id is the text before the first comma, unless quoted.
    None, with `seen` unchanged, for anything else (a torn tail, invalid UTF-8, a row over
    several lines, a quoted or empty event_id, a row with too few commas, a foreign header) and
    for more than ONE_READ_MAX_BYTES (the first look at a large file: the read, its text and
    its lines take about three times its size, the csv scan a fraction):
    `_scan_lines` then parses the rows with the csv module and finds what is wrong.

    What it does not check: that a row whose quoted fields hold commas has exactly every
    column, and that a quote never stands inside an unquoted field. The store never writes
    either; a file another tool damaged that way is taken as it is (no cheaper check than the
    csv scan was found)."""
    if schema.columns[0] != "event_id":
        return None
    if start >= size:
        return start
    if size - start > ONE_READ_MAX_BYTES:
        return None
    data = os.pread(fd, size - start, start)
    if len(data) != size - start or not data.endswith(b"\n"):
        return None
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        return None
    lines.pop()  # after the last newline: nothing
    if start == 0:
        if not lines or lines[0] != _header_line(schema)[:-1]:
            return None
        del lines[0]
    if not lines:
        return size
    # Whole-list checks in C (map), not a Python step per line: this runs for every row the
    # other consumer processes of a group write.
    if any(map((1).__and__, map(str.count, lines, repeat('"')))):
        return None
    if min(map(str.count, lines, repeat(","))) < len(schema.columns) - 1:
        return None
    event_ids = [line[: line.index(",")] for line in lines]
    if "" in event_ids or any(map(str.startswith, event_ids, repeat('"'))):
        return None
    seen.update(event_ids)
    return size


def _scan_lines(path: Path, fd: int, start: int, size: int, schema: Schema, seen: set[str]) -> int:
    event_id_index = schema.columns.index("event_id")
    position = start
    last_line_complete = True

    with os.fdopen(os.dup(fd), "rb") as fh:
        fh.seek(start)

        def lines() -> Iterator[str]:
            nonlocal position, last_line_complete
            for raw in fh:
                position += len(raw)
                last_line_complete = raw.endswith(b"\n")
                yield raw.decode("utf-8", errors="replace")  # only a torn tail can be invalid

        good_end = start
        try:
            for record in csv.reader(lines()):
                # Every row the store writes ends with a newline and has every column (the last
                # column never holds a raw newline), so anything else is an interrupted write.
                if not last_line_complete or len(record) != len(schema.columns):
                    break
                if good_end == 0:
                    if tuple(record) != schema.columns:
                        raise StoreError(f"{path} has header {record}, expected {list(schema.columns)}")
                else:
                    seen.add(record[event_id_index])
                good_end = position
        except csv.Error as exc:
            raise StoreError(f"{path} is not a readable CSV file past byte {good_end}: {exc}") from exc
    if good_end < size and position < size:
        raise StoreError(f"{path} has a malformed row at byte {good_end}, before the end of the file")
    return good_end


_stores: dict[Path, TrainingDataStore] = {}
_stores_lock = threading.Lock()


def default_store() -> TrainingDataStore:
    """The process's store for settings.TRAINING_DATA_DIR."""
    root = Path(settings.TRAINING_DATA_DIR)
    with _stores_lock:
        store = _stores.get(root)
        if store is None:
            store = _stores[root] = TrainingDataStore(root)
        return store


def _store_one(data_type: str, day_of: dt.datetime, row: dict[str, Any]) -> Path:
    return default_store().write_rows(data_type, utc_day(day_of), [row]).path


def store_agent_event(
    *,
    event_type: str,
    event_id: str | None = None,
    sequence: int | None = None,
    entity_type: str | None = None,
    entity_id: str | None = None,
    workflow_id: str | None = None,
    agent_id: str | None = None,
    session_id: str | None = None,
    source: str = "platform",
    severity: str = "info",
    payload: Mapping[str, Any] | None = None,
    created_at: dt.datetime | None = None,
) -> Path:
    """Append one event to the events file of its day (created_at, default now).

    Without an event_id a new one is generated; with one, a repeated call writes nothing.
    """
    created_at = created_at or timezone.now()
    row = {
        "event_id": event_id or new_id(),
        "sequence": sequence,
        "event_type": event_type,
        "entity_type": entity_type,
        "entity_id": entity_id,
        "workflow_id": workflow_id,
        "agent_id": agent_id,
        "session_id": session_id,
        "source": source,
        "severity": severity,
        "created_at": created_at,
        "payload": dict(payload or {}),
    }
    return _store_one(EVENTS, created_at, row)


def store_agent_task(
    *,
    execution_id: str,
    agent_id: str,
    task_name: str,
    status: str,
    workflow_id: str | None = None,
    task_type: str = "",
    input_data: Any = None,
    output_data: Any = None,
    error: str | None = None,
    retry_count: int = 0,
    max_retries: int | None = None,
    timeout_seconds: int | None = None,
    execution_time_ms: float | None = None,
    input_tokens: int = 0,
    output_tokens: int = 0,
    tokens_used: int = 0,
    cost_usd: Decimal | float | None = None,
    created_at: dt.datetime | None = None,
    started_at: dt.datetime | None = None,
    completed_at: dt.datetime | None = None,
    event_id: str | None = None,
    recorded_at: dt.datetime | None = None,
) -> Path:
    """Append one finished task to the tasks file of the day it was recorded (recorded_at:
    the time of the event that finished it, default now)."""
    row = {
        "execution_id": execution_id,
        "workflow_id": workflow_id,
        "agent_id": agent_id,
        "task_name": task_name,
        "task_type": task_type,
        "status": status,
        "input_data": input_data,
        "output_data": output_data,
        "error": error,
        "retry_count": retry_count,
        "max_retries": max_retries,
        "timeout_seconds": timeout_seconds,
        "execution_time_ms": execution_time_ms,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "tokens_used": tokens_used,
        "cost_usd": cost_usd,
        "created_at": created_at,
        "started_at": started_at,
        "completed_at": completed_at,
        "event_id": event_id or new_id(),
    }
    return _store_one(TASKS, recorded_at or timezone.now(), row)


def store_tool_execution(
    *,
    execution_id: str,
    agent_id: str,
    tool_name: str,
    input_params: Any = None,
    output_result: Any = None,
    execution_time_ms: float | None = None,
    error: str | None = None,
    created_at: dt.datetime | None = None,
    event_id: str | None = None,
    tool_call_id: str | None = None,
    attempt_number: int | None = None,
) -> Path:
    """Append one tool call to the tool_executions file of its day (created_at, default now)."""
    created_at = created_at or timezone.now()
    row = {
        "execution_id": execution_id,
        "attempt_number": attempt_number,
        "agent_id": agent_id,
        "tool_name": tool_name,
        "tool_call_id": tool_call_id,
        "input_params": input_params,
        "output_result": output_result,
        "execution_time_ms": execution_time_ms,
        "error": error,
        "created_at": created_at,
        "event_id": event_id or new_id(),
    }
    return _store_one(TOOL_EXECUTIONS, created_at, row)


def store_workflow_data(
    *,
    workflow_id: str,
    name: str,
    status: str,
    workflow_type: str = "",
    total_steps: int = 0,
    completed_steps: int = 0,
    failed_steps: int = 0,
    cancelled_steps: int = 0,
    error: str | None = None,
    duration_ms: int | None = None,
    total_tokens_used: int = 0,
    total_cost_usd: Decimal | float | None = None,
    wasted_cost_usd: Decimal | float | None = None,
    created_at: dt.datetime | None = None,
    started_at: dt.datetime | None = None,
    completed_at: dt.datetime | None = None,
    event_id: str | None = None,
    recorded_at: dt.datetime | None = None,
) -> Path:
    """Append one finished workflow to the workflows file of the day it was recorded
    (recorded_at: the time of the event that finished it, default now)."""
    row = {
        "workflow_id": workflow_id,
        "name": name,
        "workflow_type": workflow_type,
        "status": status,
        "total_steps": total_steps,
        "completed_steps": completed_steps,
        "failed_steps": failed_steps,
        "cancelled_steps": cancelled_steps,
        "error": error,
        "duration_ms": duration_ms,
        "total_tokens_used": total_tokens_used,
        "total_cost_usd": total_cost_usd,
        "wasted_cost_usd": wasted_cost_usd,
        "created_at": created_at,
        "started_at": started_at,
        "completed_at": completed_at,
        "event_id": event_id or new_id(),
    }
    return _store_one(WORKFLOWS, recorded_at or timezone.now(), row)


def export_for_training(data_type: str, start_date: str | dt.date, end_date: str | dt.date) -> Path:
    """Export `data_type` for the UTC days start_date..end_date (both included) from the
    database to JSONL and return the file's path (seed 002's API; see services/export.py)."""
    from training_export.services.export import export_run

    return Path(export_run(data_type=data_type, start_date=start_date, end_date=end_date).path)
