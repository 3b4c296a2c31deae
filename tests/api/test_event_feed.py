"""Following the events log over REST without missing one: `settled=true` ends pages at the
relay's position on the Synapse stream, below which no transaction can still commit, and
`after=` resumes from the last sequence read. Real PostgreSQL transactions and Redis."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest
import redis
from django.db import connection, transaction

from orchestration.models import Event
from orchestration.services.events import event_record
from orchestration.services.relay import events_relay
from tests.api.conftest import Caller, make_caller


@pytest.fixture
def stream(settings) -> Iterator[redis.Redis]:
    settings.SYNAPSE_STREAM = f"synapse-feed-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(settings.REDIS_URL)
    yield client
    client.delete(settings.SYNAPSE_STREAM, f"{settings.SYNAPSE_STREAM}:relay:gaps")


@pytest.fixture
def admin(transactional_db: None) -> Caller:
    # Committed rows: the relay proves sequence holes (a test rolled back leaves some) only
    # outside a transaction.
    return make_caller("alice", "admin")


def relay(client: redis.Redis) -> None:
    """Relay passes until one publishes nothing (earlier tests' events may come first)."""
    while events_relay(client=client).published:
        pass


def last_sequence() -> int:
    """Where a follower starts: past the events the fixtures wrote (the API key's)."""
    return Event.objects.order_by("-sequence").values_list("sequence", flat=True).first() or 0


def record(n: int) -> list[Event]:
    return [event_record(event_type="workflow_created", entity_type="workflow", entity_id=f"w-{i}") for i in range(n)]


def follow(caller: Caller, after: int) -> list[int]:
    """One poll of a follower: every settled event after `after`, through every page."""
    url = f"/api/v1/events/?settled=true&ordering=sequence&after={after}&limit=2"
    seen = []
    while url:
        page = caller.client.get(url)
        assert page.status_code == 200, page.content
        seen += [event["sequence"] for event in page.json()["results"]]
        url = page.json()["next"]
    return seen


def test_settled_pages_end_at_the_relays_position(admin, stream):
    start = last_sequence()
    published = record(3)
    relay(stream)
    pending = record(2)  # committed, not yet on the stream

    assert follow(admin, start) == [e.sequence for e in published]
    everything = admin.client.get(f"/api/v1/events/?ordering=sequence&after={start}").json()["results"]
    assert [e["sequence"] for e in everything] == [e.sequence for e in [*published, *pending]]
    relay(stream)
    assert follow(admin, published[-1].sequence) == [e.sequence for e in pending]


def test_a_follower_misses_no_event_whose_transaction_commits_late(admin, stream):
    """Without settled=true the follower reads past the open transaction's sequence and, polling
    on from its last sequence, never sees that event once it commits."""
    start = last_sequence()
    first = record(1)
    relay(stream)
    started, release, late = threading.Event(), threading.Event(), []

    def writer() -> None:
        try:
            with transaction.atomic():
                late.append(record(1)[0].sequence)
                started.set()
                release.wait(20)
        finally:
            connection.close()

    thread = threading.Thread(target=writer)
    thread.start()
    assert started.wait(10)
    after_it = record(2)  # committed above the open transaction's sequence
    relay(stream)  # stops at the hole

    seen = follow(admin, start)
    assert seen == [first[0].sequence]
    unsettled = admin.client.get(f"/api/v1/events/?ordering=sequence&after={first[0].sequence}").json()
    assert [e["sequence"] for e in unsettled["results"]] == [e.sequence for e in after_it]  # the trap

    release.set()
    thread.join()
    relay(stream)
    seen += follow(admin, seen[-1])
    assert seen == sorted([first[0].sequence, late[0], *(e.sequence for e in after_it)])


def test_settled_without_a_reachable_stream_is_a_503_naming_why(admin, settings):
    settings.API_RATE_LIMITS = {}  # the rate limit counts in the same Redis
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    response = admin.client.get("/api/v1/events/?settled=true")
    assert response.status_code == 503
    assert response["Content-Type"].startswith("application/problem+json")
    assert "relay's position on the Synapse stream, which is unknown" in response.json()["detail"]
    assert response["Retry-After"] == "5"
    assert "127.0.0.1" not in response.content.decode(), "no host names in the answer"
    settings.REDIS_URL = None
    response = admin.client.get("/api/v1/events/?settled=true")
    assert response.status_code == 503 and "REDIS_URL is not set" in response.json()["detail"]


@pytest.mark.parametrize("value", ["latest", "1.5", "-3"])
def test_after_must_be_a_whole_number_of_0_or_more(admin, value):
    response = admin.client.get(f"/api/v1/events/?after={value}")
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == "after"


@pytest.mark.parametrize("value", ["yes", "on", "2"])
def test_settled_takes_true_or_false_only(admin, value):
    """A value the filter would read as "unset" answered unsettled pages: the follower it
    exists for would miss events without a word."""
    response = admin.client.get(f"/api/v1/events/?settled={value}")
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == "settled"
