"""The outbox relay: events reach the Synapse stream in order, once, and no late commit
is skipped."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
import redis
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db import connection, transaction

from orchestration.models import Event
from orchestration.services.events import event_record
from orchestration.services.relay import event_to_entry, events_relay, events_to_entries
from tests.engine import ROOT, database_url, output_of, wait_for
from training_export.services import stream_rows

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def stream(settings):
    settings.SYNAPSE_STREAM = f"synapse-test-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(settings.REDIS_URL)
    yield client
    client.delete(settings.SYNAPSE_STREAM, f"{settings.SYNAPSE_STREAM}:relay:gaps")


def entries(client: redis.Redis) -> list[tuple[str, dict[str, str]]]:
    return [
        (entry_id.decode(), {k.decode(): v.decode() for k, v in fields.items()})
        for entry_id, fields in client.xrange(settings.SYNAPSE_STREAM)
    ]


def relay_until_quiet(client: redis.Redis, expect: int = 0) -> int:
    """A fresh stream starts below the table's first sequence: the first pass records that
    hole and proves it empty once the transactions then writing events have ended (in that
    pass or a later one). Another test's writer may still be open, so passes go on, for at most a minute,
    until `expect` events are published; the count returned is all that was published."""
    total = 0
    for _ in range(3):
        total += events_relay(client=client).published
    deadline = time.monotonic() + 60
    while total < expect and time.monotonic() < deadline:
        time.sleep(0.1)
        total += events_relay(client=client).published
    return total


def record(n: int) -> list[Event]:
    return [event_record(event_type="workflow_created", entity_type="workflow", entity_id=f"wf-{i}") for i in range(n)]


def test_events_are_published_in_order_with_their_ids(stream):
    events = record(5)
    assert relay_until_quiet(stream, expect=5) == 5
    published = entries(stream)
    assert [entry_id for entry_id, _ in published] == [f"{e.sequence}-1" for e in events]
    assert [fields["event_id"] for _, fields in published] == [e.event_id for e in events]
    assert published[0][1] == event_to_entry(Event.objects.get(pk=events[0].pk))
    assert relay_until_quiet(stream) == 0, "nothing is published twice"


def test_secrets_in_payloads_are_masked_on_the_stream_and_kept_in_the_database(stream):
    canary = "canary-2b7f0e"
    payload = {"input_params": {"api_key": canary, "query": f"mail {canary}@example.org"}, "tokens_used": 12}
    event = event_record(event_type="tool_executed", entity_type="task", entity_id="t-1", payload=payload)

    relay_until_quiet(stream, expect=1)

    ((_, fields),) = entries(stream)
    assert canary not in str(fields)
    assert json.loads(fields["payload"])["tokens_used"] == 12
    assert Event.objects.get(pk=event.pk).payload == payload


def test_a_batch_masks_its_payloads_as_each_event_alone_would():
    payloads = [
        {"tokens_used": 12, "output": {"text": "nothing secret here"}},
        {"input_params": {"api_key": "k-1", "query": "mail someone@example.org"}},
        {"note": "Bearer abc.def=="},
        {"items": ["sk-" + "a" * 20, 1, None], "refreshToken": {"x": 1}},
        {},
    ]
    events = [
        event_record(event_type="tool_executed", entity_type="task", entity_id=f"t-{i}", payload=payload)
        for i, payload in enumerate(payloads)
    ]
    events = list(Event.objects.filter(pk__in=[e.pk for e in events]).order_by("sequence"))
    batch = events_to_entries(events)
    assert batch == [event_to_entry(event) for event in events]
    assert all(entry[stream_rows.TOOL_LINE] for entry in batch)
    assert "someone@example.org" not in str(batch)


def test_a_relay_that_crashed_mid_batch_resumes_without_gap_or_duplicate(stream):
    events = record(6)
    # a previous relay added the first three entries, then died before anything else
    for event in events[:3]:
        stream.xadd(settings.SYNAPSE_STREAM, event_to_entry(event), id=f"{event.sequence}-1")
    assert events_relay(client=stream).published == 3
    ids = [fields["event_id"] for _, fields in entries(stream)]
    assert ids == [e.event_id for e in events]


def test_two_relays_at_once_publish_each_event_once(stream):
    events = record(50)
    assert relay_until_quiet(stream, expect=50) == 50  # past the initial hole below the first sequence
    more = record(200)
    results = []

    def relay() -> None:
        try:
            results.append(events_relay(client=stream))
        finally:
            connection.close()

    threads = [threading.Thread(target=relay) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [fields["event_id"] for _, fields in entries(stream)]
    assert ids == [e.event_id for e in [*events, *more]]
    assert sum(r.published for r in results) == 200


def _insert_in_open_transaction(started: threading.Event, release: threading.Event, outcome: str, box: list) -> None:
    try:
        with transaction.atomic():
            box.append(record(1)[0].sequence)
            started.set()
            release.wait(20)
            if outcome == "rollback":
                transaction.set_rollback(True)
    finally:
        connection.close()


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_a_late_commit_is_not_skipped_and_a_rollback_does_not_block(stream, outcome):
    record(1)
    assert relay_until_quiet(stream, expect=1) == 1
    started, release, box = threading.Event(), threading.Event(), []
    writer = threading.Thread(target=_insert_in_open_transaction, args=(started, release, outcome, box))
    writer.start()
    started.wait(10)
    later = record(2)  # committed, with sequences above the open transaction's
    assert later[0].sequence > box[0]
    for _ in range(3):
        result = events_relay(client=stream)
        assert result.published == 0, "nothing may pass an open transaction's sequence"
        assert result.waiting_on_gap == (box[0], box[0])
    release.set()
    writer.join()
    published = relay_until_quiet(stream, expect=3 if outcome == "commit" else 2)
    sequences = [int(entry_id.split("-")[0]) for entry_id, _ in entries(stream)]
    if outcome == "commit":
        assert published == 3
        assert sequences[-3:] == [box[0], later[0].sequence, later[1].sequence]
    else:
        assert published == 2
        assert sequences[-2:] == [later[0].sequence, later[1].sequence]
        assert box[0] not in sequences
    # the hole's horizon is forgotten once passed, filled or not
    assert stream.hgetall(f"{settings.SYNAPSE_STREAM}:relay:gaps") == {}


def _earlier_xid_later_sequence(steps: dict[str, threading.Event], box: dict) -> None:
    """Takes its transaction id first, then, once the other writer holds a sequence value,
    inserts its event (a higher sequence) and commits."""
    try:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_current_xact_id()::text::bigint")
                box["early_xid"] = cursor.fetchone()[0]
            steps["early_has_xid"].set()
            steps["late_has_sequence"].wait(20)
            box["committed"] = record(1)[0].sequence
    finally:
        connection.close()
        steps["committed"].set()


def _later_xid_earlier_sequence(steps: dict[str, threading.Event], box: dict) -> None:
    """Takes its transaction id after the other writer's, and a sequence value before it, then
    stays open until released."""
    steps["early_has_xid"].wait(20)
    try:
        with transaction.atomic():
            box["open"] = record(1)[0].sequence
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_current_xact_id()::text::bigint")
                box["late_xid"] = cursor.fetchone()[0]
            steps["late_has_sequence"].set()
            steps["release"].wait(20)
    finally:
        connection.close()


def test_a_late_commit_whose_xid_is_above_every_completed_one_is_not_skipped(stream):
    """The transaction holding the hole took its id after the committed writer took its own:
    with no later id completed yet, it is above the snapshot's xmax (latest completed + 1) and
    in no snapshot's list of running ids, so a proof by transaction ids must not take the
    snapshot's bounds for one. The relay waits for it as for any writer of events."""
    record(1)
    assert relay_until_quiet(stream, expect=1) == 1
    steps = {name: threading.Event() for name in ("early_has_xid", "late_has_sequence", "committed", "release")}
    box: dict = {}
    threads = [
        threading.Thread(target=_earlier_xid_later_sequence, args=(steps, box)),
        threading.Thread(target=_later_xid_earlier_sequence, args=(steps, box)),
    ]
    for thread in threads:
        thread.start()
    try:
        assert steps["committed"].wait(20)
        assert box["late_xid"] > box["early_xid"] and box["open"] < box["committed"]
        for _ in range(3):
            result = events_relay(client=stream)
            assert result.published == 0, "nothing may pass an open transaction's sequence"
            assert result.waiting_on_gap == (box["open"], box["open"])
    finally:
        steps["release"].set()
        for thread in threads:
            thread.join()
    assert relay_until_quiet(stream, expect=2) == 2
    sequences = [int(entry_id.split("-")[0]) for entry_id, _ in entries(stream)]
    assert sequences[-2:] == [box["open"], box["committed"]]


def test_a_hole_met_inside_a_transaction_is_an_error_not_an_old_id(stream):
    event = record(1)[0]
    # the stream's last id two below the event: a one-value hole before it
    stream.xadd(settings.SYNAPSE_STREAM, {"placeholder": "1"}, id=f"{event.sequence - 2}-1")
    stream.xdel(settings.SYNAPSE_STREAM, f"{event.sequence - 2}-1")
    with pytest.raises(RuntimeError, match="outside one"), transaction.atomic():
        events_relay(client=stream)
    result = events_relay(client=stream)  # outside: recorded, then proved (no writer is open)
    assert (result.published, result.waiting_on_gap) == (1, None)


def test_a_rollback_hole_is_proved_past_open_transactions_that_never_wrote_events(stream):
    """Open transactions that hold a transaction id but wrote no event (an idle session in
    another database of the server, a write to another table of this one), a long read of
    events (an export's snapshot) and maintenance of the table (autovacuum's lock) cannot fill
    a hole: the relay must not wait for them. With the snapshot's xmin as the proof, the
    first three stopped the stream until they ended."""
    import psycopg

    record(1)
    assert relay_until_quiet(stream, expect=1) == 1
    params = connection.get_connection_params()
    other_database = psycopg.connect(**{**params, "dbname": "postgres"}, autocommit=False)
    same_database = psycopg.connect(**params, autocommit=False)
    reader = psycopg.connect(**params, autocommit=False)
    maintenance = psycopg.connect(**params, autocommit=False)
    try:
        maintenance.execute("LOCK TABLE events IN SHARE UPDATE EXCLUSIVE MODE")  # as autovacuum takes
        other_database.execute("SELECT pg_current_xact_id()")
        same_database.execute("CREATE TEMPORARY TABLE relay_probe (x int)")
        same_database.execute("INSERT INTO relay_probe VALUES (1)")
        reader.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        reader.execute("SELECT count(*) FROM events").fetchone()
        reader.execute("SELECT pg_current_xact_id()")
        with transaction.atomic():
            rolled_back = record(1)[0].sequence
            transaction.set_rollback(True)
        later = record(1)[0]
        results = [events_relay(client=stream) for _ in range(3)]
    finally:
        for held in (other_database, same_database, reader, maintenance):
            held.rollback()
            held.close()
    # first seen: its writers (none) recorded, and the hole proved in that same pass
    assert (results[0].published, results[0].waiting_on_gap) == (1, None), rolled_back
    assert sum(r.published for r in results) == 1, [r.waiting_on_gap for r in results]
    assert [int(entry_id.split("-")[0]) for entry_id, _ in entries(stream)][-1] == later.sequence


def test_relay_command_names_an_unreachable_stream(settings):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    for command in (["relay_events"], ["synapse_groups"], ["synapse_groups", "--destroy", "old"]):
        with pytest.raises(CommandError, match="cannot reach the Synapse stream: ConnectionError"):
            call_command(*command, stdout=io.StringIO())


@pytest.mark.parametrize("interval", ["-1", "nan", "inf", "soon"])
def test_relay_command_refuses_an_interval_it_cannot_sleep(interval):
    with pytest.raises(CommandError, match="is not a number of seconds"):
        call_command("relay_events", "--follow", "--interval", interval, stdout=io.StringIO())


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_relay_follow_stops_cleanly_on_sigterm_and_sigint(stream, stop):
    record(3)
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": database_url(),
        "REDIS_URL": settings.REDIS_URL,
        "SYNAPSE_STREAM": settings.SYNAPSE_STREAM,
    }
    process = subprocess.Popen(
        # (a minute between polls: the signal ends the wait, the relay does not sleep it out)
        [sys.executable, "manage.py", "relay_events", "--follow", "--interval", "60"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # A shell without job control starts background commands with SIGINT ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        wait_for(lambda: stream.xlen(settings.SYNAPSE_STREAM) == 3, timeout=60, what="the relay to publish")
        process.send_signal(stop)
    finally:
        output = output_of(process, timeout=10)
    assert process.returncode == 0, output
    assert "Traceback" not in output


def test_holes_whose_writers_have_ended_are_passed_in_one_relay_pass(stream):
    """Each rolled-back writer of events leaves a hole for good. A pass that stopped at every
    hole it saw first advanced past one hole per pass (the beat runs one a second): with more
    rollbacks than that (deadlock retries under load), the stream fell behind without bound.
    A hole whose writers have already ended is proved at once, in the same pass."""
    record(1)
    assert relay_until_quiet(stream, expect=1) == 1
    holes, kept = [], []
    for _ in range(5):
        with transaction.atomic():
            holes.append(record(1)[0].sequence)
            transaction.set_rollback(True)
        kept.append(record(1)[0].sequence)
    result = events_relay(client=stream)
    assert (result.published, result.waiting_on_gap) == (5, None)
    sequences = [int(entry_id.split("-")[0]) for entry_id, _ in entries(stream)]
    assert sequences[-5:] == kept and not set(holes) & set(sequences)
    assert stream.hgetall(f"{settings.SYNAPSE_STREAM}:relay:gaps") == {}


@pytest.mark.parametrize("reset", ["deleted", "recreated empty by a consumer group"])
def test_a_stream_reset_during_a_pass_is_published_again_from_its_start(stream, reset):
    """Redis restarted empty (it keeps nothing on disk) or the stream was deleted between two
    batches of one pass. The pass went on from its own position: the events of the batches
    before the reset, which the consumers had not read, were on no stream, and the new stream's
    last id, the relay's checkpoint, said they were published, so no pass published them again
    and they never reached the training files."""
    events = record(1)
    assert relay_until_quiet(stream, expect=1) == 1
    events += record(6)
    reads = []

    def reset_after_the_first_batch(execute, sql, params, many, context):
        if sql.lstrip().startswith("SELECT") and 'FROM "events"' in sql and "ORDER BY" in sql:
            reads.append(sql)
            if len(reads) == 2:  # the pass's first batch is on the stream; it reads the second
                stream.delete(settings.SYNAPSE_STREAM)
                if reset != "deleted":
                    stream.xgroup_create(settings.SYNAPSE_STREAM, "training", id="0", mkstream=True)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(reset_after_the_first_batch):
        result = events_relay(client=stream, batch=3)
    relay_until_quiet(stream)
    assert len(reads) >= 2, "the pass read a second batch"
    published = [fields["event_id"] for _, fields in entries(stream)]
    assert published == [e.event_id for e in events], "every event is on the new stream, once, in order"
    assert result.restarted_from == 0


def test_a_stream_ahead_of_the_database_is_reported_at_every_pass(stream, caplog):
    """PostgreSQL restored from a backup older than the stream: the events it numbers below the
    stream's last id were never published, silently (the lag read 0). The relay says so, and
    deleting the stream, as it advises, publishes them."""
    events = record(2)
    stream.xadd(settings.SYNAPSE_STREAM, {"event_id": "from-before-the-restore"}, id=f"{events[-1].sequence + 50}-1")
    with caplog.at_level("ERROR", logger="orchestration.services.relay"):
        result = events_relay(client=stream)
    assert (result.published, result.stream_ahead) == (0, 50)
    assert "above the newest event in PostgreSQL" in caplog.text and "delete the stream" in caplog.text
    stream.delete(settings.SYNAPSE_STREAM)
    relay_until_quiet(stream, expect=2)
    published = [fields["event_id"] for _, fields in entries(stream)]
    assert published[-2:] == [e.event_id for e in events]
    assert events_relay(client=stream).stream_ahead == 0
