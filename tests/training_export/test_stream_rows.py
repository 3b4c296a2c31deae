"""The rows the relay makes for the consumer (training_export/services/stream_rows.py): the
consumer writes them as they are only when they were made under its own settings and are whole
rows of their event, and they are byte for byte the rows it would build itself."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import pytest
import redis

from orchestration.event_types import EventType
from orchestration.models import Event
from orchestration.services.events import event_record, task_event, workflow_event
from tests.factories import AgentFactory, EventFactory
from tests.training_export.test_synapse_consumer import GROUP, T0, finished_workflow, synapse  # noqa: F401
from training_export.services import redaction, stream_rows
from training_export.services import synapse as synapse_module
from training_export.services.store import TrainingDataStore
from training_export.services.synapse import SynapseConsumer, synapse_consumer_client

CANARY = "canary-7d41c9"


def varied_events() -> list[Event]:
    """Events of every kind the consumer files differently, with what makes encoding hard."""
    workflow, done, failed = finished_workflow()
    return [
        task_event(done, EventType.TASK_STARTED),
        task_event(done, EventType.TASK_COMPLETED),
        task_event(failed, EventType.TASK_FAILED, payload={"error": 'boom, "quoted"\nsecond line\r'}),
        workflow_event(workflow, EventType.WORKFLOW_FAILED, payload={"failed_steps": 1}),
        event_record(
            event_type=EventType.TOOL_EXECUTED,
            entity_type="tool",
            entity_id="tool-exec-1",
            workflow_id=workflow.workflow_id,
            agent_id=done.agent_id,
            payload={
                "tool_name": "search",
                "input_params": {"api_key": CANARY, "query": f"mail {CANARY}@example.org, ünïcode ✓"},
                "output_result": {"hits": [1, 2.5, None, True], "note": 'a \\ backslash and "quotes"'},
                "execution_time_ms": 12.5,
            },
        ),
        # No execution_id or agent in the payload: the event's own columns name them.
        event_record(
            event_type=EventType.TOOL_EXECUTED,
            entity_type="tool",
            entity_id="tool-exec-2",
            agent_id=done.agent_id,
            payload={"tool_name": "calculate", "error": f"Bearer {CANARY}"},
        ),
        # A secret outside the payload: the text cells are masked too.
        event_record(
            event_type=EventType.AGENT_INTERACTION,
            entity_type="agent",
            entity_id=f"{CANARY}@example.org",
            payload={"tokens_used": 3, "max_tokens": 10, "text": "x" * 3000},
        ),
        EventFactory(created_at=T0 + dt.timedelta(days=1), payload={"day": "the next one"}),
        # A line break in a text cell: a quoted multi-line row, which the consumer builds itself.
        event_record(event_type=EventType.AGENT_INTERACTION, entity_type="agent", entity_id="two\nlines"),
    ]


def copy_stream(client: redis.Redis, source: str, target: str, *, keep_rows: bool) -> None:
    for entry_id, fields in client.xrange(source):
        if not keep_rows:
            fields = {k: v for k, v in fields.items() if k.decode() not in stream_rows.FIELDS}
        client.xadd(target, fields, id=entry_id)


def consume_stream(stream: str, directory: Path, *, batch: int = 2000):
    consumer = SynapseConsumer(
        client=synapse_consumer_client(block_ms=100),  # as consume_events reads
        store=TrainingDataStore(directory),
        stream=stream,
        group=GROUP,
        consumer="test",
        batch=batch,
    )
    return consumer.run(once=True)


def tree(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*.csv"))
    }


@pytest.fixture
def streams(synapse):  # noqa: F811
    names = [f"{synapse.stream}-{suffix}" for suffix in ("made", "built")]
    yield names
    synapse.client.delete(*names, *(f"{name}:dead" for name in names))


def made_and_built(synapse, streams, tmp_path):  # noqa: F811
    """Relay what the test recorded; consume it as published (made) and without the rows (built)."""
    synapse.relay()
    made, built = streams
    copy_stream(synapse.client, synapse.stream, made, keep_rows=True)
    copy_stream(synapse.client, synapse.stream, built, keep_rows=False)
    with_rows = consume_stream(made, tmp_path / "made")
    without = consume_stream(built, tmp_path / "built")
    return with_rows, without


def test_the_rows_the_relay_made_are_the_rows_the_consumer_builds(synapse, streams, tmp_path):  # noqa: F811
    varied_events()

    with_rows, without = made_and_built(synapse, streams, tmp_path)

    assert with_rows.entries == without.entries == 9
    assert with_rows.relay_made == 8 and without.relay_made == 0
    assert with_rows.written == without.written
    assert dict(with_rows.written) == {"events": 9, "tasks": 2, "workflows": 1, "tool_executions": 2}
    assert tree(tmp_path / "made") == tree(tmp_path / "built")
    assert len(tree(tmp_path / "made")) == 5  # events of two days, tasks, workflows, tool_executions
    for path in (tmp_path / "made").rglob("*.csv"):
        assert CANARY not in path.read_text()


def test_rows_not_made_under_this_consumers_settings_are_built_by_it(
    synapse,  # noqa: F811
    streams,
    tmp_path,
    settings,
    caplog,
    monkeypatch,
):
    """A relay with other redaction settings (or another SECRET_KEY, or another version of the
    encoding) made rows this consumer would mask differently: it builds them itself."""
    for n in (1, 2):
        event_record(
            event_type="agent_interaction", entity_type="agent", entity_id="e-1", payload={"ticket": f"T-9{n}"}
        )
    synapse.relay()
    made, _ = streams
    copy_stream(synapse.client, synapse.stream, made, keep_rows=True)
    settings.REDACT_KEYS = [*settings.REDACT_KEYS, "ticket"]
    monkeypatch.setattr(synapse_module, "_FORMATS_SEEN", set())

    result = consume_stream(made, tmp_path)

    assert result.relay_made == 0 and result.written["events"] == 2
    (events_file,) = (tmp_path / "events").glob("*.csv")
    assert "T-9" not in events_file.read_text()
    warnings = [r.getMessage() for r in caplog.records if "made under other settings" in r.getMessage()]
    assert len(warnings) == 1 and stream_rows.row_format() in warnings[0], "said once, naming both formats"


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda line, event_id: line.replace(event_id, "other-id", 1), id="another-events-id"),
        pytest.param(lambda line, event_id: line[:-1], id="no-line-end"),
        pytest.param(lambda line, event_id: line + line, id="two-rows"),
    ],
)
def test_a_line_that_is_not_one_row_of_its_event_is_built_by_the_consumer(synapse, streams, tmp_path, change):  # noqa: F811
    event = event_record(event_type="agent_interaction", entity_type="agent", entity_id="e-1", payload={"n": 1})
    synapse.relay()
    ((entry_id, fields),) = synapse.client.xrange(synapse.stream)
    line = fields[stream_rows.EVENTS_LINE.encode()].decode()
    changed = {**fields, stream_rows.EVENTS_LINE.encode(): change(line, event.event_id).encode()}
    made, _ = streams
    synapse.client.xadd(made, changed, id=entry_id)

    result = consume_stream(made, tmp_path)

    assert result.relay_made == 0 and result.written["events"] == 1
    (events_file,) = (tmp_path / "events").glob("*.csv")
    assert events_file.read_text().splitlines()[1:] == [line.rstrip("\n")]


def test_a_batch_of_made_and_built_entries_keeps_stream_order_in_every_file(synapse, streams, tmp_path):  # noqa: F811
    for n in range(12):
        event_record(event_type="tool_executed", entity_type="tool", entity_id=f"t-{n}", payload={"tool_name": f"n{n}"})
    synapse.relay()
    made, _ = streams
    for n, (entry_id, fields) in enumerate(synapse.client.xrange(synapse.stream)):
        if n % 3 == 1:  # every third entry as a relay of an earlier version wrote it
            fields = {k: v for k, v in fields.items() if k.decode() not in stream_rows.FIELDS}
        synapse.client.xadd(made, fields, id=entry_id)

    result = consume_stream(made, tmp_path)

    assert result.relay_made == 8 and result.entries == 12
    order = [f"t-{n}" for n in range(12)]
    for data_type in ("events", "tool_executions"):
        (path,) = (tmp_path / data_type).glob("*.csv")
        lines = path.read_text().splitlines()[1:]
        assert [next(cell for cell in line.split(",") if cell.startswith("t-")) for line in lines] == order


def test_an_entry_made_by_the_relay_is_written_once_whichever_path_delivers_it_again(synapse, streams, tmp_path):  # noqa: F811
    """Dedupe by event_id holds across the two paths: an entry redelivered without its rows
    (or with them) is not written twice."""
    event_record(event_type="agent_interaction", entity_type="agent", entity_id="e-1", payload={"n": 1})
    synapse.relay()
    made, built = streams
    copy_stream(synapse.client, synapse.stream, made, keep_rows=True)
    copy_stream(synapse.client, synapse.stream, built, keep_rows=False)

    first = consume_stream(made, tmp_path)
    again = consume_stream(built, tmp_path)

    assert first.written["events"] == 1 and again.written["events"] == 0 and again.duplicates == 1


def test_the_format_changes_with_each_setting_it_covers(settings):
    made_under = stream_rows.row_format()
    settings.SECRET_KEY = settings.SECRET_KEY + "-other"
    assert stream_rows.row_format() != made_under
    settings.SECRET_KEY = settings.SECRET_KEY.removesuffix("-other")
    assert stream_rows.row_format() == made_under
    settings.REDACT_PATTERNS = [*settings.REDACT_PATTERNS, r"T-\d+"]
    assert stream_rows.row_format() != made_under


def test_the_format_changes_with_the_last_words_that_make_a_key_no_secrets(settings, monkeypatch):
    # They decide which keys the rows mask, as REDACT_KEYS does: a relay of another version
    # masks other keys, and its rows must not be written as they are.
    made_under = stream_rows.row_format()
    monkeypatch.setattr(stream_rows, "NOT_SECRET_LAST_WORDS", redaction.NOT_SECRET_LAST_WORDS - {"count"})
    stream_rows._format_for.cache_clear()
    try:
        assert stream_rows.row_format() != made_under
    finally:
        stream_rows._format_for.cache_clear()  # nothing cached under the patched words


def test_the_format_changes_with_the_words_before_a_last_word_that_keep_a_key_secret(settings, monkeypatch):
    # `token` before `hash` makes token_hash a secret's key: a relay whose words differ masks
    # other keys (it kept token_hash), and its rows must not be written as they are.
    made_under = stream_rows.row_format()
    monkeypatch.setitem(redaction.SECRET_AFTER, "hash", redaction.SECRET_AFTER["hash"] - {"token"})
    stream_rows._format_for.cache_clear()
    try:
        assert stream_rows.row_format() != made_under
    finally:
        stream_rows._format_for.cache_clear()  # nothing cached under the patched words


def test_a_redact_key_naming_a_tool_field_masks_it_both_ways(synapse, streams, tmp_path, settings):  # noqa: F811
    """REDACT_KEYS with "input" masks the payload's top-level `input_params`: the relay's
    stream payload and the consumer's own tool row (built from that masked payload) hold
    [REDACTED]; the relay's tool row is encoded from the raw payload's parts, and
    _encode_rows never masks by column name, so the fast path writes the value."""
    settings.REDACT_KEYS = [*settings.REDACT_KEYS, "input"]
    event_record(
        event_type=EventType.TOOL_EXECUTED,
        entity_type="tool",
        entity_id="tool-exec-9",
        payload={"tool_name": "lookup", "input_params": {"patient": "Jane Roe"}},
    )
    with_rows, without = made_and_built(synapse, streams, tmp_path)
    assert with_rows.relay_made == 1 and without.relay_made == 0
    built_tools = next((tmp_path / "built" / "tool_executions").glob("*.csv")).read_text()
    made_tools = next((tmp_path / "made" / "tool_executions").glob("*.csv")).read_text()
    assert "Jane Roe" not in built_tools  # the slow path (the code before the commit) masks it
    assert "Jane Roe" not in made_tools
    assert tree(tmp_path / "made") == tree(tmp_path / "built")


def test_a_payload_the_consumer_would_mask_twice_is_masked_twice_in_the_relays_rows(synapse, streams, tmp_path):  # noqa: F811
    """Default REDACT_PATTERNS: the key=value pattern (last) uncovers a credential URL that the
    URL pattern (earlier) only matches on a second pass. The slow path redacts the already
    masked stream payload again (as the consumer always did); the fast path redacts once."""
    text = "see https://secret=x/y&:pw123@host ok"
    event_record(event_type="agent_interaction", entity_type="agent", entity_id="e-1", payload={"note": text})
    with_rows, _ = made_and_built(synapse, streams, tmp_path)
    assert with_rows.relay_made == 1
    built_events = next((tmp_path / "built" / "events").glob("*.csv")).read_text()
    made_events = next((tmp_path / "made" / "events").glob("*.csv")).read_text()
    assert "pw123" not in built_events
    assert "pw123" not in made_events
    assert tree(tmp_path / "made") == tree(tmp_path / "built")


def test_tool_rows_with_nothing_to_mask_are_byte_identical_both_ways(synapse, streams, tmp_path):  # noqa: F811
    """Every tool event of the first test holds a secret: this one's row is encoded without a
    redaction check (its event's cells were cleared), and must still be the consumer's bytes."""
    event_record(
        event_type=EventType.TOOL_EXECUTED,
        entity_type="tool",
        entity_id="tool-exec-c",
        agent_id="agent-x",
        payload={
            "tool_name": 'calc, "v2"',
            "input_params": {"a": [1, 2.5, None, True], "ü": "✓ line\nbreak"},
            "output_result": "plain text",
            "execution_time_ms": 10**20,
            "error": None,
        },
    )
    with_rows, _ = made_and_built(synapse, streams, tmp_path)
    assert with_rows.relay_made == 1
    assert tree(tmp_path / "made") == tree(tmp_path / "built")


def test_authorization_headers_are_masked_alike_in_the_relays_rows_and_the_consumers(synapse, streams, tmp_path):  # noqa: F811
    """An Authorization header in a tool's output, a tool's error and an event's payload: the
    relay's one batch check finds it (its rows mask it), and they are the consumer's bytes."""
    event_record(
        event_type=EventType.TOOL_EXECUTED,
        entity_type="tool",
        entity_id="tool-exec-a",
        payload={
            "tool_name": "http_get",
            "input_params": {"url": "https://api.example.com/v1/me"},
            "output_result": f"GET /v1/me HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Token {CANARY}\r\n",
            "error": f"401 for {{'Authorization': 'Basic {CANARY}'}}",
        },
    )
    event_record(
        event_type=EventType.AGENT_INTERACTION,
        entity_type="agent",
        entity_id="e-2",
        payload={"note": f'Proxy-Authorization: Digest username="bob", response="{CANARY}"'},
    )
    with_rows, without = made_and_built(synapse, streams, tmp_path)
    assert with_rows.relay_made == 2 and without.relay_made == 0
    assert tree(tmp_path / "made") == tree(tmp_path / "built")
    events = next((tmp_path / "made" / "events").glob("*.csv")).read_text()
    tools = next((tmp_path / "made" / "tool_executions").glob("*.csv")).read_text()
    assert CANARY not in events + tools
    assert f"Proxy-{redaction.MASK}" in events and "Host: api.example.com" in tools


def relayed_after_a_new_agents_key(synapse, streams, monkeypatch) -> tuple[str, tuple[str, ...], str]:  # noqa: F811
    """An event holding the key of an agent made through the API, relayed (rows made) after
    the relay read the agents table: the key, the secret values read before the agent
    existed, and the stream of the relay's entries."""
    key = f"vllm{CANARY}token"
    monkeypatch.setenv("API_ONLY_PROVIDER_API_KEY", key)
    stale = redaction.configured_secret_values(refresh=True)  # before the agent exists
    EventFactory(created_at=T0, payload={"error": f"401 Unauthorized for {key}"}, agent_id="api-agent")
    AgentFactory(id="api-agent", api_key_env="API_ONLY_PROVIDER_API_KEY")
    redaction.configured_secret_values(refresh=True)  # the relay's reading
    synapse.relay()
    made, _ = streams
    copy_stream(synapse.client, synapse.stream, made, keep_rows=True)
    return key, stale, made


def test_a_consumer_that_has_not_read_a_new_agents_key_yet_reads_it_and_writes_the_relays_rows(
    synapse,  # noqa: F811
    streams,
    tmp_path,
    monkeypatch,
    caplog,
):
    """An agent made through the API names a key variable: the relay read it (its rows mask
    the key, under a format that includes it) before this consumer's next reading. Meeting
    that format, the consumer reads its secret values again instead of building the rows
    under the older ones, which do not know the key."""
    key, stale, made = relayed_after_a_new_agents_key(synapse, streams, monkeypatch)
    monkeypatch.setattr(redaction, "_secret_values", stale)  # the consumer's, read before
    monkeypatch.setattr(synapse_module, "_FORMATS_REFRESHED", {})
    monkeypatch.setattr(synapse_module, "_FORMATS_SEEN", set())

    result = consume_stream(made, tmp_path)

    assert result.relay_made == result.entries == 1
    (events_file,) = (tmp_path / "events").glob("*.csv")
    assert key not in events_file.read_text() and "401 Unauthorized for" in events_file.read_text()
    assert not [r for r in caplog.records if "made under other settings" in r.getMessage()]


def test_a_consumer_still_reads_a_new_agents_key_after_meeting_many_formats_before(
    synapse,  # noqa: F811
    streams,
    tmp_path,
    monkeypatch,
    caplog,
):
    """A long-running consumer meets a new csv_format each time an agent's key variable is
    added or renamed (and the old one from relays that have not read it yet): the refresh on
    meeting a format must not stop for good after the first few of them."""
    key, stale, made = relayed_after_a_new_agents_key(synapse, streams, monkeypatch)
    clock = FakeClock()
    monkeypatch.setattr(synapse_module, "time", clock)
    monkeypatch.setattr(synapse_module, "_FORMATS_REFRESHED", {})
    monkeypatch.setattr(synapse_module, "_FORMATS_SEEN", set())
    for n in range(2 * synapse_module._FORMATS_WARNED):  # formats met earlier: other agent changes
        clock.now += 5.0
        synapse_module._refresh_for(f"{n:032x}")
    clock.now += 3600.0
    monkeypatch.setattr(redaction, "_secret_values", stale)  # the consumer's, read before

    result = consume_stream(made, tmp_path)

    assert result.relay_made == result.entries == 1
    (events_file,) = (tmp_path / "events").glob("*.csv")
    assert key not in events_file.read_text()


class FakeClock:
    """The synapse module's `time`, with a monotonic clock the test moves."""

    def __init__(self) -> None:
        import time

        self._time = time
        self.now = time.monotonic()

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name: str):
        return getattr(self._time, name)
