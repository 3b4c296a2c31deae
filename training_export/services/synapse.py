"""The Synapse consumer: reads the event stream with a Redis consumer group and writes the
training data store's daily CSV partitions.

Delivery is at-least-once and the files are exactly-once. An entry is acknowledged only after
every row it produces is fsynced, and every file dedupes by event_id, so an entry delivered
again after a crash (our own pending entries, read first on start, or a dead consumer's,
claimed with XAUTOCLAIM) is skipped where it was written and written where it was not.

Every event goes to the events file. `tool_executed` events also go to tool_executions (from
the payload). The relay makes those two rows as it publishes (stream_rows): an entry whose rows
were made under this process's settings is written as it is; any other entry (a relay with
other settings or of an earlier version, anything else added to the stream) is parsed, checked,
redacted and encoded here, into the same bytes.

Terminal task and workflow events also go to tasks / workflows, with the row read from
PostgreSQL when the batch is consumed and, for an ending the row can start again from (failed,
cancelled: a retry or resume reruns it), the columns that ending left, which its event carries
as `state`: the row as of the event, whatever happened to it since. An event of an earlier
version without `state` whose row no longer shows its ending gets no row (counted as stale):
the row would describe a later run.

The rows of a day before RETENTION_DAYS_TRAINING_CSV's cutoff are not written: retention removed
that day's files, and the relay publishes again from the first event PostgreSQL holds when the
stream is lost (Redis restarted empty). The entry is acknowledged and counted (`expired`).

An entry that cannot become a row (a required field missing, bad JSON, a bad timestamp) goes to
the dead-letter stream `<stream>:dead` with a `reason` and its `original_id`, in the same MULTI
as the acknowledgement: it is dead-lettered exactly once and never blocks the group. The
consumer never trims the main stream (the relay trims only what every group acknowledged).
"""

from __future__ import annotations

import datetime as dt
import gc
import itertools
import logging
import os
import socket
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, NamedTuple

import redis
from django.conf import settings
from django.db import DataError, close_old_connections, models
from django.db.models.functions import Cast
from django.utils import timezone

from orchestration.db import database_now
from orchestration.event_types import EventType
from orchestration.models import Event, TaskExecution, Workflow
from orchestration.services.events import state_value
from orchestration.services.relay import dead_letter_stream, events_to_entries, shown_name, with_payload_text
from training_export.services import redaction
from training_export.services.jsonl import json_load, json_load_many
from training_export.services.store import (
    EVENT_TEXT_COLUMNS,
    EVENTS,
    SCHEMAS,
    TASKS,
    TOOL_EXECUTIONS,
    WORKFLOWS,
    EventCells,
    TrainingDataStore,
    encode_event_cells,
    encode_rows,
    json_text,
)
from training_export.services.stream_rows import EVENTS_LINE as ROW_EVENTS_LINE
from training_export.services.stream_rows import FORMAT as ROW_FORMAT
from training_export.services.stream_rows import TOOL_LINE as ROW_TOOL_LINE
from training_export.services.stream_rows import row_format, tool_row, whole_rows

logger = logging.getLogger(__name__)

# task_timed_out is not here: a timed-out attempt is always followed by task_retrying or
# task_failed, so counting it as well would record the task twice.
TASK_TERMINAL_EVENTS = frozenset({EventType.TASK_COMPLETED, EventType.TASK_FAILED, EventType.TASK_CANCELLED})
WORKFLOW_TERMINAL_EVENTS = frozenset(
    {EventType.WORKFLOW_COMPLETED, EventType.WORKFLOW_FAILED, EventType.WORKFLOW_CANCELLED}
)
REQUIRED_FIELDS = ("event_id", "event_type", "created_at")
# The same as plain strings, for the consumer's per-entry dispatch.
_TASK_TERMINAL = frozenset(map(str, TASK_TERMINAL_EVENTS))
_WORKFLOW_TERMINAL = frozenset(map(str, WORKFLOW_TERMINAL_EVENTS))
_TOOL_EXECUTED = str(EventType.TOOL_EXECUTED)

_TASK_FIELDS = tuple(column for column in SCHEMAS[TASKS].columns if column != "event_id")
_WORKFLOW_FIELDS = tuple(column for column in SCHEMAS[WORKFLOWS].columns if column != "event_id")
# The statuses a row has just after each terminal event.
_ENDED_AS: dict[str, frozenset[str]] = {
    str(event_type): frozenset(map(str, statuses))
    for event_type, statuses in (
        (EventType.TASK_COMPLETED, {TaskExecution.Status.COMPLETED}),
        (EventType.TASK_FAILED, {TaskExecution.Status.FAILED, TaskExecution.Status.TIMED_OUT}),
        (EventType.TASK_CANCELLED, {TaskExecution.Status.CANCELLED}),
        (EventType.WORKFLOW_COMPLETED, {Workflow.Status.COMPLETED}),
        (EventType.WORKFLOW_FAILED, {Workflow.Status.FAILED}),
        (EventType.WORKFLOW_CANCELLED, {Workflow.Status.CANCELLED}),
    )
}


def _state_columns(model: type[models.Model], fields: tuple[str, ...], state: dict[str, Any]) -> dict[str, Any]:
    """The row's columns an event's `state` holds, as the database would give them."""
    columns = {}
    for name in fields:
        if name in state:
            try:
                columns[name] = state_value(model._meta.get_field(name), state[name])
            except (TypeError, ValueError, ArithmeticError):
                columns[name] = state[name]  # not from the platform: written as it came
    return columns


# The names of the relay's fields (`event_to_entry`).
_RELAY_NAMES = frozenset(SCHEMAS[EVENTS].columns)
# The events columns from the relay's fields: a KeyError for an entry that lacks one.
_event_texts = itemgetter(*EVENT_TEXT_COLUMNS)

Entry = tuple[str, Mapping[Any, Any]]  # fields as bytes, or as text from a decoding client
Rows = dict[tuple[str, dt.date], list[dict[str, Any]]]


@contextmanager
def collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: a batch allocates thousands of containers that live
    until it is written and are then freed by reference count, while each collection they
    trigger would rescan the process's long-lived objects (10-15 % of the consumer's CPU)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def default_consumer_name() -> str:
    """Unique per process, so that a restarted process never mistakes another's entries for its own."""
    return f"{socket.gethostname()}-{os.getpid()}"


def synapse_consumer_client(*, block_ms: int) -> redis.Redis:
    """The consumer's client. hiredis decodes the replies to text in C, with invalid UTF-8
    kept as lone surrogates (`surrogateescape`): `parse_entries` dead-letters such an entry,
    and writing it to the dead-letter stream encodes the surrogates back to the original bytes."""
    url = settings.REDIS_URL
    if not url:
        raise RuntimeError("the Synapse stream needs Redis: set REDIS_URL")
    # The socket timeout must outlast the longest BLOCK, or every idle read would time out.
    return redis.Redis.from_url(
        url,
        socket_timeout=block_ms / 1000 + 10,
        socket_connect_timeout=10,
        decode_responses=True,
        encoding_errors="surrogateescape",
    )


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _id_key(entry_id: str) -> tuple[int, int]:
    milliseconds, sequence = entry_id.split("-")
    return int(milliseconds), int(sequence)


class MalformedEntry(ValueError):
    """A stream entry that cannot become a row; the message is the dead-letter reason."""


class StreamEvent(NamedTuple):
    """A validated entry (a tuple: one is built per entry, on the consumer's hot path)."""

    entry_id: str
    fields: dict[str, str]
    created_at: dt.datetime
    payload: dict[str, Any]
    day: dt.date  # the UTC day of created_at: the partition its rows go to

    @property
    def event_id(self) -> str:
        return self.fields["event_id"]

    @property
    def event_type(self) -> str:
        return self.fields["event_type"]


DeadEntry = tuple[str, Mapping[Any, Any], str]  # entry id, its fields as read, the reason

# XAUTOCLAIM, and the dead letter of each entry it reports deleted: KEYS = stream, dead
# stream; ARGV = group, consumer, min idle ms, start, count, MAXLEN, reason.
_CLAIM_DEAD_LETTERING_DELETED = """
    local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
    for _, id in ipairs(r[3] or {}) do
        redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'reason', ARGV[7], 'original_id', id)
    end
    return r
"""

# XACK one entry and, only if that removed it from the group's pending list, add it to the
# dead-letter stream: KEYS = stream, dead stream; ARGV = group, entry id, MAXLEN, fields...
_DEAD_LETTER_ONCE = """
    if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 1 then
        redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 4))
    end
    return 0
"""

# Remove a consumer name from a group if it holds no pending entry: KEYS = stream; ARGV =
# group, name. 1 if removed.
_FORGET_IF_NOTHING_PENDING = """
    if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
        redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
        return 1
    end
    return 0
"""
# How long a consumer holding nothing must have been idle to be taken for departed.
DEPARTED_IDLE_MS = 10 * 60 * 1000

# What an entry's own content can raise while its rows are built (see SynapseConsumer.process).
_CONTENT_ERRORS = (ValueError, TypeError, ArithmeticError, RecursionError, DataError)


def _text_fields(raw: Mapping[Any, Any]) -> dict[str, str]:
    """The fields as text: decoded from a client that hands out bytes, or checked for the lone
    surrogates that a decoding client (`surrogateescape`) puts in place of invalid UTF-8, in a
    field's name as in its value (either way an entry is refused for the same bytes)."""
    for key in raw:
        if type(key) is bytes:
            try:
                return dict(zip(map(bytes.decode, raw.keys()), map(bytes.decode, raw.values()), strict=True))
            except UnicodeDecodeError as exc:
                raise MalformedEntry(f"a field is not UTF-8: {exc}") from exc
            except TypeError:  # a mix of bytes and text
                return _mixed_fields(raw)
        break
    try:
        plain = "".join(raw.values()).isascii() and (_RELAY_NAMES.issuperset(raw) or "".join(raw).isascii())
    except TypeError:  # a mix of bytes and text
        return _mixed_fields(raw)
    if not plain:
        _check_utf8(raw)
    return raw  # type: ignore[return-value]


def _mixed_fields(raw: Mapping[Any, Any]) -> dict[str, str]:
    try:
        fields = {_text(name): _text(value) for name, value in raw.items()}
    except UnicodeDecodeError as exc:
        raise MalformedEntry(f"a field is not UTF-8: {exc}") from exc
    _check_utf8(fields)
    return fields


def _check_utf8(fields: Mapping[str, str]) -> None:
    try:
        "".join(fields.values()).encode("utf-8")
        "".join(fields).encode("utf-8")
        return
    except (UnicodeEncodeError, TypeError):
        pass  # find which field, for the reason
    for name, value in fields.items():
        for text in (name, value):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                where = "name" if text is name else "value"
                raise MalformedEntry(f"a field is not UTF-8: {name!r} ({where}) at character {exc.start}") from exc
            except AttributeError:  # not text at all: left to the checks that need it
                pass


def _checked_fields(raw: Mapping[Any, Any]) -> tuple[dict[str, str], dt.datetime, dt.date]:
    """Every check of an entry but its payload's: its fields as text, created_at and its UTC day."""
    if not raw:
        raise MalformedEntry(DELETED_REASON)
    fields = _text_fields(raw)
    created_text = fields.get("created_at")
    if not (fields.get("event_id") and fields.get("event_type") and created_text):
        missing = [name for name in REQUIRED_FIELDS if not fields.get(name)]
        raise MalformedEntry(f"missing {', '.join(missing)}")
    try:
        created_at = dt.datetime.fromisoformat(created_text)
    except ValueError as exc:
        raise MalformedEntry(f"unparseable created_at {created_text!r}") from exc
    offset = created_at.utcoffset()
    if offset is None:
        raise MalformedEntry(f"created_at {created_text!r} has no UTC offset")
    sequence = fields.get("sequence")
    if sequence and not (sequence.isascii() and sequence.isdigit()):
        raise MalformedEntry(f"sequence {sequence!r} is not an integer")
    try:
        day = created_at.date() if not offset else created_at.astimezone(dt.UTC).date()
    except OverflowError as exc:
        raise MalformedEntry(f"created_at {created_text!r} is out of range in UTC") from exc
    return fields, created_at, day


def _payload_or_error(text: str) -> Any:
    try:
        return json_load(text)
    except ValueError as exc:
        return exc
    except RecursionError:
        return ValueError("nested too deeply")


def parse_entries(entries: Sequence[Entry]) -> tuple[list[StreamEvent], list[DeadEntry]]:
    """Validate a batch of stream entries in the relay's format (`event_to_entry`): the events
    and the entries to dead-letter with their reasons, each in stream order. The payloads are
    parsed together (`json_load_many`: one check for integers beyond 64 bits)."""
    checked = []
    dead: list[tuple[int, DeadEntry]] = []
    for index, (entry_id, raw) in enumerate(entries):
        try:
            checked.append((index, entry_id, raw, *_checked_fields(raw)))
        except MalformedEntry as exc:
            dead.append((index, (entry_id, raw, str(exc))))
    texts = [fields.get("payload") or "{}" for _, _, _, fields, _, _ in checked]
    try:
        payloads = json_load_many(texts)
    except (ValueError, RecursionError):
        payloads = [_payload_or_error(text) for text in texts]
    events = []
    payload_dead = False
    for (index, entry_id, raw, fields, created_at, day), payload in zip(checked, payloads, strict=True):
        if type(payload) is dict:
            events.append(StreamEvent(entry_id, fields, created_at, payload, day))
            continue
        payload_dead = True
        if isinstance(payload, ValueError):
            reason = f"payload is not JSON: {payload}"
        else:
            reason = "payload is not a JSON object"
        dead.append((index, (entry_id, raw, reason)))
    if payload_dead:
        dead.sort(key=lambda item: item[0])
    return events, [entry for _, entry in dead]


def parse_entry(entry_id: str, raw: Mapping[Any, Any]) -> StreamEvent:
    """Validate one stream entry (`parse_entries`); MalformedEntry names what is wrong."""
    events, dead = parse_entries([(entry_id, raw)])
    if dead:
        raise MalformedEntry(dead[0][2])
    return events[0]


def _tool_row(event: StreamEvent) -> dict[str, Any]:
    fields = event.fields
    return tool_row(
        event.payload,
        entity_id=fields.get("entity_id"),
        agent_id=fields.get("agent_id"),
        created_at=event.created_at,
        event_id=event.event_id,
    )


class FileRows(NamedTuple):
    """One file's rows of a batch: (event_id, line) each, and each one's position in the batch."""

    rows: list[tuple[str, str]]
    positions: list[int]


Files = dict[tuple[str, dt.date], FileRows]  # by (data type, UTC day)


def _file_rows() -> FileRows:
    return FileRows([], [])


# The csv_format values of other settings this process has warned about (once each, and about
# the first few only: the stream is trusted, but a flood of odd values must not grow this).
_FORMATS_SEEN: set[str] = set()
_FORMATS_WARNED = 8
# The csv_format values this process read its secret values again for, and when (monotonic):
# at most once per format per SECRETS_REFRESH_SECONDS, and for at most _FORMATS_REFRESHED_MAX
# formats in that time (a flood of odd values costs at most that many readings a minute).
# Time-bounded, not for the first few formats only: a long-running consumer meets new ones
# every time an agent's key variable is added or renamed.
_FORMATS_REFRESHED: dict[str, float] = {}
_FORMATS_REFRESHED_MAX = 64


def _refresh_for(made_under: str) -> bool:
    """Read the secret values again for a format met that is not this process's, unless this
    process did so for it (or for too many formats) within SECRETS_REFRESH_SECONDS (True when
    it did)."""
    key = made_under[:40]
    now = time.monotonic()
    horizon = now - redaction.SECRETS_REFRESH_SECONDS
    for old in [old for old, at in _FORMATS_REFRESHED.items() if at <= horizon]:
        del _FORMATS_REFRESHED[old]
    if key in _FORMATS_REFRESHED or len(_FORMATS_REFRESHED) >= _FORMATS_REFRESHED_MAX:
        return False
    _FORMATS_REFRESHED[key] = now
    redaction.configured_secret_values(refresh=True)
    return True


def made_rows(
    entries: Sequence[Entry], files: Files, terminal: list[tuple[int, StreamEvent]]
) -> tuple[int, list[tuple[int, Entry]]]:
    """Add to `files` the rows the relay made under this process's settings (stream_rows), and
    to `terminal` the terminal task and workflow events among those entries (their tasks /
    workflows rows come from the database and the event's `state`). Returns how many entries
    the relay made and the rest (with their positions), which the consumer builds itself."""
    if not entries:
        return 0, []
    made_here = row_format()
    days: dict[str, tuple[FileRows, FileRows]] = {}  # events, tool_executions files of a day
    made = 0
    rest = []
    # A client that does not decode (told by the first entry with fields: a deleted one has none).
    decode = type(next(iter(next((raw for _, raw in entries if raw), {})), "")) is bytes
    for position, entry in enumerate(entries):
        raw = entry[1]
        try:
            if decode:
                raw = dict(zip(map(bytes.decode, raw.keys()), map(bytes.decode, raw.values()), strict=True))
            made_under = raw.get(ROW_FORMAT)
            if made_under and made_under != made_here and _refresh_for(str(made_under)):
                # The relay may have read a secret this process has not yet: an agent made
                # through the API since (redaction.SECRETS_REFRESH_SECONDS).
                made_here = row_format()
            if made_under != made_here:
                if made_under and len(_FORMATS_SEEN) < _FORMATS_WARNED and str(made_under)[:40] not in _FORMATS_SEEN:
                    _FORMATS_SEEN.add(str(made_under)[:40])
                    logger.warning(
                        "Synapse entries whose rows were made under other settings (csv_format %s; this "
                        "process: %s): their rows are built here, at a higher cost. The relay's and this "
                        "consumer's SECRET_KEY, REDACT_KEYS, REDACT_PATTERNS or agent definitions (their "
                        "secret values) differ, or one of them runs another version",
                        str(made_under)[:40],
                        made_here,
                    )
                raise ValueError
            event_id = raw["event_id"]
            event_type = raw["event_type"]
            created_at = raw["created_at"]
            events_line = raw[ROW_EVENTS_LINE]
            tool_line = raw.get(ROW_TOOL_LINE, "")
            if not whole_rows(event_id, events_line, tool_line):
                raise ValueError
            # The UTC text the relay writes ("…+00:00"): its day's files, once per batch.
            day_files = days.get(created_at[:10]) if created_at.endswith("+00:00") else None
            if day_files is None:
                day = _utc_day_of(created_at)
                day_files = days[created_at[:10]] = (
                    files.setdefault((EVENTS, day), _file_rows()),
                    files.setdefault((TOOL_EXECUTIONS, day), _file_rows()),
                )
            if event_type in _TASK_TERMINAL or event_type in _WORKFLOW_TERMINAL:
                # An entry whose payload is not an object goes the way of any entry (dead-lettered).
                payload = json_load(raw["payload"])
                if type(payload) is not dict:
                    raise ValueError
                created = dt.datetime.fromisoformat(created_at)
                terminal.append((position, StreamEvent(entry[0], raw, created, payload, created.date())))
        except (KeyError, TypeError, ValueError, AttributeError, RecursionError):
            rest.append((position, entry))
            continue
        events_file, tools_file = day_files
        events_file.rows.append((event_id, events_line))
        events_file.positions.append(position)
        if tool_line:
            tools_file.rows.append((event_id, tool_line))
            tools_file.positions.append(position)
        made += 1
    return made, rest


def _utc_day_of(created_at: str) -> dt.date:
    """The UTC day of a relay's created_at text ending in +00:00 (ValueError otherwise)."""
    if not created_at.endswith("+00:00"):
        raise ValueError(created_at)
    return dt.datetime.fromisoformat(created_at).date()


def _first_day_kept(oldest: dt.date) -> dt.date | None:
    """The first day whose files retention keeps (RETENTION_DAYS_TRAINING_CSV), when a batch's
    `oldest` day may be before it; None otherwise. Retention's cutoff is on the database's clock
    (retention_apply), read only for a batch that holds a day near it: live entries never do,
    old ones come when the relay publishes again from the first event PostgreSQL holds (Redis
    restarted empty, the stream deleted) or after a consumer stopped for weeks."""
    days = settings.RETENTION_DAYS_TRAINING_CSV
    if not days or oldest > timezone.now().date() - dt.timedelta(days=days - 1):
        return None
    return (database_now() - dt.timedelta(days=days)).astimezone(dt.UTC).date()


def _drop_days_before(first_kept: dt.date, files: Files, terminal: list[tuple[int, StreamEvent]]) -> int:
    """Take the rows of days before `first_kept` out of a batch: their files were removed by
    retention, and writing them again would bring back, until its next run, what it removed
    (the whole history at once, after the stream was published again). Returns how many
    entries they were (each entry's rows are of its event's day)."""
    dropped = 0
    for data_type, day in [key for key in files if key[1] < first_kept]:
        rows = files.pop((data_type, day))
        if data_type == EVENTS:
            dropped += len(rows.positions)
    terminal[:] = [(position, event) for position, event in terminal if event.day >= first_kept]
    return dropped


@dataclass
class BatchResult:
    entries: int = 0
    written: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    dead: int = 0
    missing: int = 0  # terminal events whose task or workflow row no longer exists
    stale: int = 0  # terminal events without `state` whose row has started again since
    relay_made: int = 0  # entries whose events and tool rows the relay made (stream_rows)
    expired: int = 0  # entries of days whose files retention removed: not written again

    def add(self, other: BatchResult) -> None:
        self.entries += other.entries
        self.relay_made += other.relay_made
        self.written.update(other.written)
        self.duplicates += other.duplicates
        self.dead += other.dead
        self.missing += other.missing
        self.stale += other.stale
        self.expired += other.expired

    def summary(self) -> str:
        written = " ".join(f"{data_type}={self.written[data_type]}" for data_type in SCHEMAS)
        return (
            f"{self.entries} entries; rows written: {written}; duplicates skipped: {self.duplicates}; "
            f"dead-lettered: {self.dead}; rows missing from the database: {self.missing}; "
            f"rows run again since their event (no state recorded): {self.stale}; "
            f"entries whose rows the relay made: {self.relay_made}; "
            f"entries of days retention removed: {self.expired}"
        )


@dataclass
class WrittenBatch:
    """Entries whose rows are durably written, waiting for their acknowledgement."""

    entry_ids: list[str]
    dead: list[DeadEntry]
    result: BatchResult


def database_rows(model: type[models.Model], fields: tuple[str, ...], ids: Iterable[str]) -> dict[str, dict]:
    """The rows (`fields`, the primary key among them) by primary key, their JSON columns read as
    text and parsed with every number exact (json_load): the ORM's parser rounds a number a
    float cannot hold, or makes it Infinity, which the files would write as null."""
    pk = model._meta.pk.name
    json_fields = [name for name in fields if isinstance(model._meta.get_field(name), models.JSONField)]
    texts = {f"{name}__exact_text": Cast(name, models.TextField()) for name in json_fields}
    plain = [name for name in fields if name not in json_fields]
    found = {}
    for row in model.objects.filter(pk__in=ids).annotate(**texts).values(*plain, *texts):
        for name in json_fields:
            text = row.pop(f"{name}__exact_text")
            row[name] = None if text is None else json_load(text)
        found[row[pk]] = row
    return found


class SynapseConsumer:
    """One consumer of a Redis consumer group on the Synapse stream, writing `store`."""

    def __init__(
        self,
        *,
        client: redis.Redis,
        store: TrainingDataStore,
        stream: str,
        group: str,
        consumer: str,
        batch: int = 500,
        claim_idle_ms: int = 60_000,
    ) -> None:
        self.client = client
        self.store = store
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.batch = batch
        self.claim_idle_ms = claim_idle_ms
        self.dead_stream = dead_letter_stream(stream)
        self._scripts: dict[str, Any] = {}
        self._made_group = False  # by this consumer, since its last write_trimmed

    def _script(self, source: str) -> Any:
        """The client's Script for `source`, registered once (a name for its SHA; nothing is
        sent to Redis until it runs)."""
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self.client.register_script(source)
        return script

    # --- reading -------------------------------------------------------------------------

    def ensure_group(self) -> bool:
        """Create the group (and the stream) unless they exist; a new group starts at the
        beginning of the stream, and the files' dedupe absorbs what was already written (and
        `write_trimmed` what was trimmed from the stream before). True if it created it."""
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
            return False
        self._made_group = True
        return True

    def read_pending(self, *, after: str = "0") -> list[Entry]:
        """Entries delivered to this consumer name earlier and never acknowledged."""
        try:
            reply = self.client.xreadgroup(self.group, self.consumer, {self.stream: after}, count=self.batch)
        except redis.ResponseError as exc:
            self._regroup_or_raise(exc)
            return []
        return _entries(reply)

    def read_new(self, *, block_ms: int | None = None) -> list[Entry]:
        """Entries never delivered to any consumer of the group."""
        reply = self.client.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=self.batch, block=block_ms)
        return _entries(reply)

    def claim(self, *, start: str = "0-0") -> tuple[str, list[Entry]]:
        """Take over entries idle longer than claim_idle_ms (their consumer died). Returns the
        cursor to continue from ("0-0" once the scan is complete) and the claimed entries;
        entries trimmed from the stream meanwhile come back without fields (dead-lettered)."""
        # XAUTOCLAIM and the dead letters of the entries it reports deleted in one script:
        # Redis takes those out of the pending list as it reports them, to this reply alone,
        # so no failure between the two (connection, process killed) may lose them.
        try:
            cursor, claimed, deleted_ids = self._script(_CLAIM_DEAD_LETTERING_DELETED)(
                keys=[self.stream, self.dead_stream],
                args=[
                    self.group,
                    self.consumer,
                    self.claim_idle_ms,
                    start,
                    self.batch,
                    settings.SYNAPSE_STREAM_MAXLEN,
                    DELETED_REASON,
                ],
            )
        except redis.ResponseError as exc:
            self._regroup_or_raise(exc)
            return "0-0", []
        entries: list[Entry] = [
            (_text(entry_id), dict(zip(fields[::2], fields[1::2], strict=True)) if fields else {})
            for entry_id, fields in claimed
            if entry_id
        ]
        deleted = [_text(entry_id) for entry_id in deleted_ids or []]
        entries += [(entry_id, {}) for entry_id in deleted]
        return _text(cursor), entries

    def trimmed_range(self, *, made_group: bool = False) -> tuple[int, int] | None:
        """The sequences strictly between which the stream lost entries this group may never
        have read (`after`, `before`), or None. The relay trims only what every group then on
        the stream acknowledged, but a group made after that trim (Redis restarted empty and the
        relay published the table again, or the stream was deleted, and another group read and
        acknowledged it all before this one was made again; a new group) starts past the entries
        trimmed before it existed. From the start of the stream for a group this consumer made
        (`made_group`: another consumer of the group may have read since), else from where the
        group has read to: entries removed since it exists were delivered to it. Entry ids are
        `<sequence>-1`; a sequence hole in the range is a rollback (no event there)."""
        try:
            info = self.client.xinfo_stream(self.stream)
            groups = self.client.xinfo_groups(self.stream)
        except redis.ResponseError:
            return None  # no stream
        if not info.get("entries-added") or info["entries-added"] <= info["length"]:
            return None  # nothing was ever removed (or Redis before 7 cannot tell)
        delivered = next((g["last-delivered-id"] for g in groups if shown_name(g["name"]) == self.group), None)
        if delivered is None:
            return None
        after = 0 if made_group else _id_key(_text(delivered))[0]
        first = info.get("first-entry")
        before = _id_key(_text(first[0]))[0] if first else _id_key(_text(info["last-generated-id"]))[0] + 1
        return (after, before) if before > after + 1 else None

    def write_trimmed(self, handle: Callable[[list[Entry]], None], should_stop: Callable[[], bool]) -> int:
        """Write the events PostgreSQL holds in `trimmed_range`, as the relay made their entries,
        before this consumer reads new entries: the group does not move until a consumer reads,
        so a consumer killed meanwhile finds the same range on restart. Their acknowledgement
        acknowledges nothing (they are not pending). Returns how many events were written."""
        gap = self.trimmed_range(made_group=self._made_group)
        self._made_group = False
        if gap is None:
            return 0
        after, before = gap
        done = 0
        while not should_stop():
            events = list(
                with_payload_text(Event.objects.filter(sequence__gt=after, sequence__lt=before)).order_by("sequence")[
                    : self.batch
                ]
            )
            if not events:
                break
            if not done:
                logger.warning(
                    "the stream %s lost entries after %d-1 and before %d-1 that the group %s may never have read "
                    "(trimmed before the group was made: Redis restarted empty or the stream was deleted, and "
                    "another group read them first; or the group is new): writing their events from PostgreSQL",
                    self.stream,
                    after,
                    before,
                    self.group,
                )
            with collector_paused():
                handle([(f"{e.sequence}-1", entry) for e, entry in zip(events, events_to_entries(events), strict=True)])
            done += len(events)
            after = events[-1].sequence
        return done

    # --- writing and acknowledging ---------------------------------------------------------

    def write(self, entries: Sequence[Entry]) -> WrittenBatch:
        """Write the rows of a batch durably, without acknowledging anything. The rows the
        relay made (stream_rows) are written as they are; the consumer builds the others from
        the entry's fields (the same bytes). Each file gets its rows in stream order."""
        result = BatchResult(entries=len(entries))
        files: Files = {}
        terminal: list[tuple[int, StreamEvent]] = []
        result.relay_made, rest = made_rows(entries, files, terminal)
        dead: list[DeadEntry] = []
        if rest:
            dead = self._build_rows(rest, files, terminal)
        result.dead = len(dead)
        if files and (first_kept := _first_day_kept(min(day for _, day in files))) is not None:
            result.expired = _drop_days_before(first_kept, files, terminal)
            if result.expired:
                logger.info(
                    "%d entries of days before %s not written: retention removed their files (the stream was "
                    "published again from older events, or this consumer is that far behind)",
                    result.expired,
                    first_kept,
                )
        terminal.sort(key=itemgetter(0))
        tasks = [event for _, event in terminal if event.event_type in _TASK_TERMINAL]
        workflows = [event for _, event in terminal if event.event_type in _WORKFLOW_TERMINAL]
        rows: Rows = defaultdict(list)
        self._add_database_rows(
            rows,
            result,
            TASKS,
            TaskExecution,
            _TASK_FIELDS,
            tasks,
            key=lambda e: e.fields.get("entity_id"),
        )
        self._add_database_rows(
            rows,
            result,
            WORKFLOWS,
            Workflow,
            _WORKFLOW_FIELDS,
            workflows,
            key=lambda e: e.fields.get("entity_id") or e.fields.get("workflow_id"),
        )
        # Every file's rows are encoded before any file is written: a row that cannot be
        # encoded fails the batch with nothing written (see process()).
        encoded = []
        for (data_type, day), (lines, positions) in files.items():
            if lines and result.relay_made and rest:  # both ways in one file: back to stream order
                lines = [line for _, line in sorted(zip(positions, lines, strict=True), key=itemgetter(0))]
            if lines:
                encoded.append((data_type, day, lines))
        encoded += [(data_type, day, encode_rows(data_type, file_rows)) for (data_type, day), file_rows in rows.items()]
        for data_type, day, lines in encoded:
            written = self.store.write_encoded(data_type, day, lines)
            result.written[data_type] += written.written
            result.duplicates += written.duplicates
        return WrittenBatch(entry_ids=[entry_id for entry_id, _ in entries], dead=dead, result=result)

    def _build_rows(
        self, rest: list[tuple[int, Entry]], files: Files, terminal: list[tuple[int, StreamEvent]]
    ) -> list[DeadEntry]:
        """Parse and check the entries whose rows the relay did not make (or not under this
        consumer's settings), and encode their events and tool rows into `files`; returns the
        entries to dead-letter."""
        events, dead = parse_entries([entry for _, entry in rest])
        for entry_id, _raw, reason in dead:
            logger.warning("dead-lettering Synapse entry %s of %s: %s", entry_id, self.stream, reason)
        position_of = {entry[0]: position for position, entry in rest}
        event_cells: dict[dt.date, list[EventCells]] = defaultdict(list)
        event_positions: dict[dt.date, list[int]] = defaultdict(list)
        tool_rows: dict[dt.date, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
        utc = dt.UTC
        for event in events:
            position = position_of[event.entry_id]
            fields = event.fields
            created_at = event.created_at
            if created_at.utcoffset():
                created_at = created_at.astimezone(utc)
            try:
                texts = _event_texts(fields)
            except KeyError:  # not from the relay: a field may be absent
                texts = tuple(fields.get(column) or "" for column in EVENT_TEXT_COLUMNS)
            event_cells[event.day].append(
                EventCells(fields["event_id"], texts, created_at.isoformat(), event.payload, json_text(event.payload))
            )
            event_positions[event.day].append(position)
            event_type = fields["event_type"]
            if event_type in _TASK_TERMINAL or event_type in _WORKFLOW_TERMINAL:
                terminal.append((position, event))
            elif event_type == _TOOL_EXECUTED:
                tool_rows[event.day].append((position, _tool_row(event)))
        for day, cells in event_cells.items():
            file = files.setdefault((EVENTS, day), _file_rows())
            file.rows.extend(encode_event_cells(cells))
            file.positions.extend(event_positions[day])
        for day, items in tool_rows.items():
            file = files.setdefault((TOOL_EXECUTIONS, day), _file_rows())
            file.rows.extend(encode_rows(TOOL_EXECUTIONS, [row for _, row in items]))
            file.positions.extend(position for position, _ in items)
        return dead

    def _add_database_rows(
        self,
        rows: Rows,
        result: BatchResult,
        data_type: str,
        model: type[models.Model],
        fields: tuple[str, ...],
        events: list[StreamEvent],
        *,
        key: Callable[[StreamEvent], str | None],
    ) -> None:
        """One query for the batch: the row of every task or workflow that finished, with the
        columns its event recorded as `state` in place of the row's own (see the module doc)."""
        if not events:
            return
        # PostgreSQL text holds no NUL: such an id names no row (and would fail the query).
        ids = {i for i in map(key, events) if i and "\x00" not in i}
        found = database_rows(model, fields, ids)
        for event in events:
            row = found.get(key(event))
            if row is None:
                logger.warning(
                    "%s event %s names %s %r, which is not in the database: no %s row",
                    event.event_type,
                    event.event_id,
                    model._meta.verbose_name,
                    key(event),
                    data_type,
                )
                result.missing += 1
                continue
            state = event.payload.get("state")
            if isinstance(state, dict):
                row = {**row, **_state_columns(model, fields, state)}
            elif row.get("status") not in _ENDED_AS.get(event.event_type, ()):
                logger.warning(
                    "%s event %s: %s %r is %s now and the event records no state: no %s row",
                    event.event_type,
                    event.event_id,
                    model._meta.verbose_name,
                    key(event),
                    row.get("status"),
                    data_type,
                )
                result.stale += 1
                continue
            rows[(data_type, event.day)].append({**row, "event_id": event.event_id})

    def acknowledge(self, batch: WrittenBatch) -> None:
        """Dead-letter the malformed entries and acknowledge the whole batch, atomically. A
        malformed entry is dead-lettered only by the consumer whose acknowledgement removes it
        from the pending list: when a slow consumer's batch was claimed by another, both write
        it (the files dedupe) and both acknowledge it, and one dead-letter entry results."""
        if not batch.entry_ids:
            return
        pipe = self.client.pipeline(transaction=True)
        dead_ids = set()
        for entry_id, raw, reason in batch.dead:
            dead_ids.add(entry_id)
            fields = _dead_letter_fields(raw, reason=reason, entry_id=entry_id)
            self._script(_DEAD_LETTER_ONCE)(
                keys=[self.stream, self.dead_stream],
                args=[
                    self.group,
                    entry_id,
                    settings.SYNAPSE_STREAM_MAXLEN,
                    *(x for kv in fields.items() for x in kv),
                ],
                client=pipe,
            )
        rest = [entry_id for entry_id in batch.entry_ids if entry_id not in dead_ids]
        if rest:
            pipe.xack(self.stream, self.group, *rest)
        pipe.execute()

    def process(self, entries: Sequence[Entry]) -> BatchResult:
        """Write a batch, then acknowledge it.

        An entry whose content breaks the writing in a way the checks do not foresee (a value
        out of a type's range, nesting past the recursion limit) would fail its whole batch on
        every delivery and hold it pending for ever. A batch that fails with such an error
        (_CONTENT_ERRORS) is written again in halves, down to the entry that fails alone, which
        is dead-lettered with the error. Other errors (files, the database, Redis) are the
        environment's: they stop the consumer, and the batch is delivered again."""
        try:
            with collector_paused():
                batch = self.write(entries)
        except _CONTENT_ERRORS as exc:
            if len(entries) > 1:
                logger.warning("a batch of %d entries failed (%r); writing it again in halves", len(entries), exc)
                middle = len(entries) // 2
                result = self.process(entries[:middle])
                result.add(self.process(entries[middle:]))
                return result
            entry_id, raw = entries[0]
            reason = f"cannot be written: {type(exc).__name__}: {exc}"[:1000]
            logger.warning("dead-lettering Synapse entry %s of %s: %s", entry_id, self.stream, reason)
            batch = WrittenBatch(entry_ids=[entry_id], dead=[(entry_id, raw, reason)], result=BatchResult(entries=1))
            batch.result.dead = 1
        self.acknowledge(batch)
        return batch.result

    # --- the loop --------------------------------------------------------------------------

    def run(
        self,
        *,
        once: bool,
        block_ms: int = 2000,
        should_stop: Callable[[], bool] = lambda: False,
        on_batch: Callable[[BatchResult], None] = lambda result: None,
    ) -> BatchResult:
        """Consume: first this consumer's own pending entries, then idle entries of dead
        consumers, then new ones. With `once`, stop when nothing is left that was on the
        stream at the start; otherwise block for new entries and claim periodically until
        `should_stop()` (checked between batches, so a batch is always finished)."""
        total = BatchResult()

        def handle(entries: list[Entry]) -> None:
            if entries:
                result = self.process(entries)
                total.add(result)
                on_batch(result)

        self.ensure_group()
        after = "0"
        while not should_stop():
            with collector_paused():  # from the read on: the batch lives until it is written
                entries = self.read_pending(after=after)
                handle(entries)
            if not entries:
                break
            after = entries[-1][0]
        self.write_trimmed(handle, should_stop)

        if once:
            stop_at = self._last_generated_id()
            self._claim_all(handle, should_stop)
            while not should_stop():
                with collector_paused():
                    entries = self._read_new_or_regroup(block_ms=None)
                    handle(entries)
                if not entries or _id_key(entries[-1][0]) >= stop_at:
                    break
        else:
            next_claim = 0.0
            while not should_stop():
                # Long-running process: drop a database connection that broke or expired
                # (not in `once` mode, which may run inside a test's transaction).
                close_old_connections()
                if time.monotonic() >= next_claim:
                    self._claim_all(handle, should_stop)
                    next_claim = time.monotonic() + max(self.claim_idle_ms, 1000) / 1000
                if self._made_group:
                    self.write_trimmed(handle, should_stop)
                with collector_paused():
                    handle(self._read_new_or_regroup(block_ms=block_ms))
        self.leave()
        return total

    def _claim_all(self, handle: Callable[[list[Entry]], None], should_stop: Callable[[], bool]) -> None:
        cursor = "0-0"
        while not should_stop():
            with collector_paused():
                cursor, entries = self.claim(start=cursor)
                if entries:
                    logger.info("claimed %d idle entries of %s for %s", len(entries), self.stream, self.consumer)
                handle(entries)
            if cursor == "0-0":
                break
        self.forget_departed()

    def forget_departed(self) -> list[str]:
        """Remove from the group the names of consumers that hold no pending entry and have not
        read for DEPARTED_IDLE_MS (at least ten claim periods): processes that died (their
        entries were claimed) and never left. Names are per process, so they would pile up with
        every crash. The check and the removal are one script: a name that took an entry
        meanwhile keeps it (Redis forgets a removed consumer's pending entries). A live
        consumer removed while idle is added again by its next read."""
        threshold = max(DEPARTED_IDLE_MS, 10 * self.claim_idle_ms)
        try:
            consumers = self.client.xinfo_consumers(self.stream, self.group)
        except redis.ResponseError:
            return []  # no stream or group: nothing to forget
        forgotten = []
        for info in consumers:
            key = info["name"]
            name = shown_name(key)
            if name == self.consumer or info["pending"] or info["idle"] < threshold:
                continue
            if self._script(_FORGET_IF_NOTHING_PENDING)(keys=[self.stream], args=[self.group, key]) == 1:
                forgotten.append(name)
        if forgotten:
            logger.info(
                "removed %d departed consumer(s) from %s/%s: %s", len(forgotten), self.stream, self.group, forgotten
            )
        return forgotten

    def _read_new_or_regroup(self, *, block_ms: int | None) -> list[Entry]:
        try:
            return self.read_new(block_ms=block_ms)
        except redis.ResponseError as exc:
            self._regroup_or_raise(exc)
            return []

    def _regroup_or_raise(self, exc: redis.ResponseError) -> None:
        """The stream or the group is gone: NOGROUP, or, for a read blocked when the stream
        was deleted, UNBLOCKED. The group is created again (from the start: the files' dedupe
        absorbs what was written); any other error is raised."""
        message = str(exc)
        if not message.startswith(("NOGROUP", "UNBLOCKED")):
            raise exc
        logger.warning("the group %s of %s is gone (stream deleted?); creating it again", self.group, self.stream)
        self.ensure_group()

    def _last_generated_id(self) -> tuple[int, int]:
        return _id_key(_text(self.client.xinfo_stream(self.stream)["last-generated-id"]))

    def leave(self) -> bool:
        """Remove this consumer from the group if it holds no pending entry: names are per
        process, so they would otherwise pile up. The check and the removal are one script: a
        name is not always this process's alone (a restarted `--processes N --consumer NAME`
        beside the children its killed predecessor left finishing their batch), and an entry
        another process of the name read between the two would leave the group with the name."""
        try:
            return self._script(_FORGET_IF_NOTHING_PENDING)(keys=[self.stream], args=[self.group, self.consumer]) == 1
        except redis.ResponseError as exc:
            # The stream or group is gone: nothing to leave.
            if "NOGROUP" not in str(exc) and "requires the key to exist" not in str(exc):
                raise
            return False


DELETED_REASON = "the entry was deleted from the stream before it was consumed"

# At most this many of an entry's fields go to its dead letter (the script unpacks them, and
# Lua refuses to unpack about 8 000 values); the number left out is recorded.
DEAD_LETTER_MAX_FIELDS = 1000


def _dead_letter_fields(raw: Mapping[Any, Any], *, reason: str, entry_id: str) -> dict[Any, Any]:
    """The entry's fields as read (the original bytes: hiredis packs commands with strict UTF-8,
    so a decoding client's surrogates are turned back here), plus its reason and original id
    (a field "reason" the entry already has is replaced, not doubled); past
    DEAD_LETTER_MAX_FIELDS fields, the first ones and `fields_left_out`."""
    fields = {
        _original_bytes(name): _original_bytes(value)
        for name, value in itertools.islice(raw.items(), DEAD_LETTER_MAX_FIELDS)
    }
    if len(raw) > DEAD_LETTER_MAX_FIELDS:
        fields[b"fields_left_out"] = str(len(raw) - DEAD_LETTER_MAX_FIELDS).encode()
    fields[b"reason"] = reason.encode("utf-8", "backslashreplace")
    fields[b"original_id"] = entry_id.encode()
    return fields


def _original_bytes(value: Any) -> Any:
    if type(value) is not str:
        return value  # bytes as read; anything else is encoded by redis-py, as before
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        # A surrogate that no decoding of Redis's bytes made (the entry was not read from
        # Redis): no original bytes to restore, and the XADD must not fail (the batch would
        # never be acknowledged).
        return value.encode("utf-8", "surrogatepass")


def _entries(reply: Any) -> list[Entry]:
    entries: list[Entry] = []
    for _stream, stream_entries in reply or []:
        if stream_entries and type(stream_entries[0][0]) is str and all(fields for _, fields in stream_entries):
            entries += stream_entries  # a decoding client's entries, none deleted: as they are
        else:
            entries += [(_text(entry_id), fields or {}) for entry_id, fields in stream_entries if entry_id]
    return entries
