"""The Synapse consumer against entries that break it in ways its checks did not foresee,
and against its stream vanishing: it dead-letters what cannot be written and keeps running
(each test failed before its fix; an audit's reproductions)."""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
import redis

from orchestration.event_types import EventType
from orchestration.models import Event, TaskExecution
from orchestration.services.events import TASK_STATE_FIELDS, entity_states, task_event
from orchestration.services.relay import event_to_entry, stream_trim, with_payload_text
from tests.factories import TaskExecutionFactory
from training_export.services.store import SCHEMAS, TASKS, TrainingDataStore, _encode_rows
from training_export.services.synapse import (
    _TASK_FIELDS,
    SynapseConsumer,
    _state_columns,
    database_rows,
    parse_entries,
)

GROUP = "training"
T0 = dt.datetime(2024, 3, 5, 10, 0, tzinfo=dt.UTC)


@pytest.fixture
def stream(settings, tmp_path: Path) -> Iterator[str]:
    name = f"synapse-poison-{uuid.uuid4().hex[:8]}"
    settings.SYNAPSE_STREAM = name
    settings.TRAINING_DATA_DIR = tmp_path / "training"
    yield name
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.delete(name, f"{name}:dead")
    client.close()


def entry(number: int, **overrides: str) -> dict[str, str]:
    fields = {
        "event_id": f"ev-{number}",
        "sequence": str(number),
        "event_type": "agent_started",
        "entity_type": "task",
        "entity_id": f"task-{number}",
        "workflow_id": "",
        "agent_id": "agent-1",
        "session_id": "",
        "source": "platform",
        "severity": "info",
        "created_at": T0.isoformat(),
        "payload": "{}",
    }
    fields.update(overrides)
    return fields


def consumer(client: redis.Redis, stream: str, data_dir: Path, name: str, **kwargs) -> SynapseConsumer:
    return SynapseConsumer(
        client=client, store=TrainingDataStore(data_dir), stream=stream, group=GROUP, consumer=name, **kwargs
    )


def nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


POISON = {
    # fromisoformat accepts it; astimezone(UTC) raises OverflowError, not MalformedEntry
    "created_at before year 1 in UTC": {"created_at": "0001-01-01T00:00:00+01:00"},
    "created_at after year 9999 in UTC": {"created_at": "9999-12-31T23:30:00-01:00"},
    # orjson parses up to depth 1024; json_text's fallback json.dumps raises RecursionError
    "payload nested 1020 deep": {"payload": nested(1020)},
    # with a long number json_load uses json.loads, which raises RecursionError, not ValueError
    "payload nested 1100 deep with a long number": {
        "payload": '{"a":' * 1100 + "123456789012345678901234567890" + "}" * 1100
    },
}


@pytest.mark.django_db
@pytest.mark.parametrize("poison", POISON.values(), ids=POISON.keys())
def test_a_malformed_entry_is_dead_lettered_not_a_crash_loop(stream, settings, poison):
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.xadd(stream, entry(1), id="1-1")
    client.xadd(stream, entry(2, **poison), id="2-1")
    client.xadd(stream, entry(3), id="3-1")
    errors = []
    for attempt in range(2):  # a restart (new process name) claims the batch again
        try:
            consumer(client, stream, settings.TRAINING_DATA_DIR, f"worker-{attempt}", claim_idle_ms=0).run(once=True)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {str(exc)[:80]}")
    stream_trim(client=client, stream=stream, approximate=False)
    state = {
        "errors": errors,
        "pending": client.xpending(stream, GROUP)["pending"],
        "dead_lettered": client.xlen(f"{stream}:dead"),
        "stream_len_after_trim": client.xlen(stream),
    }
    assert state == {"errors": [], "pending": 0, "dead_lettered": 1, "stream_len_after_trim": 0}
    assert _written_event_ids(settings.TRAINING_DATA_DIR) == {"ev-1", "ev-3"}  # the batch's good entries


def _written_event_ids(data_dir: Path) -> set[str]:
    import csv

    ids = set()
    for path in (Path(data_dir) / "events").glob("*.csv"):
        with path.open(newline="") as fh:
            ids |= {row["event_id"] for row in csv.DictReader(fh)}
    return ids


@pytest.mark.django_db
def test_a_terminal_event_whose_id_holds_nul_names_no_row_and_is_written(stream, settings):
    """PostgreSQL text holds no NUL: the id is not sent to it (the query would fail the batch)."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.xadd(stream, entry(1), id="1-1")
    client.xadd(stream, entry(2, event_type="task_completed", entity_id="t\x00x"), id="2-1")
    result = consumer(client, stream, settings.TRAINING_DATA_DIR, "worker-1").run(once=True)
    assert (result.missing, result.dead, client.xpending(stream, GROUP)["pending"]) == (1, 0, 0)
    assert _written_event_ids(settings.TRAINING_DATA_DIR) == {"ev-1", "ev-2"}


def test_the_running_consumer_survives_the_stream_being_deleted_while_it_blocks(stream, settings):
    """The consumer means to recreate its group when the stream is deleted (NOGROUP), but a
    consumer blocked in XREADGROUP (the idle state) gets "UNBLOCKED the stream key no longer
    exists" instead, and dies."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.xadd(stream, entry(1), id="1-1")
    worker = consumer(
        redis.Redis.from_url(settings.REDIS_URL, decode_responses=True),
        stream,
        settings.TRAINING_DATA_DIR,
        "worker-1",
    )
    stop = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            worker.run(once=False, block_ms=2000, should_stop=stop.is_set)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.7)  # entry 1 consumed; now blocked in XREADGROUP ... BLOCK 2000
    client.delete(stream)  # an operator's DEL / FLUSHDB, or Redis emptied under it
    time.sleep(0.5)
    client.xadd(stream, entry(2), id="2-1")  # the relay publishes again
    time.sleep(3)
    stop.set()
    thread.join(10)
    assert failure == []


def test_a_malformed_entry_claimed_from_a_slow_live_consumer_is_dead_lettered_once(stream, settings):
    """The module promises "dead-lettered exactly once". A slow consumer A still holds a batch
    with a malformed entry when B claims it (idle past claim_idle_ms); each acknowledges with
    MULTI [XADD dead, XACK], and both XADDs run."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.xadd(stream, entry(1), id="1-1")
    client.xadd(stream, entry(2, payload="{not json"), id="2-1")
    slow = consumer(client, stream, settings.TRAINING_DATA_DIR, "slow")
    slow.ensure_group()
    entries = slow.read_new()  # A holds the batch ...
    claimer = consumer(client, stream, settings.TRAINING_DATA_DIR, "claimer", claim_idle_ms=0)
    _, claimed = claimer.claim()  # ... B claims it meanwhile
    claimer.process(claimed)
    slow.process(entries)  # A finishes
    dead = client.xrange(f"{stream}:dead")
    assert len(dead) == 1


def test_departed_consumers_are_forgotten_and_one_holding_entries_is_kept(stream, settings, monkeypatch):
    from training_export.services import synapse

    client = redis.Redis.from_url(settings.REDIS_URL)
    for number in (1, 2):
        client.xadd(stream, entry(number), id=f"{number}-1")
    alive = consumer(client, stream, settings.TRAINING_DATA_DIR, "alive")
    alive.ensure_group()
    consumer(client, stream, settings.TRAINING_DATA_DIR, "holding").read_new()  # died holding both
    client.xgroup_createconsumer(stream, GROUP, "departed")  # died after acknowledging all it read
    monkeypatch.setattr(synapse, "DEPARTED_IDLE_MS", 0)
    alive.claim_idle_ms = 0

    assert alive.forget_departed() == ["departed"]
    names = {info["name"]: info["pending"] for info in client.xinfo_consumers(stream, GROUP)}
    assert names == {b"holding": 2}

    alive.run(once=True)  # claims the entries, writes them, then forgets the emptied name
    assert [info["name"] for info in client.xinfo_consumers(stream, GROUP)] == []
    assert _written_event_ids(settings.TRAINING_DATA_DIR) == {"ev-1", "ev-2"}


def test_a_deleted_entry_read_from_the_own_pending_list_and_claimed_is_dead_lettered_once(stream, settings):
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.xadd(stream, entry(1), id="1-1")
    first = consumer(client, stream, settings.TRAINING_DATA_DIR, "pod-a")
    first.ensure_group()
    assert [entry_id for entry_id, _ in first.read_new()] == ["1-1"]  # pod-a dies holding it
    client.xdel(stream, "1-1")  # the entry is deleted from the stream (XDEL, XTRIM by an operator)

    restarted = consumer(client, stream, settings.TRAINING_DATA_DIR, "pod-a")  # same --consumer name
    own = restarted.read_pending()
    assert own == [("1-1", {})]  # still in pod-a's pending list, read without fields
    other = consumer(client, stream, settings.TRAINING_DATA_DIR, "pod-b", claim_idle_ms=0)
    _, claimed = other.claim()  # XAUTOCLAIM reports it deleted and drops it from the PEL
    assert claimed == [("1-1", {})]
    other.process(claimed)
    restarted.process(own)  # its XACK finds nothing: the claimer, whom Redis told, dead-lettered it

    dead = client.xrange(f"{stream}:dead")
    assert len(dead) == 1, f"dead-lettered {len(dead)} times"


@pytest.mark.django_db
def test_an_entry_whose_tasks_row_cannot_be_encoded_is_dead_lettered_with_no_row_written(stream, settings, monkeypatch):
    """Every file's rows are encoded before any file is written: the entry that fails alone
    in the bisection has no events row either (it would be in a file and dead-lettered)."""
    from training_export.services import synapse

    task = TaskExecutionFactory(status=TaskExecution.Status.COMPLETED)
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.xadd(stream, entry(1), id="1-1")
    client.xadd(stream, entry(2, event_type="task_completed", entity_id=task.pk), id="2-1")
    client.xadd(stream, entry(3), id="3-1")
    encode_rows = synapse.encode_rows

    def refusing(data_type, rows):  # a tasks row the CSV cannot take
        if any(row["event_id"] == "ev-2" for row in rows):
            raise ValueError("a cell the store refuses")
        return encode_rows(data_type, rows)

    monkeypatch.setattr(synapse, "encode_rows", refusing)
    result = consumer(client, stream, settings.TRAINING_DATA_DIR, "worker-1").run(once=True)

    [(_, dead)] = client.xrange(f"{stream}:dead")
    assert dead[b"original_id"] == b"2-1" and b"a cell the store refuses" in dead[b"reason"]
    assert _written_event_ids(settings.TRAINING_DATA_DIR) == {"ev-1", "ev-3"}
    assert (result.written["events"], result.dead, client.xpending(stream, GROUP)["pending"]) == (2, 1, 0)


def test_a_malformed_entry_with_many_fields_is_dead_lettered(stream, settings):
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.xadd(stream, entry(1), id="1-1")
    wide = {f"f{n}": "x" for n in range(5000)}  # no event_id: malformed ("missing event_id")
    client.xadd(stream, wide, id="2-1")
    client.xadd(stream, entry(3), id="3-1")
    error = None
    try:
        consumer(client, stream, settings.TRAINING_DATA_DIR, "worker-1").run(once=True)
    except Exception as exc:
        error = f"{type(exc).__name__}: {str(exc)[:160]}"
    state = {
        "error": error,
        "pending": client.xpending(stream, GROUP)["pending"],
        "dead_lettered": client.xlen(f"{stream}:dead"),
    }
    assert state == {"error": None, "pending": 0, "dead_lettered": 1}
    [(_, dead)] = client.xrange(f"{stream}:dead")
    assert dead[b"fields_left_out"] == b"4000" and dead[b"original_id"] == b"2-1"


STATE_VALUES = {
    "floats": dict(execution_time_ms=0.1 + 0.2, cost_usd=Decimal("0.000001"), input_tokens=7, output_tokens=5),
    "tiny float": dict(execution_time_ms=1.5e-07, cost_usd=Decimal("0")),
    "integral float": dict(execution_time_ms=1000.0, cost_usd=Decimal("12345678.123456")),
    "microseconds": dict(
        started_at=dt.datetime(2024, 3, 5, 10, 0, 0, 1, tzinfo=dt.UTC),
        completed_at=dt.datetime(2024, 3, 5, 10, 0, 1, tzinfo=dt.UTC),
    ),
    "text": dict(error='a "quoted",\r\nmulti-line\terror \u00e9\u4e2d\U0001f600', retry_count=3),
    "json output": dict(output_data={"b": [1.0, 2.5e-08, 10**20, "x"], "a": {"z": None, "aa": True}, "é": 1e16}),
    "null output": dict(output_data=None, execution_time_ms=None),
}


@pytest.mark.django_db
@pytest.mark.parametrize("values", STATE_VALUES.values(), ids=STATE_VALUES.keys())
def test_a_state_gives_the_csv_line_the_row_gives(values):
    task = TaskExecutionFactory(status=TaskExecution.Status.FAILED, **values)
    state = entity_states(TaskExecution, [task.pk], TASK_STATE_FIELDS)[task.pk]
    event = task_event(task, EventType.TASK_FAILED, payload={"state": state})
    event = with_payload_text(Event.objects.filter(pk=event.pk)).get()  # as the relay reads it
    events, dead = parse_entries([("1-1", event_to_entry(event))])
    assert not dead
    row = database_rows(TaskExecution, _TASK_FIELDS, [task.pk])[task.pk]  # as the consumer reads it
    from_state = {**row, **_state_columns(TaskExecution, _TASK_FIELDS, events[0].payload["state"])}
    schema = SCHEMAS[TASKS]
    assert _encode_rows(schema, [{**from_state, "event_id": "e"}]) == _encode_rows(schema, [{**row, "event_id": "e"}])


def test_a_state_time_out_of_range_in_utc_is_written_as_the_text_it_came_as():
    columns = _state_columns(TaskExecution, _TASK_FIELDS, {"completed_at": "9999-12-31T23:30:00-01:00"})
    assert columns == {"completed_at": "9999-12-31T23:30:00-01:00"}
    row = {"execution_id": "t", "status": "failed", **columns, "event_id": "e"}
    assert _encode_rows(SCHEMAS[TASKS], [row])[0][1].endswith(",9999-12-31T23:30:00-01:00,e\n")


def test_an_entry_reported_deleted_by_a_claim_is_dead_lettered_even_if_the_batch_then_fails(stream, settings):
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.xadd(stream, entry(1), id="1-1")
    client.xadd(stream, entry(2), id="2-1")
    crashed = consumer(client, stream, settings.TRAINING_DATA_DIR, "crashed")
    crashed.ensure_group()
    crashed.read_new()  # died holding both
    client.xdel(stream, "1-1")
    claimer = consumer(client, stream, settings.TRAINING_DATA_DIR, "claimer", claim_idle_ms=0)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    claimer.store.write_encoded = disk_full
    _, claimed = claimer.claim()  # Redis drops 1-1 from the pending list as it reports it
    with pytest.raises(OSError):
        claimer.process(claimed)

    [(_, dead)] = client.xrange(f"{stream}:dead")
    assert dead[b"original_id"] == b"1-1" and b"deleted from the stream" in dead[b"reason"]
    assert client.xpending(stream, GROUP)["pending"] == 1  # 2-1, for the next try


def test_a_departed_consumer_name_that_is_not_utf8_is_forgotten_not_a_crash(stream, settings, monkeypatch):
    from training_export.services import synapse

    client = redis.Redis.from_url(settings.REDIS_URL)
    client.xadd(stream, entry(1), id="1-1")
    alive = consumer(client, stream, settings.TRAINING_DATA_DIR, "alive")
    alive.ensure_group()
    client.xgroup_createconsumer(stream, GROUP, b"gone\xff")
    monkeypatch.setattr(synapse, "DEPARTED_IDLE_MS", 0)
    alive.claim_idle_ms = 0
    assert alive.forget_departed() == ["gone\\xff"]
    assert client.xinfo_consumers(stream, GROUP) == []
