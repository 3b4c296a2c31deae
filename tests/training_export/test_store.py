"""The training data store: daily CSV partitions, one row per event_id per file, durable writes."""

from __future__ import annotations

import csv
import datetime as dt
import errno
import fcntl
import os
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest

from training_export.services.store import (
    StoreError,
    TrainingDataStore,
    partitions_remove,
    store_agent_event,
    store_agent_task,
    store_tool_execution,
    store_workflow_data,
)

EVENTS_HEADER = (
    "event_id,sequence,event_type,entity_type,entity_id,workflow_id,agent_id,session_id,source,severity,"
    "created_at,payload\n"
)
T0 = dt.datetime(2024, 3, 5, 10, 0, tzinfo=dt.UTC)


@pytest.fixture
def data_dir(settings, tmp_path: Path) -> Path:
    settings.TRAINING_DATA_DIR = tmp_path / "training"
    return settings.TRAINING_DATA_DIR


def event_row(event_id: str, created_at: dt.datetime = T0) -> dict[str, object]:
    return {"event_id": event_id, "event_type": "agent_started", "created_at": created_at, "payload": {}}


def event_ids(path: Path) -> list[str]:
    with path.open(newline="") as fh:
        return [row["event_id"] for row in csv.DictReader(fh)]


def test_store_agent_event_appends_the_row_to_the_events_file_of_its_utc_day(data_dir):
    eastern_evening = dt.datetime(2024, 1, 1, 23, 30, tzinfo=dt.timezone(dt.timedelta(hours=-5)))

    path = store_agent_event(
        event_type="agent_started",
        event_id="ev-1",
        sequence=7,
        agent_id="agent-123",
        payload={"model": "llama3:8b", "a": [1, 2]},
        created_at=eastern_evening,
    )

    assert path == data_dir / "events" / "events_2024-01-02.csv"
    assert path.read_text() == (
        EVENTS_HEADER
        + "ev-1,7,agent_started,,,,agent-123,,platform,info,2024-01-02T04:30:00+00:00,"
        + '"{""a"":[1,2],""model"":""llama3:8b""}"\n'
    )


def test_store_agent_task_writes_the_tasks_row(data_dir):
    path = store_agent_task(
        execution_id="ex-1",
        workflow_id="wf-1",
        agent_id="akira-001",
        task_name="summarize",
        task_type="llm",
        status="failed",
        input_data={"text": "hello", "b": None},
        output_data="partial",
        error='boom, "quoted"\nsecond line',
        retry_count=2,
        max_retries=3,
        timeout_seconds=60,
        execution_time_ms=250.5,
        input_tokens=30,
        output_tokens=12,
        tokens_used=42,
        cost_usd=Decimal("0.012500"),
        created_at=T0,
        started_at=T0 + dt.timedelta(seconds=1),
        completed_at=T0 + dt.timedelta(seconds=2, milliseconds=500),
        event_id="ev-9",
        recorded_at=T0 + dt.timedelta(days=1),
    )

    assert path == data_dir / "tasks" / "tasks_2024-03-06.csv"
    assert path.read_text() == (
        "execution_id,workflow_id,agent_id,task_name,task_type,status,input_data,output_data,error,retry_count,"
        "max_retries,timeout_seconds,execution_time_ms,input_tokens,output_tokens,tokens_used,cost_usd,created_at,"
        "started_at,completed_at,event_id\n"
        'ex-1,wf-1,akira-001,summarize,llm,failed,"{""b"":null,""text"":""hello""}","""partial""",'
        '"boom, ""quoted""\nsecond line",2,3,60,250.5,30,12,42,0.012500,2024-03-05T10:00:00+00:00,'
        "2024-03-05T10:00:01+00:00,2024-03-05T10:00:02.500000+00:00,ev-9\n"
    )


def test_store_tool_execution_writes_seed_002s_fields(data_dir):
    path = store_tool_execution(
        execution_id="exec-456",
        agent_id="agent-123",
        tool_name="calculate",
        input_params={"expression": "2+2"},
        output_result={"result": 4},
        execution_time_ms=12.5,
        created_at=T0,
        event_id="ev-2",
        tool_call_id="call_1",
        attempt_number=2,
    )

    assert path == data_dir / "tool_executions" / "tool_executions_2024-03-05.csv"
    assert path.read_text() == (
        "execution_id,attempt_number,agent_id,tool_name,tool_call_id,input_params,output_result,execution_time_ms,"
        "error,created_at,event_id\n"
        'exec-456,2,agent-123,calculate,call_1,"{""expression"":""2+2""}","{""result"":4}",12.5,,'
        "2024-03-05T10:00:00+00:00,ev-2\n"
    )


def test_store_workflow_data_writes_the_workflows_row(data_dir):
    path = store_workflow_data(
        workflow_id="wf-1",
        name="research",
        workflow_type="pipeline",
        status="completed",
        total_steps=3,
        completed_steps=3,
        duration_ms=5250,
        total_tokens_used=420,
        total_cost_usd=Decimal("0.125000"),
        wasted_cost_usd=Decimal("0.025000"),
        created_at=T0,
        started_at=T0,
        completed_at=T0 + dt.timedelta(seconds=5.25),
        event_id="ev-3",
        recorded_at=T0,
    )

    assert path == data_dir / "workflows" / "workflows_2024-03-05.csv"
    assert path.read_text() == (
        "workflow_id,name,workflow_type,status,total_steps,completed_steps,failed_steps,cancelled_steps,error,"
        "duration_ms,total_tokens_used,total_cost_usd,wasted_cost_usd,created_at,started_at,completed_at,event_id\n"
        "wf-1,research,pipeline,completed,3,3,0,0,,5250,420,0.125000,0.025000,2024-03-05T10:00:00+00:00,"
        "2024-03-05T10:00:00+00:00,2024-03-05T10:00:05.250000+00:00,ev-3\n"
    )


def test_an_event_id_already_in_the_file_is_not_written_again_even_by_a_new_process(data_dir):
    store_agent_event(event_type="agent_started", event_id="ev-1", created_at=T0)
    path = store_agent_event(event_type="agent_started", event_id="ev-1", created_at=T0)
    # A fresh store knows nothing yet: it must rebuild the file's event_ids from the file.
    result = TrainingDataStore(data_dir).write_rows("events", T0.date(), [event_row("ev-1"), event_row("ev-2")])

    assert (result.written, result.duplicates) == (1, 1)
    assert event_ids(path) == ["ev-1", "ev-2"]


def test_rows_another_process_appended_are_seen_before_writing(data_dir):
    first, second = TrainingDataStore(data_dir), TrainingDataStore(data_dir)
    first.write_rows("events", T0.date(), [event_row("ev-1")])
    second.write_rows("events", T0.date(), [event_row("ev-2")])

    result = first.write_rows("events", T0.date(), [event_row("ev-2"), event_row("ev-3"), event_row("ev-3")])

    assert (result.written, result.duplicates) == (1, 2)
    assert event_ids(result.path) == ["ev-1", "ev-2", "ev-3"]


def test_the_ids_of_a_file_not_written_for_a_while_are_dropped_and_read_again_when_needed(data_dir, monkeypatch):
    store = TrainingDataStore(data_dir)
    day1, day2 = T0.date(), T0.date() + dt.timedelta(days=1)
    store.write_rows("events", day1, [event_row("ev-1")])
    clock = [1000.0]
    monkeypatch.setattr("training_export.services.store.time.monotonic", lambda: clock[0])
    store.write_rows("events", day1, [event_row("ev-2")])
    clock[0] += store.max_idle_seconds + 1  # day 1 not written since
    store.write_rows("events", day2, [event_row("ev-3")])

    assert list(store._files) == [store.path("events", day2)]  # day 1's ids are no longer held
    late = store.write_rows("events", day1, [event_row("ev-2"), event_row("ev-4")])
    assert (late.written, late.duplicates) == (1, 1)  # read from the file again
    assert event_ids(late.path) == ["ev-1", "ev-2", "ev-4"]


def test_multi_line_fields_are_read_back_as_one_row_when_rebuilding(data_dir):
    path = store_agent_task(
        execution_id="ex-1", agent_id="a", task_name="t", status="failed", error="line 1\nline 2,\n", event_id="ev-1"
    )

    result = TrainingDataStore(data_dir).write_rows(
        "tasks", dt.date.fromisoformat(path.stem.split("_")[1]), [{"event_id": "ev-1", "execution_id": "ex-1"}]
    )

    assert (result.written, result.duplicates) == (0, 1)
    with path.open(newline="") as fh:
        assert [(row["event_id"], row["error"]) for row in csv.DictReader(fh)] == [("ev-1", "line 1\nline 2,\n")]


def test_each_utc_day_has_its_own_file_with_one_header(data_dir):
    for event_id, created_at in [
        ("ev-1", dt.datetime(2024, 1, 1, 23, 59, 59, tzinfo=dt.UTC)),
        ("ev-2", dt.datetime(2024, 1, 2, 0, 0, tzinfo=dt.UTC)),
        ("ev-3", dt.datetime(2024, 1, 1, 20, 0, tzinfo=dt.timezone(dt.timedelta(hours=-5)))),
    ]:
        store_agent_event(event_type="agent_started", event_id=event_id, created_at=created_at)

    day_1 = data_dir / "events" / "events_2024-01-01.csv"
    day_2 = data_dir / "events" / "events_2024-01-02.csv"
    assert sorted((data_dir / "events").iterdir()) == [day_1, day_2]
    assert event_ids(day_1) == ["ev-1"]
    assert event_ids(day_2) == ["ev-2", "ev-3"]
    assert day_2.read_text().count("event_id,sequence") == 1


@pytest.mark.parametrize(
    "torn_tail",
    [
        "ev-2,8,agent_sta",  # cut in an unquoted field
        'ev-2,8,agent_started,,,,,,platform,info,2024-03-05T10:00:00+00:00,"{""a',  # cut in a quoted field
    ],
)
def test_a_torn_last_row_is_cut_off_before_the_next_append(data_dir, torn_tail):
    path = store_agent_event(event_type="agent_started", event_id="ev-1", created_at=T0)
    intact = path.read_text()
    with path.open("a") as fh:
        fh.write(torn_tail)

    TrainingDataStore(data_dir).write_rows("events", T0.date(), [event_row("ev-2")])

    assert path.read_text() == intact + "ev-2,,agent_started,,,,,,,,2024-03-05T10:00:00+00:00,{}\n"


def test_a_torn_header_is_written_again(data_dir):
    path = data_dir / "events" / "events_2024-03-05.csv"
    path.parent.mkdir(parents=True)
    path.write_text("event_id,seq")

    store_agent_event(event_type="agent_started", event_id="ev-1", created_at=T0)

    assert path.read_text().startswith(EVENTS_HEADER)
    assert event_ids(path) == ["ev-1"]


@pytest.mark.parametrize(
    "content",
    [
        "a,b\n1,2\n",  # another schema
        EVENTS_HEADER + "garbage\n" + "ev-1,,agent_started,,,,,,platform,info,2024-03-05T10:00:00+00:00,{}\n",
    ],
)
def test_a_file_the_store_cannot_safely_append_to_is_refused_untouched(data_dir, content):
    path = data_dir / "events" / "events_2024-03-05.csv"
    path.parent.mkdir(parents=True)
    path.write_text(content)

    with pytest.raises(StoreError):
        store_agent_event(event_type="agent_started", event_id="ev-2", created_at=T0)

    assert path.read_text() == content


def test_cells_are_encoded_by_type_and_redacted_except_the_event_id(data_dir):
    store = TrainingDataStore(data_dir)
    result = store.write_rows(
        "tool_executions",
        T0.date(),
        [
            {
                "event_id": "ev-mail@example.org",
                "execution_id": "tool-1",
                "agent_id": "agent-1",
                "tool_name": "mailer",
                "input_params": {"to": "bob@example.org", "city": "Zürich", "b": [1.5, True, None], "a": 2**70},
                "output_result": "sent to bob@example.org",
                "execution_time_ms": 12.5,
                "error": None,
                "created_at": dt.datetime(2024, 3, 5, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=2))),
            }
        ],
    )

    with result.path.open(newline="") as fh:
        (row,) = csv.DictReader(fh)
    assert row == {
        "event_id": "ev-mail@example.org",
        "execution_id": "tool-1",
        "attempt_number": "",
        "agent_id": "agent-1",
        "tool_name": "mailer",
        "tool_call_id": "",
        # Compact, sorted keys, UTF-8; integers beyond 64 bits are kept exactly.
        "input_params": '{"a":1180591620717411303424,"b":[1.5,true,null],"city":"Zürich","to":"[REDACTED]"}',
        "output_result": '"sent to [REDACTED]"',
        "execution_time_ms": "12.5",
        "error": "",
        "created_at": "2024-03-05T10:00:00+00:00",
    }


def test_an_event_id_twice_in_one_batch_is_written_once(data_dir):
    store = TrainingDataStore(data_dir)
    result = store.write_rows("events", T0.date(), [event_row("ev-1"), event_row("ev-2"), event_row("ev-1")])

    assert (result.written, result.duplicates) == (2, 1)
    assert event_ids(result.path) == ["ev-1", "ev-2"]
    again = store.write_rows("events", T0.date(), [event_row("ev-2"), event_row("ev-3")])
    assert (again.written, again.duplicates) == (1, 1)
    assert event_ids(result.path) == ["ev-1", "ev-2", "ev-3"]


def test_naive_datetimes_and_unknown_columns_are_refused_before_any_write(data_dir):
    with pytest.raises(ValueError, match="naive"):
        store_agent_event(event_type="agent_started", event_id="ev-1", created_at=dt.datetime(2024, 1, 1))
    with pytest.raises(ValueError, match="unknown columns"):
        TrainingDataStore(data_dir).write_rows("events", T0.date(), [{**event_row("ev-1"), "colour": "red"}])
    with pytest.raises(ValueError, match="event_id"):
        TrainingDataStore(data_dir).write_rows("events", T0.date(), [{"event_type": "agent_started"}])
    with pytest.raises(ValueError, match="unknown data type"):
        TrainingDataStore(data_dir).write_rows("metrics", T0.date(), [event_row("ev-1")])

    assert not data_dir.exists()


def test_a_lone_surrogate_is_refused_naming_its_row_before_any_write(data_dir):
    """What Python's json parser makes of `"\\ud83d"` (half of an emoji's pair)."""
    with pytest.raises(ValueError, match=r"ev-1.*lone surrogate"):
        store_agent_event(event_type="agent_started", event_id="ev-1", created_at=T0, payload={"text": "\ud83d"})
    with pytest.raises(ValueError, match=r"ev-2.*lone surrogate"):
        store_agent_event(event_type="agent_started", event_id="ev-2", created_at=T0, entity_id="a\udc00")

    assert not data_dir.exists()  # no day's partition without its header
    store_agent_event(event_type="agent_started", event_id="ev-3", created_at=T0)
    assert event_ids(data_dir / "events" / "events_2024-03-05.csv") == ["ev-3"]


@pytest.fixture
def fsynced(monkeypatch) -> list[str]:
    """The paths fsynced from now on."""
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return synced


def test_a_write_is_fsynced_with_the_directories_it_created(data_dir, fsynced):
    path = store_agent_event(event_type="agent_started", event_id="ev-1", created_at=T0)

    assert str(path) in fsynced
    assert str(path.parent) in fsynced  # the new file's directory entry
    assert str(data_dir) in fsynced  # the new events/ directory's entry
    assert str(data_dir.parent) in fsynced  # the new training/ directory's entry

    fsynced.clear()
    store_agent_event(event_type="agent_started", event_id="ev-2", created_at=T0)
    assert fsynced == [str(path)]


def test_rows_found_already_written_are_fsynced_before_they_count_as_written(data_dir, fsynced):
    """A writer that died between its write() and its fsync() left whole rows that only the
    page cache holds. Another process that finds them must not take them for durable: its
    caller acknowledges them as written on return."""
    path = TrainingDataStore(data_dir).path("events", T0.date())
    path.parent.mkdir(parents=True)
    with path.open("w", encoding="utf-8", newline="") as dead_writer:  # never fsynced
        dead_writer.write(EVENTS_HEADER)
        dead_writer.write(f"ev-1,1,agent_started,task,t1,,a,,platform,info,{T0.isoformat()},{{}}\n")
    fsynced.clear()

    result = TrainingDataStore(data_dir).write_rows("events", T0.date(), [event_row("ev-1")])

    assert (result.written, result.duplicates) == (0, 1)
    assert str(path) in fsynced
    assert str(path.parent) in fsynced  # the dead writer created the file: its directory entry too


def test_rows_whose_fsync_failed_are_written_again_by_the_retry(data_dir, monkeypatch):
    """After a reported writeback error Linux marks the pages clean: a second fsync would
    not write them, so the retry must not take the rows it finds in the page cache for
    durable. They are cut off when the fsync fails, and the retry writes them again."""
    store = TrainingDataStore(data_dir)
    path = store.write_rows("events", T0.date(), [event_row("ev-0")]).path
    real_fsync = os.fsync
    failures = [OSError(errno.EIO, "Input/output error")]

    def fsync_failing_once(fd: int) -> None:
        if failures:
            raise failures.pop()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_failing_once)
    with pytest.raises(OSError):
        store.write_rows("events", T0.date(), [event_row("ev-1"), event_row("ev-2")])
    assert event_ids(path) == ["ev-0"]
    result = store.write_rows("events", T0.date(), [event_row("ev-1"), event_row("ev-2")])
    assert (result.written, result.duplicates) == (2, 0)
    assert event_ids(path) == ["ev-0", "ev-1", "ev-2"]


def test_a_failed_write_that_cannot_be_cut_off_is_reported(data_dir, monkeypatch, caplog):
    store = TrainingDataStore(data_dir)
    path = store.write_rows("events", T0.date(), [event_row("ev-0")]).path

    def failing(*args: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    monkeypatch.setattr(os, "ftruncate", failing)
    with caplog.at_level("ERROR", logger="training_export.services.store"), pytest.raises(OSError):
        store.write_rows("events", T0.date(), [event_row("ev-1")])
    assert f"{path}: writing 1 rows failed" in caplog.text
    assert "they stay in the file" in caplog.text


def test_a_batch_of_new_rows_into_a_file_another_writer_created_syncs_its_directory_once(data_dir, fsynced):
    first, second = TrainingDataStore(data_dir), TrainingDataStore(data_dir)
    path = first.write_rows("events", T0.date(), [event_row("ev-1")]).path
    fsynced.clear()
    second.write_rows("events", T0.date(), [event_row("ev-2")])
    assert fsynced == [str(path), str(path.parent)]
    fsynced.clear()
    second.write_rows("events", T0.date(), [event_row("ev-3")])
    second.write_rows("events", T0.date(), [event_row("ev-3")])  # its own row again
    assert fsynced == [str(path), str(path)]


def test_event_cells_are_written_as_the_same_bytes_as_event_rows(tmp_path: Path):
    """The consumer's path (text cells, one batch check) and write_rows agree byte for byte,
    redaction included."""
    from training_export.services.store import EVENT_TEXT_COLUMNS, EventCells, encode_event_cells, json_text

    tricky = ["a,b", 'say "hi"', "two\nlines", "é\u2028", "", "bob@example.org", "sk-abcdefghijklmnopqrstu"]
    rows = []
    for i in range(40):
        texts = {column: tricky[(i + n) % len(tricky)] for n, column in enumerate(EVENT_TEXT_COLUMNS)}
        payload = {"note": tricky[i % len(tricky)], "api_key": "k" if i % 3 == 0 else None, "n": [i, {"x": "\\"}]}
        rows.append({"event_id": f"e{i}", **texts, "created_at": T0, "payload": payload})
    rows.append(dict(rows[0]))  # a duplicate event_id is written once either way
    by_rows = TrainingDataStore(tmp_path / "rows")
    by_cells = TrainingDataStore(tmp_path / "cells")
    day = T0.date()
    by_rows.write_rows("events", day, rows)
    cells = [
        EventCells(
            row["event_id"],
            [row[column] for column in EVENT_TEXT_COLUMNS],
            T0.isoformat(),
            row["payload"],
            json_text(row["payload"]),
        )
        for row in rows
    ]
    result = by_cells.write_encoded("events", day, encode_event_cells(cells))
    assert (result.written, result.duplicates) == (40, 1)
    written = by_cells.path("events", day).read_bytes()
    assert written == by_rows.path("events", day).read_bytes()
    assert b"bob@example.org" not in written and b"abcdefghijklmnopqrstu" not in written


ROW = "ev-{n},{n},agent_started,task,t-{n},wf,agent,,platform,info,2024-03-05T10:00:00+00:00,{payload}\n"
PAYLOAD = '"{""note"":""a, \\""quoted\\"" \\\\ text""}"'


@pytest.mark.parametrize(
    ("tail", "whole_rows"),
    [
        ("".join(ROW.format(n=n, payload=PAYLOAD) for n in range(3)), True),
        (ROW.format(n=1, payload="{}"), True),
        ("", True),
        ('ev-1,1,agent_started,task,"two\nlines",wf,a,,platform,info,2024-03-05T10:00:00+00:00,{}\n', False),
        ('"ev,1",1,agent_started,task,t,wf,a,,platform,info,2024-03-05T10:00:00+00:00,{}\n', False),
        (ROW.format(n=1, payload=PAYLOAD) + "ev-2,2,agent_sta", False),  # torn tail
        (ROW.format(n=1, payload=PAYLOAD) + 'ev-2,2,a,,,,,,,,x,"{""a\n', False),  # torn inside quotes
        (ROW.format(n=1, payload=PAYLOAD).replace("agent_started", "agent_\xe9") + "ev-2,\xff\xfe", False),
        ("ev-9,only,three\n", False),  # too few columns: refused by the csv scan
        (ROW.format(n=1, payload="{}").replace(",t-1,", ',"t\r1",'), True),  # a quoted carriage return
    ],
)
def test_the_one_read_scan_agrees_with_the_csv_scan_or_leaves_it_to_it(tmp_path: Path, tail: str, whole_rows: bool):
    from training_export.services.store import SCHEMAS, _scan_lines, _scan_whole_rows

    path = tmp_path / "events.csv"
    head = EVENTS_HEADER + ROW.format(n=0, payload="{}")
    path.write_bytes((head + tail).encode("utf-8", "surrogateescape").replace(b"\xc3\xbf\xc3\xbe", b"\xff\xfe"))
    size = path.stat().st_size
    schema = SCHEMAS["events"]
    fd = os.open(path, os.O_RDONLY)
    try:
        for start in (0, len(head.encode())):
            fast: set[str] = set()
            end = _scan_whole_rows(fd, start, size, schema, fast)
            assert (end is not None) == whole_rows
            slow: set[str] = set()
            try:
                expected = _scan_lines(path, fd, start, size, schema, slow)
            except StoreError:
                assert not whole_rows
                continue
            if whole_rows:
                assert (end, fast) == (expected, slow)
            else:
                assert fast == set()
    finally:
        os.close(fd)


def test_a_large_catch_up_is_left_to_the_csv_scan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The one read holds the span about three times over (bytes, text, lines): a first look
    at a large file is scanned row by row instead, with the same result."""
    from training_export.services import store

    path = tmp_path / "events.csv"
    head = EVENTS_HEADER + ROW.format(n=0, payload="{}")
    tail = "".join(ROW.format(n=n, payload=PAYLOAD) for n in range(1, 4))
    path.write_text(head + tail)
    size = path.stat().st_size
    start = len(head.encode())
    schema = store.SCHEMAS["events"]
    fd = os.open(path, os.O_RDONLY)
    try:
        monkeypatch.setattr(store, "ONE_READ_MAX_BYTES", size - start)
        assert store._scan_whole_rows(fd, start, size, schema, set()) == size
        monkeypatch.setattr(store, "ONE_READ_MAX_BYTES", size - start - 1)
        seen: set[str] = set()
        assert store._scan_whole_rows(fd, start, size, schema, seen) is None and not seen
        assert store._scan_whole_rows(fd, 0, size, schema, seen) is None and not seen
        assert store._scan(path, fd, 0, size, schema, seen) == size
        assert seen == {"ev-0", "ev-1", "ev-2", "ev-3"}
    finally:
        os.close(fd)


def test_a_carriage_return_is_quoted_so_the_csv_module_reads_the_file_back(tmp_path: Path):
    """The csv writer of Python 3.11 leaves a lone carriage return bare, which the csv reader
    refuses: the store could not catch up on its own file (StoreError on every later write of
    the day once the row-by-row scan runs, as for a file with a multi-line row)."""
    from training_export.services.store import EVENT_TEXT_COLUMNS, EventCells, _csv_line, encode_event_cells, json_text

    assert _csv_line(["a\rb", "c"]) == '"a\rb",c\n'
    store = TrainingDataStore(tmp_path)
    day = T0.date()
    texts = {column: "" for column in EVENT_TEXT_COLUMNS}
    store.write_rows("events", day, [{"event_id": "ev-1", **texts, "entity_id": "50%\r100%", "created_at": T0}])
    cells = [EventCells("ev-2", ["2", "x\r", *[""] * 7], T0.isoformat(), {}, json_text({}))]
    store.write_encoded("events", day, encode_event_cells(cells))
    store.write_rows("events", day, [{"event_id": "ev-3", "entity_id": "two\nlines", "created_at": T0}])
    path = store.path("events", day)
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(row["event_id"], row["entity_id"], row["event_type"]) for row in rows] == [
        ("ev-1", "50%\r100%", ""),
        ("ev-2", "", "x\r"),
        ("ev-3", "two\nlines", ""),
    ]
    # Another process's first look scans the file row by row (it holds a multi-line row).
    assert (
        TrainingDataStore(tmp_path).write_rows("events", day, [{"event_id": "ev-1", "created_at": T0}]).duplicates == 1
    )


def test_a_store_that_keeps_no_ids_reads_each_file_again(data_dir):
    store = TrainingDataStore(data_dir)
    store.max_cached_files = 0
    store.write_rows("events", T0.date(), [event_row("ev-1")])
    again = store.write_rows("events", T0.date(), [event_row("ev-1"), event_row("ev-2")])
    assert (again.written, again.duplicates) == (1, 1)


def test_a_writer_waiting_for_the_lock_of_a_file_removed_meanwhile_writes_to_the_file_now_there(data_dir):
    """Retention removes a day's file (partitions_remove) while a writer of a late row for that
    day waits for its lock: the writer must not append to the removed file and call its row
    written (it was lost: nothing names that file any more)."""
    store = TrainingDataStore(data_dir)
    path = store.write_rows("events", T0.date(), [event_row("ev-1")]).path
    holder = os.open(path, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another writer, in the middle of its append
    results = []
    late = threading.Thread(target=lambda: results.append(store.write_rows("events", T0.date(), [event_row("ev-2")])))
    late.start()
    time.sleep(0.3)
    assert late.is_alive(), "the writer did not wait for the lock"
    assert partitions_remove(data_dir, before=T0.date() + dt.timedelta(days=1)) == [path]
    os.close(holder)  # the lock goes with it
    late.join(10)

    [result] = results
    assert result.written == 1
    assert event_ids(path) == ["ev-2"], "the row acknowledged went to the removed file"
