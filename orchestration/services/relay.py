"""The outbox relay: publishes committed events to the Synapse Redis Stream, in order.

Each event becomes a stream entry whose id is `<sequence>-1`. The stream itself is the
checkpoint: a relay that crashes after publishing and before doing anything else re-reads from
the stream's last id and can neither skip nor duplicate an entry. A batch is added only if the
stream is still where the relay last saw it (one script): a second relay running at the same
time, or a stream that was deleted meanwhile (Redis restarted empty, the key removed), makes it
read the stream's position again and go on from there. A pass that went on from where it was
before the stream vanished would put the next events on the new stream above every event the
consumers had not yet read, and the stream, its checkpoint, would then say those were published.

The watermark trap: sequence values are taken when a row is inserted, not when its
transaction commits, so a transaction that commits late leaves a temporary hole below rows
that are already visible. The relay never publishes past a hole until it knows the hole
is permanent (the inserting transaction rolled back). When it first sees the hole it records
the transactions that hold a write lock on the events table (from `pg_locks`): whichever
transaction holds the hole's sequence value took that lock before taking the value, and the
value was taken before the rows above it that the relay has just read, so it is one of them
if it is still open. Once none of them holds the lock any more (each ends by committing or
rolling back), the relay reads the rows again: a hole still empty is a rollback.

Only transactions that wrote to events are waited for. Proving the hole with the snapshot's
`xmin` instead (every older transaction ended) would also wait for an idle session of any
other database on the same server, or a long read such as an export's snapshot, and the
stream would stop with it. Identity values come one at a time (the sequence's CACHE 1), so
a value below a visible one was taken before it, which the reasoning above relies on.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import redis
from django.conf import settings
from django.db import connection
from django.db.models import QuerySet, TextField
from django.db.models.functions import Cast

from orchestration.models import Event

logger = logging.getLogger(__name__)


@dataclass
class RelayResult:
    published: int = 0
    last_sequence: int = 0
    waiting_on_gap: tuple[int, int] | None = None
    restarted_from: int | None = None  # the stream was behind this pass's position: it went on from here
    # The stream's last id is above every event in the table: nothing numbered below it would
    # ever be published (PostgreSQL restored from an older backup, or another database's stream).
    stream_ahead: int = 0


def synapse_client() -> redis.Redis:
    url = settings.REDIS_URL
    if not url:
        raise RuntimeError("the Synapse stream needs Redis: set REDIS_URL")
    return redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)


def events_to_entries(events: list[Event]) -> list[dict[str, str]]:
    """`event_to_entry` of each event, made in one batch with the entries' rows of the training
    CSV files (stream_rows): one check of every event's cells for secrets, and only the events
    it cannot clear are walked; a payload is masked on the stream as in its row."""
    from training_export.services.jsonl import json_load
    from training_export.services.stream_rows import entry_fields

    entries = [event_fields(event) for event in events]
    # The payload as PostgreSQL holds it when the event was read with its text (`_relay_batch`):
    # parsed with every number exact, where the ORM's parser turns a number a float cannot hold
    # into a rounded float, or into Infinity, which the rows would write as null.
    payloads = [
        json_load(event.payload_text) if getattr(event, "payload_text", None) is not None else event.payload
        for event in events
    ]
    for entry, fields in zip(entries, entry_fields(entries, payloads), strict=True):
        entry.update(fields)
    return entries


def with_payload_text(events: QuerySet[Event]) -> QuerySet[Event]:
    """The events with their payload as PostgreSQL's text (`payload_text`), the ORM's parsed
    copy deferred: what `events_to_entries` reads exactly."""
    return events.defer("payload").annotate(payload_text=Cast("payload", TextField()))


def event_to_entry(event: Event) -> dict[str, str]:
    """The stream entry of an event: flat string fields, payload as JSON (compact, sorted keys)
    with secrets masked (DESIGN §7: redacted before anything leaves the database; a tool's
    arguments and an agent interaction's input travel in payloads), and its rows of the
    training CSV files (stream_rows). The row keeps what was written."""
    return events_to_entries([event])[0]


def event_fields(event: Event) -> dict[str, str]:
    """An event's stream fields but its payload and rows."""
    return {
        "event_id": event.event_id,
        "sequence": str(event.sequence),
        "event_type": event.event_type,
        "entity_type": event.entity_type or "",
        "entity_id": event.entity_id or "",
        "workflow_id": event.workflow_id or "",
        "agent_id": event.agent_id or "",
        "session_id": event.session_id or "",
        "source": event.source,
        "severity": event.severity,
        "created_at": event.created_at.isoformat(),
    }


def settled_sequence(client: redis.Redis | None = None) -> int:
    """The last sequence the relay has put on the stream: every event up to it has been
    published, and no event can commit below it any more (the relay passes a sequence hole
    only once it is proven a rollback). 0 before the first. Raises RuntimeError without
    Redis, redis.RedisError when it does not answer. `client`: a caller's own (the API's)."""
    return _stream_last_sequence(client or synapse_client(), settings.SYNAPSE_STREAM)


def _stream_last_sequence(client: redis.Redis, stream: str) -> int:
    try:
        info = client.xinfo_stream(stream)
    except redis.ResponseError:
        return 0  # no stream yet
    last = info["last-generated-id"]
    last = last.decode() if isinstance(last, bytes) else last
    return int(last.split("-")[0])


def _events_writers() -> list[str]:
    """The (virtual) transactions holding a write lock on the events table: every open
    transaction that took one of its sequence values is among them."""
    with connection.cursor() as cursor:
        cursor.execute(_WRITERS_SQL, [connection.ops.quote_name(Event._meta.db_table)])
        return sorted(row[0] for row in cursor.fetchall())


def _writers_still_open(writers: set[str]) -> set[str]:
    if not writers:
        return set()
    with connection.cursor() as cursor:
        cursor.execute(
            _WRITERS_SQL + " AND virtualtransaction = ANY(%s)",
            [connection.ops.quote_name(Event._meta.db_table), sorted(writers)],
        )
        return {row[0] for row in cursor.fetchall()}


# An INSERT takes ROW EXCLUSIVE on the table (listed per mode held, whatever stronger lock
# the transaction also holds). Reads (ACCESS SHARE) and maintenance (autovacuum's SHARE UPDATE
# EXCLUSIVE, which can last minutes on a big table) are not writers. A prepared (two-phase)
# transaction keeps its locks under a virtual id of its own, so it is waited for as well.
_WRITERS_SQL = (
    "SELECT DISTINCT virtualtransaction FROM pg_locks WHERE locktype = 'relation' "
    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    "AND relation = %s::regclass AND mode = 'RowExclusiveLock'"
)


def _recorded_writers(value: bytes | str) -> set[str] | None:
    """A hole's recorded writers; None for a value an earlier relay version stored (a
    transaction id), which is recorded again."""
    try:
        writers = json.loads(value)
    except ValueError:
        return None
    return set(writers) if isinstance(writers, list) else None


def _settled_gaps(client: redis.Redis, gaps_key: str) -> set[str]:
    """The recorded holes none of whose writers is still open. Checked before the rows are
    read, so that the read shows whatever those writers committed."""
    recorded = {_text(gap): _recorded_writers(value) for gap, value in client.hgetall(gaps_key).items()}
    known = [writers for writers in recorded.values() if writers is not None]
    still_open = _writers_still_open(set().union(*known)) if known else set()
    return {gap for gap, writers in recorded.items() if writers is not None and not writers & still_open}


def events_relay(*, client: redis.Redis | None = None, batch: int | None = None, max_batches: int = 20) -> RelayResult:
    """Publish every committed event not yet on the stream, in sequence order. Meant to run
    outside any transaction (a hole met inside one is a RuntimeError)."""
    client = client or synapse_client()
    stream = settings.SYNAPSE_STREAM
    batch = batch or settings.SYNAPSE_RELAY_BATCH
    gaps_key = f"{stream}:relay:gaps"
    result = RelayResult(last_sequence=_stream_last_sequence(client, stream))
    for _ in range(max_batches):
        published, blocked, first_seen = _relay_batch(client, stream, gaps_key, result, batch)
        if published is None:
            continue  # the stream was not where this pass saw it: on from its position
        if blocked and first_seen:
            # A hole seen for the first time: its writers are recorded, and the next batch
            # proves it at once if they have all ended (a rollback's hole usually has). Waiting
            # for the next pass instead passed one hole per pass: with rollbacks more frequent
            # than the passes, the stream fell behind for good.
            continue
        if blocked or published < batch:
            break
    if result.published:
        _forget_passed_gaps(client, gaps_key, result.last_sequence)
    else:
        _stream_ahead_check(stream, result)
    stream_trim(client=client, stream=stream)
    return result


def stream_ahead_of(newest: int | None, published: int) -> int:
    """How far the stream's last id (`published`) is above the newest event in the table, 0 when
    it is not. The table's newest is the newest ever committed: retention deletes the oldest
    first, and an empty table (all of it past retention) tells nothing."""
    return max(published - newest, 0) if newest else 0


def _stream_ahead_check(stream: str, result: RelayResult) -> None:
    """With nothing to publish, whether the stream is ahead of the table: then the events the
    table numbers below the stream's last id are never published, and the relay says so at
    every pass (a single index lookup, on idle passes only)."""
    newest = Event.objects.order_by("-sequence").values_list("sequence", flat=True).first()
    result.stream_ahead = stream_ahead_of(newest, result.last_sequence)
    if result.stream_ahead:
        logger.error(
            "the Synapse stream %r is at %d, above the newest event in PostgreSQL (%d): events numbered up to %d "
            "would never be published. PostgreSQL was restored from an older state, or the stream belongs to "
            "another database: delete the stream (its consumer groups go with it; the relay publishes again what "
            "PostgreSQL holds, and the training files skip what they already have)",
            stream,
            result.last_sequence,
            newest,
            result.last_sequence,
        )


def _forget_passed_gaps(client: redis.Redis, gaps_key: str, last_sequence: int) -> None:
    """Drop the horizons of holes the stream is now past: a hole proven empty is dropped when
    it is passed, but one that a late commit filled is simply published through, and its
    horizon would stay for ever."""
    passed = [gap for gap in client.hkeys(gaps_key) if int(_text(gap).split("-")[1]) <= last_sequence]
    if passed:
        client.hdel(gaps_key, *passed)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def shown_name(key: bytes | str) -> str:
    """A group or consumer name as Redis gave it, for display and matching: names need not be
    UTF-8, and one that is not shows its bytes escaped (commands take the name as given)."""
    return key.decode("utf-8", "backslashreplace") if isinstance(key, bytes) else key


def _entry_key(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    milliseconds, sequence = text.split("-")
    return int(milliseconds), int(sequence)


@dataclass
class GroupState:
    """A consumer group of the stream, as the trim sees it."""

    name: str  # for display: a name that is not UTF-8 shows its bytes escaped
    key: bytes | str  # the name as Redis gave it, for commands
    consumers: int
    pending: int
    last_delivered: str
    lag: int | None  # entries not yet delivered to the group (None when Redis cannot tell)
    keeps_from: tuple[int, int]  # the oldest entry it still needs: its oldest pending, or the next


def dead_letter_stream(stream: str) -> str:
    """Where the consumer puts the entries of `stream` it could not write (a reason and the
    entry's original id with each)."""
    return f"{stream}:dead"


def stream_groups(client: redis.Redis, stream: str) -> list[GroupState]:
    """The stream's consumer groups (none when there is no stream)."""
    try:
        groups = client.xinfo_groups(stream)
    except redis.ResponseError:
        return []  # no stream yet
    states = []
    for group in groups:
        key = group["name"]
        name = shown_name(key)
        summary = client.xpending(stream, key)
        last = _text(group["last-delivered-id"])
        if summary["pending"]:
            keeps_from = _entry_key(summary["min"])
        else:
            milliseconds, sequence = _entry_key(last)
            keeps_from = (milliseconds, sequence + 1)
        states.append(
            GroupState(
                name=name,
                key=key,
                consumers=int(group["consumers"]),
                pending=int(summary["pending"]),
                last_delivered=last,
                lag=group.get("lag"),
                keeps_from=keeps_from,
            )
        )
    return states


class StreamGroupError(ValueError):
    """A consumer group that cannot be told apart or found; the message says which."""


def stream_group_destroy(client: redis.Redis, stream: str, name: str) -> GroupState:
    """Remove the consumer group shown as `name` (GroupState.name), dropping its pending
    entries: what only it still needed becomes trimmable. Returns the group as it was."""
    groups = stream_groups(client, stream)
    matches = [group for group in groups if group.name == name]
    if len(matches) > 1:
        raise StreamGroupError(
            f"{len(matches)} consumer groups of {stream!r} show as {name!r} (a name that is not UTF-8 shows "
            "its bytes escaped): remove the one you mean with redis-cli XGROUP DESTROY"
        )
    if not matches:
        known = ", ".join(sorted(group.name for group in groups)) or "none"
        raise StreamGroupError(f"the stream {stream!r} has no consumer group {name!r} (its groups: {known})")
    client.xgroup_destroy(stream, matches[0].key)
    return matches[0]


def stream_trim(*, client: redis.Redis, stream: str, approximate: bool = True) -> int:
    """Trim the entries every consumer group is done with, and nothing else.

    The trim point is, over all groups, the oldest entry still pending (delivered, not yet
    acknowledged) or else the first one not yet delivered: entries below it were acknowledged
    by every group. Without any group nothing is trimmed (no consumer has started reading).
    A stream longer than SYNAPSE_STREAM_MAXLEN is reported, not cut: a lagging consumer still
    needs those entries (`manage.py synapse_groups` shows which group holds the stream, and
    removes one that was abandoned). `approximate` (Redis's "~") trims whole nodes only, which
    is cheaper; it may keep more entries, never fewer."""
    groups = stream_groups(client, stream)
    trimmed = 0
    if groups:
        safe = min(group.keeps_from for group in groups)
        trimmed = client.xtrim(stream, minid=f"{safe[0]}-{safe[1]}", approximate=approximate)
    try:
        length = client.xlen(stream)
    except redis.ResponseError:
        return trimmed
    if length > settings.SYNAPSE_STREAM_MAXLEN:
        holder = min(groups, key=lambda group: group.keeps_from).name if groups else None
        logger.warning(
            "the Synapse stream holds %d entries (SYNAPSE_STREAM_MAXLEN=%d) that %s: is the consumer running? "
            "(manage.py synapse_groups)",
            length,
            settings.SYNAPSE_STREAM_MAXLEN,
            f"the consumer group {holder!r} still needs" if holder else "no consumer group has read yet",
        )
    return trimmed


def _relay_batch(
    client: redis.Redis, stream: str, gaps_key: str, result: RelayResult, batch: int
) -> tuple[int | None, bool, bool]:
    """(events published, None when the stream had moved; blocked by a hole; that hole's
    writers recorded just now)."""
    # SQLite serialises writers: no transaction can commit a lower sequence late there.
    holes_possible = connection.vendor == "postgresql"
    settled = _settled_gaps(client, gaps_key) if holes_possible else set()  # before reading rows
    rows = list(with_payload_text(Event.objects.filter(sequence__gt=result.last_sequence)).order_by("sequence")[:batch])
    to_publish: list[Event] = []
    expected = result.last_sequence + 1
    blocked = first_seen = False
    result.waiting_on_gap = None  # where this batch stops, if it does
    for event in rows:
        if event.sequence > expected and holes_possible:
            gap = f"{expected}-{event.sequence - 1}"
            if gap not in settled:
                if connection.in_atomic_block:
                    # Inside a transaction the rows read again would not show what the hole's
                    # writer committed (nor would an enclosing writer ever end).
                    raise RuntimeError("the relay met a hole inside a transaction: run events_relay() outside one")
                if _recorded_writers(client.hget(gaps_key, gap) or b"") is None:
                    # Taken after the rows were read: see the module's docstring.
                    client.hset(gaps_key, gap, json.dumps(_events_writers()))
                    first_seen = True
                result.waiting_on_gap = (expected, event.sequence - 1)
                blocked = True
                break
            client.hdel(gaps_key, gap)  # every transaction that could fill it has ended: a rollback
        to_publish.append(event)
        expected = event.sequence + 1
    published = _publish(client, stream, to_publish, result)
    return published, blocked, first_seen


# Add a batch of entries only if the stream's last id is still the one the relay knows.
# KEYS = stream; ARGV = that id's sequence (0: no entry yet), then per entry its id, the number
# of its field and value arguments, and those. Returns nothing when the batch was added, else
# the stream's last id (another relay added entries, or the stream was deleted and begins again).
_APPEND_IF_AT = """
    local last = '0-0'
    if redis.call('EXISTS', KEYS[1]) == 1 then
        local info = redis.call('XINFO', 'STREAM', KEYS[1])
        for i = 1, #info, 2 do
            if info[i] == 'last-generated-id' then
                last = info[i + 1]
            end
        end
    end
    if string.match(last, '^%d+') ~= ARGV[1] then
        return last
    end
    local i = 2
    while i <= #ARGV do
        local n = tonumber(ARGV[i + 1])
        redis.call('XADD', KEYS[1], ARGV[i], unpack(ARGV, i + 2, i + 1 + n))
        i = i + 2 + n
    end
    return false
"""


def _publish(client: redis.Redis, stream: str, events: list[Event], result: RelayResult) -> int | None:
    """Add the events' entries if the stream is at result.last_sequence; otherwise move
    result.last_sequence to where the stream is and return None (nothing added)."""
    if not events:
        return 0
    args: list[str | int] = [str(result.last_sequence)]
    for event, entry in zip(events, events_to_entries(events), strict=True):
        args += [f"{event.sequence}-1", 2 * len(entry)]
        for name, value in entry.items():
            args += [name, value]
    moved = client.register_script(_APPEND_IF_AT)(keys=[stream], args=args)
    if moved is not None:
        position = int(_text(moved).split("-")[0])
        if position < result.last_sequence:
            logger.warning(
                "the Synapse stream %r is at %d, behind the relay's %d (Redis restarted empty, or the stream was "
                "deleted): publishing again from there",
                stream,
                position,
                result.last_sequence,
            )
            result.restarted_from = position
        else:
            logger.info("the Synapse stream %r is at %d (another relay): going on from there", stream, position)
        result.last_sequence = position
        return None
    result.last_sequence = events[-1].sequence
    result.published += len(events)
    return len(events)
