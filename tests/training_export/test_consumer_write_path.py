"""The Synapse consumer's write path on entries made in memory (no stream): dedupe, order,
bytes clients, deleted entries and the warning about rows made under other settings, whether
the relay made an entry's rows or the consumer builds them."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from training_export.services import stream_rows
from training_export.services import synapse as synapse_module
from training_export.services.store import TrainingDataStore
from training_export.services.synapse import SynapseConsumer, _entries

DAY = dt.date(2024, 3, 5)


def fields_of(event_id, *, event_type="agent_interaction", created="2024-03-05T10:00:00+00:00", payload=None):
    fields = {
        "event_id": event_id,
        "sequence": "1",
        "event_type": event_type,
        "entity_type": "tool" if event_type == "tool_executed" else "agent",
        "entity_id": f"x-{event_id}",
        "workflow_id": "",
        "agent_id": "a-1",
        "session_id": "",
        "source": "test",
        "severity": "info",
        "created_at": created,
    }
    fields.update(stream_rows.entry_fields([fields], [payload or {"n": event_id}])[0])
    return fields


def made(entry_id, event_id, **kw):
    return (entry_id, fields_of(event_id, **kw))


def built(entry_id, event_id, **kw):
    fields = fields_of(event_id, **kw)
    return (entry_id, {k: v for k, v in fields.items() if k not in stream_rows.FIELDS})


def as_bytes(entry):
    entry_id, fields = entry
    return (entry_id, {k.encode(): v.encode() for k, v in fields.items()})


def consumer(directory: Path) -> SynapseConsumer:
    return SynapseConsumer(client=None, store=TrainingDataStore(directory), stream="s", group="g", consumer="c")


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*.csv"))}


def ids_in(directory: Path, data_type: str, day=DAY) -> list[str]:
    lines = (directory / data_type / f"{data_type}_{day.isoformat()}.csv").read_text().splitlines()[1:]
    if data_type == "tool_executions":
        return [line.rsplit(",", 1)[1] for line in lines]
    return [line.split(",", 1)[0] for line in lines]


pytestmark = pytest.mark.django_db


@pytest.mark.parametrize("way", [made, built])
def test_duplicates_within_a_batch(tmp_path, way):
    entries = [way("1-1", "e1"), way("1-2", "e2"), way("1-3", "e1")]
    result = consumer(tmp_path).write(entries).result
    assert ids_in(tmp_path, "events") == ["e1", "e2"]
    assert result.written["events"] == 2 and result.duplicates == 1


@pytest.mark.parametrize("way", [made, built])
def test_duplicates_of_ids_already_in_the_file(tmp_path, way):
    c = consumer(tmp_path)
    c.write([way("1-1", "e1"), way("1-2", "e2")])
    result = c.write([way("2-1", "e3"), way("2-2", "e2"), way("2-3", "e4")]).result
    assert ids_in(tmp_path, "events") == ["e1", "e2", "e3", "e4"]
    assert result.written["events"] == 2 and result.duplicates == 1
    # another process (another store) sharing the file
    result = consumer(tmp_path).write([way("3-1", "e4"), way("3-2", "e5")]).result
    assert ids_in(tmp_path, "events") == ["e1", "e2", "e3", "e4", "e5"]
    assert result.written["events"] == 1 and result.duplicates == 1


def test_mixed_batches_are_in_stream_order_and_the_same_bytes(tmp_path):
    kinds = []
    for i in range(12):
        day = 5 + i % 2
        kw = {"created": f"2024-03-0{day}T1{i % 10}:00:00+00:00"}
        if i % 3 == 0:
            kw.update(event_type="tool_executed", payload={"tool_name": "t", "execution_id": f"x{i}"})
        kinds.append((f"1-{i}", f"e{i:02d}", kw))
    mixed = [(made if i % 2 else built)(eid, ev, **kw) for i, (eid, ev, kw) in enumerate(kinds)]
    all_built = [built(eid, ev, **kw) for eid, ev, kw in kinds]
    all_made = [made(eid, ev, **kw) for eid, ev, kw in kinds]
    r1 = consumer(tmp_path / "mixed").write(mixed).result
    r2 = consumer(tmp_path / "built").write(all_built).result
    r3 = consumer(tmp_path / "made").write(all_made).result
    assert tree(tmp_path / "mixed") == tree(tmp_path / "built") == tree(tmp_path / "made")
    assert r1.written == r2.written == r3.written
    assert r3.relay_made == 12 and r1.relay_made == 6


def test_a_day_without_tool_rows_gets_no_tool_file(tmp_path):
    consumer(tmp_path).write([made("1-1", "e1")])
    assert sorted(tree(tmp_path)) == ["events/events_2024-03-05.csv"]


def test_bytes_client_entries(tmp_path):
    entries = [made("1-1", "e1"), made("1-2", "e2", event_type="tool_executed", payload={"tool_name": "t"})]
    r1 = consumer(tmp_path / "b").write([as_bytes(e) for e in entries]).result
    r2 = consumer(tmp_path / "s").write(entries).result
    assert tree(tmp_path / "b") == tree(tmp_path / "s")
    assert r1.relay_made == r2.relay_made == 2


def test_bytes_client_entries_after_a_deleted_one(tmp_path):
    entries = [("1-0", {}), made("1-1", "e1"), made("1-2", "e2")]
    r1 = consumer(tmp_path / "b").write([entries[0]] + [as_bytes(e) for e in entries[1:]])
    r2 = consumer(tmp_path / "s").write(entries)
    assert tree(tmp_path / "b") == tree(tmp_path / "s")
    assert len(r1.dead) == len(r2.dead) == 1
    assert r1.result.relay_made == r2.result.relay_made == 2, "a deleted first entry hides the client's kind"


def test_entries_shortcut_with_deleted_entries():
    a, b = made("1-1", "e1"), made("1-2", "e2")
    assert _entries([["s", [a, ("1-3", {}), b]]]) == [a, ("1-3", {}), b]
    assert _entries([["s", [("1-3", {}), a]]]) == [("1-3", {}), a]
    assert _entries([["s", [a, ("1-3", None)]]]) == [a, ("1-3", {})]
    assert _entries([["s", [a, (None, None)]]]) == [a]
    assert _entries([["s", [(b"1-4", {b"a": b"b"})]]]) == [("1-4", {b"a": b"b"})]
    assert _entries([["s", []]]) == []
    assert _entries(None) == []


def test_the_warning_about_foreign_formats_stops_after_a_few(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(synapse_module, "_FORMATS_SEEN", set())
    entries = [made(f"1-{n}", f"e{n}") for n in range(20)]
    for n, (_, fields) in enumerate(entries):
        fields["csv_format"] = f"{n:02d}" * 100
    result = consumer(tmp_path).write(entries)
    assert result.result.relay_made == 0 and result.result.written["events"] == 20
    warnings = [r for r in caplog.records if "made under other settings" in r.getMessage()]
    assert len(warnings) == synapse_module._FORMATS_WARNED
    assert all(len(seen) == 40 for seen in synapse_module._FORMATS_SEEN)


def test_foreign_format_warned_once(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(synapse_module, "_FORMATS_SEEN", set())
    e1, e2 = made("1-1", "e1"), made("1-2", "e2")
    e1[1]["csv_format"] = e2[1]["csv_format"] = "f" * 32
    consumer(tmp_path).write([e1, e2])
    consumer(tmp_path).write([made("1-3", "e3")])
    warnings = [r for r in caplog.records if "made under other settings" in r.getMessage()]
    assert len(warnings) == 1


def test_terminal_events_mixed_ways_in_stream_order(tmp_path):
    from orchestration.event_types import EventType
    from orchestration.services.events import task_event, workflow_event
    from orchestration.services.relay import events_to_entries
    from tests.factories import EventFactory
    from tests.training_export.test_synapse_consumer import T0, finished_workflow

    workflow, done, failed = finished_workflow()
    events = [
        task_event(failed, EventType.TASK_FAILED, payload={"error": "x"}),
        EventFactory(created_at=T0 + dt.timedelta(days=1)),
        workflow_event(workflow, EventType.WORKFLOW_FAILED, payload={"failed_steps": 1}),
        task_event(done, EventType.TASK_COMPLETED),
        task_event(done, EventType.TASK_STARTED),
        task_event(done, EventType.TASK_COMPLETED),
    ]
    entries = [(f"1-{i}", e) for i, e in enumerate(events_to_entries(events))]

    def strip(entry):
        return (entry[0], {k: v for k, v in entry[1].items() if k not in stream_rows.FIELDS})

    ways = {
        "made": entries,
        "built": [strip(e) for e in entries],
        "mixed1": [e if i % 2 else strip(e) for i, e in enumerate(entries)],
        "mixed2": [strip(e) if i % 2 else e for i, e in enumerate(entries)],
    }
    results = {name: consumer(tmp_path / name).write(batch).result for name, batch in ways.items()}
    trees = {name: tree(tmp_path / name) for name in ways}
    assert trees["made"] == trees["built"] == trees["mixed1"] == trees["mixed2"]
    assert len({str(sorted(r.written.items())) for r in results.values()}) == 1
    assert results["made"].written["tasks"] == 3


def test_duplicates_across_ways_within_a_batch_and_in_the_file(tmp_path):
    c = consumer(tmp_path)
    c.write([made("1-1", "e1", event_type="tool_executed", payload={"tool_name": "t"})])
    batch = [
        built("2-1", "e2", event_type="tool_executed", payload={"tool_name": "t"}),
        made("2-2", "e1", event_type="tool_executed", payload={"tool_name": "t"}),
        made("2-3", "e2", event_type="tool_executed", payload={"tool_name": "t"}),
        built("2-4", "e3"),
        made("2-5", "e3"),
        made("2-6", "e4"),
    ]
    result = c.write(batch).result
    assert ids_in(tmp_path, "events") == ["e1", "e2", "e3", "e4"]
    assert ids_in(tmp_path, "tool_executions") == ["e1", "e2"]
    assert result.written == {"events": 3, "tool_executions": 1}
    assert result.duplicates == 5
