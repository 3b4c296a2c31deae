"""How the JSONL exporter streams: chunks fetched ahead in a thread, decoded and encoded a chunk
at a time, with the same bytes as one record at a time."""

from __future__ import annotations

import datetime as dt
import gc
import json
import random
import re
import threading
import time
import tracemalloc
import zoneinfo
from pathlib import Path

import pytest

from orchestration.event_types import EventType
from tests.factories import AgentFactory, EventFactory, TaskExecutionFactory, WorkflowFactory
from training_export.services import jsonl
from training_export.services.export import export_run
from training_export.services.jsonl import (
    EXPORTERS,
    _may_hold_long_number,
    _utc,
    gc_paused,
    json_line,
    json_load,
    json_load_many,
    prefetched,
    record_line,
)
from training_export.services.redaction import MASK

DAY = dt.date(2024, 3, 5)
T0 = dt.datetime(2024, 3, 5, 10, 0, tzinfo=dt.UTC)


def test_the_long_number_check_finds_every_run_of_19_ascii_digits():
    rng = random.Random(6)
    alphabet = "0123456789" * 3 + '-.e {}[]":,x\u0663\u00e9'
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        assert _may_hold_long_number(text) == bool(re.search(r"[0-9]{19}", text)), text


def test_json_load_many_keeps_integers_beyond_64_bits_exact():
    texts = [
        '{"a": 1, "b": "x"}',
        '{"big": 123456789012345678901234567890, "n": [1, 2]}',
        '{"id": "9999999999999999999999"}',
        "[18446744073709551616]",
        "3",
    ]
    assert json_load_many(texts) == [json.loads(text) for text in texts]
    assert json_load_many(texts)[1]["big"] == 123456789012345678901234567890
    assert json_load_many(texts[:1] + texts[4:]) == [{"a": 1, "b": "x"}, 3]
    assert json_load('{"v": 12345678901234567890123}') == {"v": 12345678901234567890123}


def test_record_line_writes_utc_times_as_isoformat_does():
    rng = random.Random(7)
    berlin = zoneinfo.ZoneInfo("Europe/Berlin")
    for _ in range(2000):
        moment = dt.datetime(
            rng.randint(1, 9999),
            rng.randint(1, 12),
            rng.randint(1, 28),
            rng.randint(0, 23),
            rng.randint(0, 59),
            rng.randint(0, 59),
            rng.choice([0, rng.randint(0, 999_999), rng.randint(1, 9) * 100_000]),
            tzinfo=dt.UTC,
        )
        record = {"at": moment, "n": 1, "s": "é"}
        assert record_line(record | {"at": _utc(moment)}) == json_line(record)
        if 1900 < moment.year < 9000:
            local = moment.astimezone(berlin)
            assert record_line({"at": _utc(local)}) == json_line({"at": moment})
    # Integers beyond 64 bits take the standard library's path, with the same layout.
    big = {"at": _utc(T0), "n": 2**70}
    assert record_line(big) == json_line({"at": T0, "n": 2**70})


def test_prefetched_yields_every_result_in_order_one_call_at_a_time():
    results = [[1, 2], [3], [4, 5, 6], []]
    running = 0
    most = 0
    lock = threading.Lock()

    def fetch():
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.01)
        with lock:
            running -= 1
        return results.pop(0)

    assert list(prefetched(fetch)) == [[1, 2], [3], [4, 5, 6]]
    assert most == 1
    assert results == []


def test_prefetched_raises_what_the_fetch_raised():
    calls = iter([[1], RuntimeError("connection lost")])

    def fetch():
        item = next(calls)
        if isinstance(item, Exception):
            raise item
        return item

    stream = prefetched(fetch)
    assert next(stream) == [1]
    with pytest.raises(RuntimeError, match="connection lost"):
        next(stream)


def test_closing_prefetched_waits_for_the_call_in_flight():
    finished = threading.Event()
    calls = 0

    def fetch():
        nonlocal calls
        calls += 1
        if calls > 1:
            time.sleep(0.05)
            finished.set()
        return [calls]

    stream = prefetched(fetch)
    assert next(stream) == [1]
    stream.close()  # the second call is in flight: the cursor must not be closed under it
    assert finished.is_set()
    assert calls == 2


def test_gc_paused_restores_the_collector_state():
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(ValueError), gc_paused():
        raise ValueError
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def expected_event_line(event) -> bytes:
    """An event's line built the plain way: one record, the standard library's encoder."""
    record = {
        "event_id": event.event_id,
        "sequence": event.sequence,
        "event_type": event.event_type,
        "entity_type": event.entity_type,
        "entity_id": event.entity_id,
        "workflow_id": event.workflow_id,
        "agent_id": event.agent_id,
        "session_id": event.session_id,
        "source": event.source,
        "severity": event.severity,
        "created_at": event.created_at.astimezone(dt.UTC).isoformat(),
        "payload": event.payload,
    }
    return (json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


def test_chunked_export_gives_the_lines_of_each_row_in_order(db, settings, tmp_path: Path, monkeypatch):
    settings.TRAINING_EXPORT_DIR = tmp_path / "exports"
    events = [
        EventFactory(
            event_type=EventType.AGENT_STARTED,
            entity_id=f"e{i}",
            # Whole seconds and fractions: both ways of writing a time.
            created_at=T0 + dt.timedelta(seconds=i, microseconds=(i % 3) * 250_000),
            payload={"i": i, "note": f'row {i} \u00e9 "q" \\', "big": 10**20 + i, "nested": {"list": [i, None]}},
        )
        for i in range(11)
    ]
    secret = EventFactory(
        event_type=EventType.AGENT_STARTED,
        created_at=T0 + dt.timedelta(minutes=5),
        payload={"api_token": "abc", "text": "mail me at someone@example.com"},
    )
    for event in events:
        event.refresh_from_db()

    monkeypatch.setattr(jsonl, "CHUNK_SIZE", 4)
    run = export_run(data_type="events", start_date=DAY, end_date=DAY)
    written = Path(run.path).read_bytes().splitlines(keepends=True)
    assert written[:11] == [expected_event_line(event) for event in events]
    last = json.loads(written[11])
    assert last["event_id"] == secret.event_id
    assert last["payload"] == {"api_token": MASK, "text": f"mail me at {MASK}"}

    monkeypatch.setattr(jsonl, "CHUNK_SIZE", 1000)
    again = export_run(data_type="events", start_date=DAY, end_date=DAY, force=True)
    assert again.checksum == run.checksum
    assert Path(again.path).read_bytes() == b"".join(written)


def test_line_batches_hold_the_lines_of_one_chunk_each(db, monkeypatch):
    for i in range(7):
        EventFactory(event_type=EventType.AGENT_STARTED, created_at=T0 + dt.timedelta(seconds=i), payload={"i": i})
    monkeypatch.setattr(jsonl, "CHUNK_SIZE", 3)
    exporter = EXPORTERS["events"]
    end = T0 + dt.timedelta(hours=1)
    batches = list(exporter.line_batches(T0, end))
    assert [len(batch) for batch in batches] == [3, 3, 1]
    assert [line for batch in batches for line in batch] == list(exporter.lines(T0, end))
    assert [json.loads(line)["payload"]["i"] for batch in batches for line in batch] == list(range(7))


def seed_tasks(day: dt.date, sizes: list[int]) -> None:
    """Finished tasks of the day, one per size, each with an output of that many characters."""
    agent, workflow = AgentFactory(), WorkflowFactory()
    start = dt.datetime.combine(day, dt.time(10), tzinfo=dt.UTC)
    for i, size in enumerate(sizes):
        TaskExecutionFactory(
            agent=agent,
            workflow=workflow,
            status="completed",
            completed_at=start + dt.timedelta(seconds=i),
            output_data={"text": "y" * size},
        )


def traced_peak(export) -> tuple[int, object]:
    tracemalloc.start()
    try:
        result = export()
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


def test_an_export_of_large_outputs_holds_a_bounded_number_of_bytes_at_once(db, out, monkeypatch):
    """Chunks of CHUNK_SIZE rows whatever their size held a whole day of tasks with large
    outputs in memory (100 tasks of 3 MB: 1.2 GB of RSS for a 300 MB file). A chunk holds at
    most CHUNK_BYTES of rows (or one row), small rows before the large ones included, so a day
    of four times the rows takes no more memory."""
    seed_tasks(DAY, [100] * 10 + [500_000] * 48 + [100] * 5)
    exporter = EXPORTERS["tasks"]
    start = dt.datetime.combine(DAY, dt.time(), tzinfo=dt.UTC)
    end = start + dt.timedelta(days=1)
    whole = list(exporter.lines(start, end))
    monkeypatch.setattr(jsonl, "CHUNK_BYTES", 1_100_000)
    batches = list(exporter.line_batches(start, end))
    assert [line for batch in batches for line in batch] == whole
    assert max(sum(map(len, batch)) for batch in batches) < 1_200_000, [len(batch) for batch in batches]
    del whole, batches

    small_day = DAY + dt.timedelta(days=1)
    seed_tasks(small_day, [100] * 10 + [500_000] * 12 + [100] * 5)
    small_peak, small = traced_peak(lambda: export_run(data_type="tasks", start_date=small_day, end_date=small_day))
    peak, run = traced_peak(lambda: export_run(data_type="tasks", start_date=DAY, end_date=DAY))
    assert (small.rows, run.rows) == (27, 63)
    assert run.bytes > 24_000_000
    assert peak < 2 * small_peak, f"{peak:,} bytes at most, {small_peak:,} for a quarter of the rows"


def test_chat_lines_are_written_in_runs_bounded_in_count_and_bytes():
    from training_export.services.export import _bounded_batches

    lines = [b"x" * size + b"\n" for size in (10, 600, 10, 10, 2000, 5)]
    batches = list(_bounded_batches(iter(lines), max_lines=3, max_bytes=1000))
    assert [line for batch in batches for line in batch] == lines
    assert [len(batch) for batch in batches] == [3, 2, 1]  # 3 lines; 2 over 1000 bytes; the rest
    assert list(_bounded_batches(iter([]))) == []
