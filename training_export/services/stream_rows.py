"""CSV rows made by the relay, carried on the Synapse stream for the consumer to write.

The relay has each event in hand as a typed row; the consumer would otherwise parse the entry
back, check it, redact it again (the relay already masked its payload) and encode it. So the
relay adds the finished rows to the entry, made by the same functions the consumer uses
(`encode_event_cells`, `encode_rows`: the same redaction and the same bytes):

- `csv_events`: the line of the events file;
- `csv_tool_executions`: the line of the tool_executions file (`tool_executed` events only);
- `csv_format`: which settings made them: a keyed BLAKE2b (key: SECRET_KEY) of ROW_ENCODING,
  the files' columns and the redaction settings (keys, the last words that make a key no
  secret's, the words before them that do not, and the credential words they apply to,
  patterns, the configured secret values).
  One value per configuration; it reveals nothing about the settings behind it.

A consumer writes the lines as they are only when `csv_format` is its own and each line is one
whole row of its event (it begins, or for tool_executions ends, with the event_id, and holds one
line break, at its end). Any other entry (a relay under other redaction settings, another
SECRET_KEY or another version of the encoding; an entry of an earlier relay; one added by
hand) is parsed, checked and redacted by the consumer, as before, into the same bytes.

Like the broker, the stream is inside the trust boundary: whoever can write to this Redis can
queue tasks for the workers, and so could also add an entry with rows of their choosing.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from django.conf import settings

from training_export.services.jsonl import json_load
from training_export.services.redaction import (
    CREDENTIAL_WORDS,
    NOT_SECRET_LAST_WORDS,
    SECRET_AFTER,
    configured_secret_values,
)
from training_export.services.store import (
    EVENT_TEXT_COLUMNS,
    EVENTS,
    SCHEMAS,
    TOOL_EXECUTIONS,
    EventCells,
    encode_event_cells,
    encode_event_cells_checked,
    encode_rows,
    json_text,
)

# Bumped whenever the bytes of a row change for the same columns (quoting, number or time
# formats): a consumer of another version then builds the rows itself.
ROW_ENCODING = "2"

EVENTS_LINE = "csv_events"
TOOL_LINE = "csv_tool_executions"
FORMAT = "csv_format"
FIELDS = (EVENTS_LINE, TOOL_LINE, FORMAT)

TOOL_EXECUTED = "tool_executed"
# A tool row's columns taken from its event's payload: all but when and which event.
TOOL_PAYLOAD_FIELDS = tuple(c for c in SCHEMAS[TOOL_EXECUTIONS].columns if c not in ("created_at", "event_id"))


@lru_cache(maxsize=8)
def _format_for(secret_key: str, keys: tuple[str, ...], patterns: tuple[str, ...], secrets: tuple[str, ...]) -> str:
    material = repr(
        (
            ROW_ENCODING,
            SCHEMAS[EVENTS].columns,
            SCHEMAS[TOOL_EXECUTIONS].columns,
            keys,
            sorted(NOT_SECRET_LAST_WORDS),
            sorted((word, sorted(before)) for word, before in SECRET_AFTER.items()),
            sorted(CREDENTIAL_WORDS),
            patterns,
            secrets,
        )
    ).encode("utf-8", "surrogatepass")
    key = hashlib.blake2b(secret_key.encode("utf-8", "surrogatepass"), person=b"csv-rows").digest()
    return hashlib.blake2b(material, key=key, digest_size=16).hexdigest()


def row_format() -> str:
    """The `csv_format` of rows made under the current settings (see the module doc)."""
    return _format_for(
        str(settings.SECRET_KEY),
        tuple(settings.REDACT_KEYS),
        tuple(settings.REDACT_PATTERNS),
        configured_secret_values(),
    )


def whole_rows(event_id: str, events_line: str, tool_line: str) -> bool:
    """Whether the lines are one row each of the event `event_id`, each on one line (see the
    module doc). A row with a line break inside a quoted cell is not taken as it is either (the
    consumer builds it): telling those apart would take parsing the line."""
    return (
        events_line.find("\n") == len(events_line) - 1
        and events_line.startswith(f"{event_id},")
        and (not tool_line or (tool_line.find("\n") == len(tool_line) - 1 and tool_line.endswith(f",{event_id}\n")))
    )


def tool_row(payload: Mapping[str, Any], *, entity_id: str, agent_id: str, created_at: Any, event_id: str) -> dict:
    """The tool_executions row of a `tool_executed` event (its payload names the call; the
    event's own columns name the call and the agent when the payload does not)."""
    row = {name: payload.get(name) for name in TOOL_PAYLOAD_FIELDS}
    row["execution_id"] = row["execution_id"] or entity_id
    row["agent_id"] = row["agent_id"] or agent_id
    row.update(created_at=created_at, event_id=event_id)
    return row


def entry_fields(entries: Sequence[dict[str, str]], payloads: Sequence[Any]) -> list[dict[str, str]]:
    """For each relay entry (`event_to_entry`'s flat text fields but its payload) and the payload
    its event holds: the entry's `payload` (the JSON, masked where the event's row needed it)
    and the fields above, in one batch (one redaction check for all the events' cells; each
    file's lines encoded together). No row fields for an event whose payload is not a JSON
    object (the consumer dead-letters it)."""
    made_under = row_format()
    cells = []
    tools: dict[int, dict] = {}
    for index, (entry, payload) in enumerate(zip(entries, payloads, strict=True)):
        created_at = dt.datetime.fromisoformat(entry["created_at"]).astimezone(dt.UTC)
        cells.append(
            EventCells(
                entry["event_id"],
                [entry[column] for column in EVENT_TEXT_COLUMNS],
                created_at.isoformat(),
                payload,
                json_text(payload),
            )
        )
        if entry["event_type"] == TOOL_EXECUTED and type(payload) is dict:
            tools[index] = tool_row(
                payload,
                entity_id=entry["entity_id"],
                agent_id=entry["agent_id"],
                created_at=created_at,
                event_id=entry["event_id"],
            )
    events_lines, payload_texts, dirty = encode_event_cells_checked(cells)
    if dirty:
        # The consumer's own path (synapse._build_rows) starts from the payload as the stream
        # holds it, already masked: its tool row is taken from that masked payload (a key
        # masked at the payload's top level, say "input" for input_params, is masked there and
        # never by column name), and its events row redacts that payload a second time (which
        # is not always a no-op). Do the same for the rows redaction touched or may touch.
        redone = sorted(dirty)
        masked = {index: json_load(payload_texts[index]) for index in redone}
        again = encode_event_cells(
            [cells[index]._replace(payload=masked[index], payload_json=json_text(masked[index])) for index in redone]
        )
        for index, line in zip(redone, again, strict=True):
            events_lines[index] = line
        for index in redone:
            if index in tools and type(masked[index]) is dict:
                entry = entries[index]
                tools[index] = tool_row(
                    masked[index],
                    entity_id=entry["entity_id"],
                    agent_id=entry["agent_id"],
                    created_at=tools[index]["created_at"],
                    event_id=entry["event_id"],
                )
    # A tool row's values are parts of its event's payload and cells: clean where they are.
    clean = [index for index in tools if index not in dirty]
    checked = [index for index in tools if index in dirty]
    tool_lines = dict(zip(clean, encode_rows(TOOL_EXECUTIONS, [tools[i] for i in clean], clean=True), strict=True))
    tool_lines.update(zip(checked, encode_rows(TOOL_EXECUTIONS, [tools[i] for i in checked]), strict=True))
    fields: list[dict[str, str]] = []
    for index, payload in enumerate(payloads):
        row = {"payload": payload_texts[index]}
        if type(payload) is dict:
            row[EVENTS_LINE] = events_lines[index][1]
            row[FORMAT] = made_under
            if index in tool_lines:
                row[TOOL_LINE] = tool_lines[index][1]
        fields.append(row)
    return fields
