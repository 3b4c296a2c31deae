"""The relay trims the Synapse stream only below what every consumer group has acknowledged."""

from __future__ import annotations

import uuid

import pytest
import redis

from orchestration.services.relay import stream_trim


@pytest.fixture
def client(settings):
    connection = redis.Redis.from_url(settings.REDIS_URL)
    stream = f"synapse-trim-{uuid.uuid4().hex[:8]}"
    for sequence in range(1, 11):
        connection.xadd(stream, {"n": str(sequence)}, id=f"{sequence}-1")
    connection.stream = stream
    yield connection
    connection.delete(stream)
    connection.close()


def ids(client) -> list[int]:
    return [int(entry_id.split(b"-")[0]) for entry_id, _ in client.xrange(client.stream)]


def test_without_a_group_nothing_is_trimmed(client):
    assert stream_trim(client=client, stream=client.stream) == 0
    assert ids(client) == list(range(1, 11))


def test_entries_pending_or_undelivered_in_any_group_are_kept(client):
    client.xgroup_create(client.stream, "fast", id="0")
    client.xgroup_create(client.stream, "slow", id="0")
    fast = client.xreadgroup("fast", "c1", {client.stream: ">"}, count=10)[0][1]
    client.xack(client.stream, "fast", *[entry_id for entry_id, _ in fast])
    slow = client.xreadgroup("slow", "c1", {client.stream: ">"}, count=6)[0][1]
    client.xack(client.stream, "slow", *[entry_id for entry_id, _ in slow[:3]] + [slow[4][0]])

    assert stream_trim(client=client, stream=client.stream, approximate=False) == 3
    assert ids(client) == list(range(4, 11))


def test_fully_acknowledged_entries_are_trimmed_exactly_below_the_next_undelivered(client):
    client.xgroup_create(client.stream, "g", id="0")
    read = client.xreadgroup("g", "c1", {client.stream: ">"}, count=7)[0][1]
    client.xack(client.stream, "g", *[entry_id for entry_id, _ in read])
    assert stream_trim(client=client, stream=client.stream, approximate=False) == 7
    assert ids(client) == [8, 9, 10]


def test_a_stream_over_the_limit_is_reported_even_without_a_group(client, settings, caplog):
    settings.SYNAPSE_STREAM_MAXLEN = 5
    with caplog.at_level("WARNING", logger="orchestration.services.relay"):
        assert stream_trim(client=client, stream=client.stream) == 0
    assert "holds 10 entries (SYNAPSE_STREAM_MAXLEN=5) that no consumer group has read yet" in caplog.text
    assert ids(client) == list(range(1, 11))


def test_an_abandoned_group_is_named_as_holding_the_stream_and_can_be_removed(client, settings, caplog):
    import io

    from django.core.management import CommandError, call_command

    settings.SYNAPSE_STREAM = client.stream
    settings.SYNAPSE_STREAM_MAXLEN = 5
    client.xgroup_create(client.stream, "training", id="0")
    read = client.xreadgroup("training", "c1", {client.stream: ">"}, count=10)[0][1]
    client.xack(client.stream, "training", *[entry_id for entry_id, _ in read])
    client.xgroup_create(client.stream, "tried-once", id="0")  # an operator's test group, never read again
    client.xreadgroup("tried-once", "c9", {client.stream: ">"}, count=2)

    with caplog.at_level("WARNING", logger="orchestration.services.relay"):
        assert stream_trim(client=client, stream=client.stream, approximate=False) == 0
    assert "the consumer group 'tried-once' still needs" in caplog.text
    out = io.StringIO()
    call_command("synapse_groups", stdout=out)
    lines = out.getvalue().splitlines()
    assert lines[0] == f"stream '{client.stream}': 10 entries (SYNAPSE_STREAM_MAXLEN=5)"
    assert lines[2].split() == ["tried-once", "1", "2", "8", "1-1", "<-", "holds", "the", "stream"]
    assert lines[3].split() == ["training", "1", "0", "0", "10-2"]

    with pytest.raises(CommandError, match="has no consumer group 'tried-one' \\(its groups: training, tried-once\\)"):
        call_command("synapse_groups", "--destroy", "tried-one")
    out = io.StringIO()
    call_command("synapse_groups", "--destroy", "tried-once", stdout=out)
    assert "removed the consumer group 'tried-once'" in out.getvalue() and "2 pending entries dropped" in out.getvalue()
    assert stream_trim(client=client, stream=client.stream, approximate=False) == 10


def test_a_group_name_that_is_not_utf8_is_trimmed_around_listed_and_removable(client, settings):
    import io

    from django.core.management import call_command

    settings.SYNAPSE_STREAM = client.stream
    client.xgroup_create(client.stream, b"g\xff", id="0")
    read = client.xreadgroup(b"g\xff", "c1", {client.stream: ">"}, count=2)[0][1]
    client.xack(client.stream, b"g\xff", *[entry_id for entry_id, _ in read])

    assert stream_trim(client=client, stream=client.stream, approximate=False) == 2
    out = io.StringIO()
    call_command("synapse_groups", stdout=out)
    assert out.getvalue().splitlines()[2].split() == ["g\\xff", "1", "0", "8", "2-2"]
    call_command("synapse_groups", "--destroy", "g\\xff", stdout=io.StringIO())
    assert client.xinfo_groups(client.stream) == []


def test_groups_that_are_all_caught_up_hold_nothing(client, settings):
    import io

    from django.core.management import call_command

    settings.SYNAPSE_STREAM = client.stream
    for group in ("a", "b"):
        client.xgroup_create(client.stream, group, id="$")
    out = io.StringIO()
    call_command("synapse_groups", stdout=out)
    assert "holds the stream" not in out.getvalue()


def test_removing_a_group_whose_shown_name_two_groups_share_is_refused(client, settings):
    from django.core.management import CommandError, call_command

    settings.SYNAPSE_STREAM = client.stream
    client.xgroup_create(client.stream, b"g\xff", id="0")
    client.xgroup_create(client.stream, b"g\\xff", id="0")  # a backslash, then "xff"
    with pytest.raises(CommandError, match=r"2 consumer groups of .* show as 'g\\\\xff'"):
        call_command("synapse_groups", "--destroy", "g\\xff")
    assert len(client.xinfo_groups(client.stream)) == 2


def test_the_groups_report_names_the_dead_letters(client, settings):
    """Entries the consumer could not write live only in the dead-letter stream: the operator's
    report of the stream says how many there are (nothing when there are none)."""
    import io

    from django.core.management import call_command

    settings.SYNAPSE_STREAM = client.stream
    client.xgroup_create(client.stream, "training", id="0")
    out = io.StringIO()
    call_command("synapse_groups", stdout=out)
    assert "dead letters" not in out.getvalue()
    client.xadd(f"{client.stream}:dead", {"reason": "not JSON", "original_id": "3-1"})
    try:
        out = io.StringIO()
        call_command("synapse_groups", stdout=out)
        assert (
            out.getvalue()
            .splitlines()[-1]
            .startswith(f"dead letters '{client.stream}:dead': 1 entry no consumer could write to the training files")
        )
    finally:
        client.delete(f"{client.stream}:dead")
