"""Rate limits against real Redis: a counter per user per 60-second window, limits per
role, answered 429 with Retry-After and a problem body; counting is atomic."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import redis
from django.conf import settings as django_settings
from django.db import connection
from django.test import RequestFactory
from django.test.utils import CaptureQueriesContext

from orchestration.api.redis_store import store
from orchestration.api.throttling import rate_limit_key
from tests.api.conftest import SPEC, make_caller
from tests.fakes.relay import TcpRelay


@pytest.fixture
def low_limits(settings):
    settings.API_RATE_LIMITS = {"admin": 5, "developer": 4, "viewer": 3}


def test_the_limit_follows_the_role_and_the_next_request_is_a_429(callers, low_limits):
    viewer = callers["viewer"].client
    remaining = [viewer.get("/api/v1/me/")["RateLimit-Remaining"] for _ in range(3)]
    assert remaining == ["2", "1", "0"]
    refused = viewer.get("/api/v1/workflows/")
    assert refused.status_code == 429
    assert refused["Content-Type"] == "application/problem+json"
    assert 1 <= int(refused["Retry-After"]) <= 60
    assert refused.json()["title"] == "Too many requests"
    # A developer has a higher limit, and a separate counter.
    developer = callers["developer"].client
    assert [developer.get("/api/v1/me/").status_code for _ in range(5)] == [200, 200, 200, 200, 429]


def test_the_counter_lives_in_redis_with_a_60_second_expiry(callers, low_limits):
    callers["viewer"].client.get("/api/v1/me/")
    client = redis.Redis.from_url(django_settings.REDIS_URL)
    key = rate_limit_key(callers["viewer"].user.pk)
    assert int(client.get(key)) == 1
    assert 55 <= client.ttl(key) <= 60
    client.delete(key)
    body = callers["viewer"].client.get("/api/v1/me/").json()
    assert body["rate_limit"] == {"limit": 3, "remaining": 2, "reset": 60}


def test_a_client_that_waits_its_retry_after_is_not_refused_again(callers, low_limits):
    """Retry-After and RateLimit-Reset are the seconds left in the window rounded up: Redis's
    TTL rounds to the nearest second, so with 1.45 s left they said 1, and a client that waited
    exactly that long was refused again (and told 1 again)."""
    viewer = callers["viewer"].client
    for _ in range(3):
        assert viewer.get("/api/v1/me/").status_code == 200
    _redis().pexpire(rate_limit_key(callers["viewer"].user.pk), 1450)
    refused = viewer.get("/api/v1/me/")
    assert refused.status_code == 429
    assert refused["Retry-After"] == refused["RateLimit-Reset"] == "2"
    time.sleep(int(refused["Retry-After"]))
    assert viewer.get("/api/v1/me/").status_code == 200


def test_counting_is_atomic_under_concurrent_hits(db):
    key = "rate_limit:test-concurrency"
    with ThreadPoolExecutor(max_workers=8) as pool:
        counts = list(pool.map(lambda _: store().hit(key, 60)[0], range(400)))
    assert sorted(counts) == list(range(1, 401))


def test_concurrent_requests_over_http_admit_exactly_the_limit(transactional_db, live_server, settings):
    settings.API_RATE_LIMITS = {"admin": 10, "developer": 10, "viewer": 10}
    caller = make_caller("racer", "viewer")
    headers = {"Authorization": f"Bearer {caller.key}"}

    def call(_: int) -> int:
        return httpx.get(f"{live_server.url}/api/v1/me/", headers=headers, timeout=30).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(call, range(24)))
    assert statuses.count(200) == 10
    assert statuses.count(429) == 14


# --- A list's count, read after its filters are validated (RowListMixin) ------------------


def _redis() -> redis.Redis:
    return redis.Redis.from_url(django_settings.REDIS_URL)


def test_a_list_over_its_limit_is_refused_before_its_page_statement(callers, low_limits):
    viewer = callers["viewer"].client
    listed = [viewer.get("/api/v1/events/") for _ in range(3)]
    assert [r.status_code for r in listed] == [200, 200, 200]
    assert [r["RateLimit-Remaining"] for r in listed] == ["2", "1", "0"]
    with CaptureQueriesContext(connection) as queries:
        refused = viewer.get("/api/v1/events/")
    assert refused.status_code == 429
    assert 1 <= int(refused["Retry-After"]) <= 60
    assert refused["RateLimit-Remaining"] == "0"
    assert not [q["sql"] for q in queries.captured_queries if '"events"' in q["sql"]]


def test_a_list_that_fails_validation_is_counted_and_over_the_limit_answers_429(callers, low_limits):
    viewer = callers["viewer"].client
    invalid = viewer.get("/api/v1/events/?severity=bogus")
    assert invalid.status_code == 400
    assert invalid["RateLimit-Remaining"] == "2"  # counted, and its reply read
    assert viewer.get("/api/v1/workflows/?status=nope").status_code == 400
    assert viewer.get("/api/v1/me/")["RateLimit-Remaining"] == "0"
    # Over the limit, a request that would fail validation is refused as throttled first,
    # as it is when the count is read in the throttle check (GET /me).
    refused = viewer.get("/api/v1/events/?severity=bogus")
    assert refused.status_code == 429
    assert refused.json()["title"] == "Too many requests"
    assert int(_redis().get(rate_limit_key(callers["viewer"].user.pk))) == 4


def test_a_request_its_role_does_not_grant_is_counted_and_says_what_is_left(callers, low_limits):
    """DRF checks permissions before throttles: a refused request was neither counted nor given
    the RateLimit-* headers every other answer has, so a key could be used for nothing but
    refused requests, without limit."""
    viewer = callers["viewer"].client
    refused = viewer.post("/api/v1/workflows/", SPEC, format="json")
    assert refused.status_code == 403
    assert refused["RateLimit-Remaining"] == "2"
    listed = viewer.get("/api/v1/exports/")  # a list, whose count is read after its filters
    assert listed.status_code == 403
    assert listed["RateLimit-Remaining"] == "1"
    assert viewer.get("/api/v1/me/")["RateLimit-Remaining"] == "0"
    over = viewer.post("/api/v1/workflows/", SPEC, format="json")
    assert over.status_code == 429
    assert int(_redis().get(rate_limit_key(callers["viewer"].user.pk))) == 4


def test_a_list_counts_once_after_redis_lost_its_scripts(callers, low_limits):
    viewer = callers["viewer"].client
    assert viewer.get("/api/v1/events/").status_code == 200
    _redis().script_flush()
    listed = viewer.get("/api/v1/events/")
    assert listed.status_code == 200
    assert listed["RateLimit-Remaining"] == "1"
    assert int(_redis().get(rate_limit_key(callers["viewer"].user.pk))) == 2


def test_a_list_counts_once_after_redis_closed_its_connection(callers, low_limits):
    viewer = callers["viewer"].client
    assert viewer.get("/api/v1/events/").status_code == 200
    direct = _redis()
    pooled = store().client.connection_pool._available_connections
    # The API pool's connections by their address, and no other client of the server.
    addresses = [":".join(map(str, c._sock.getsockname())) for c in pooled if c._sock]
    assert addresses
    for address in addresses:
        assert direct.client_kill(address)
    listed = viewer.get("/api/v1/events/")
    assert listed.status_code == 200
    assert listed["RateLimit-Remaining"] == "1"
    assert int(direct.get(rate_limit_key(callers["viewer"].user.pk))) == 2


@pytest.fixture
def redis_relay(settings, low_limits):
    """The API's Redis reached through a TcpRelay that can lose a reply."""
    url = urlsplit(django_settings.REDIS_URL)
    relay = TcpRelay((url.hostname, url.port or 6379))
    settings.REDIS_URL = urlunsplit(url._replace(netloc=f"127.0.0.1:{relay.port}"))
    yield relay
    relay.close()


@pytest.mark.parametrize("path", ["/api/v1/events/", "/api/v1/me/"])
def test_a_count_whose_reply_is_lost_fails_the_request_and_is_not_counted_again(callers, redis_relay, path):
    """Deferred (a list) or not (GET /me), a count that reached Redis and whose reply was
    lost fails the request, once: counting again would spend two of the window's requests."""
    viewer = callers["viewer"].client
    assert viewer.get(path).status_code == 200
    redis_relay.drop_next_reply()
    lost = viewer.get(path)
    assert (lost.status_code, lost["Retry-After"]) == (503, "5")
    assert "Rate limits are counted in Redis, which is not answering" in lost.json()["detail"]
    assert redis_relay.dropped == 1
    assert int(_redis().get(rate_limit_key(callers["viewer"].user.pk))) == 2
    answered = viewer.get(path)
    assert answered.status_code == 200
    assert answered["RateLimit-Remaining"] == "0"
    assert store().client.connection_pool._in_use_connections == set()


@pytest.mark.parametrize("path", ["/api/v1/events/", "/api/v1/me/", "/api/v1/workflows/"])
def test_with_redis_down_a_request_is_a_503_saying_so_not_served_uncounted(callers, settings, path):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    response = callers["developer"].client.get(path)
    assert response.status_code == 503 and response["Retry-After"] == "5"
    assert response["Content-Type"].startswith("application/problem+json")
    assert response.json()["detail"] == "Rate limits are counted in Redis, which is not answering; retry shortly."
    assert "127.0.0.1:1" not in response.content.decode()


def test_a_deferred_count_closed_unread_leaves_its_connection_in_step(db):
    counter = store()
    pending = counter.hit_later("rate_limit:closed-unread", 60)
    pending.close()
    # The pool hands the same connection out again: a reply left unread on it would be
    # taken for this GET's.
    assert counter.client.get("rate_limit:closed-unread") == b"1"
    assert counter.hit_later("rate_limit:closed-unread", 60).result() == (2, 60)
    assert counter.client.connection_pool._in_use_connections == set()


# --- Requests without credentials, or with refused ones: per client address ---------------


@pytest.fixture
def anonymous_limit(settings):
    settings.API_RATE_LIMIT_ANONYMOUS = 3


def test_requests_without_or_with_refused_credentials_are_limited_per_address(callers, anonymous, anonymous_limit):
    """A 401 was never counted: a client without a key, or probing keys, had no limit."""
    answers = [anonymous.get("/api/v1/workflows/") for _ in range(2)]
    anonymous.credentials(HTTP_AUTHORIZATION="Bearer al_abcdefgh_not-a-key")  # same address, same count
    answers.append(anonymous.get("/api/v1/me/"))
    assert [(a.status_code, a["RateLimit-Remaining"]) for a in answers] == [(401, "2"), (401, "1"), (401, "0")]
    assert answers[0]["RateLimit-Limit"] == "3"
    refused = anonymous.post("/api/v1/workflows/", SPEC, format="json")
    assert refused.status_code == 429
    assert refused["Content-Type"] == "application/problem+json"
    assert 1 <= int(refused["Retry-After"]) <= 60 and refused["RateLimit-Remaining"] == "0"
    anonymous.credentials()
    assert anonymous.get("/api/v1/schema/").status_code == 429
    # Another address has its own count; a key that authenticates has its user's.
    assert anonymous.get("/api/v1/me/", REMOTE_ADDR="192.0.2.7").status_code == 401
    assert callers["viewer"].client.get("/api/v1/me/").status_code == 200
    assert int(_redis().get("rate_limit:anonymous:127.0.0.1")) == 5


def test_x_forwarded_for_is_believed_only_from_a_trusted_proxy(db, anonymous, anonymous_limit, settings):
    def spoofed(n: int) -> int:
        return anonymous.get("/api/v1/me/", HTTP_X_FORWARDED_FOR=f"198.51.100.{n}").status_code

    assert [spoofed(n) for n in range(4)] == [401, 401, 401, 429]  # written by the client: ignored
    settings.API_TRUSTED_PROXIES = ["127.0.0.0/8", "10.0.0.2"]
    through_proxies = {"REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_FOR": "1.2.3.4, 203.0.113.9, 10.0.0.2"}
    answers = [anonymous.get("/api/v1/me/", **through_proxies).status_code for _ in range(4)]
    assert answers == [401, 401, 401, 429]
    assert int(_redis().get("rate_limit:anonymous:203.0.113.9")) == 4
    assert spoofed(9) == 401  # from the trusted proxy, a client of its own


def test_without_redis_the_counts_of_addresses_whose_window_ended_are_not_kept(
    db, anonymous, anonymous_limit, settings, monkeypatch
):
    """The single-process store (no REDIS_URL) kept a counter for every client address it ever
    counted, its window long ended: a web process's memory grew with each new address."""
    from orchestration.api import redis_store

    settings.REDIS_URL = None
    clock = [time.monotonic()]
    monkeypatch.setattr(redis_store, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    local = redis_store.store()
    for n in range(1500):
        address = f"198.18.{n // 250}.{n % 250 + 1}"
        assert anonymous.get("/api/v1/me/", REMOTE_ADDR=address).status_code == 401
        clock[0] += 61  # the address's 60-second window ends
    assert len(local._counts) <= 1024  # LocalStore.SWEEP_AT
    # A window not yet ended keeps its count through a sweep.
    assert [anonymous.get("/api/v1/me/", REMOTE_ADDR="198.51.100.1").status_code for _ in range(4)][-1] == 429
    for n in range(2048):
        local.hit(f"rate_limit:sweep-{n}", 60)
    assert local.peek("rate_limit:anonymous:198.51.100.1") == (4, 60)


@pytest.mark.parametrize(
    "meta, expected",
    [
        ({"REMOTE_ADDR": "192.0.2.1", "HTTP_X_FORWARDED_FOR": "203.0.113.9"}, "192.0.2.1"),
        ({"REMOTE_ADDR": "10.0.0.2", "HTTP_X_FORWARDED_FOR": "203.0.113.9"}, "203.0.113.9"),
        ({"REMOTE_ADDR": "10.0.0.2", "HTTP_X_FORWARDED_FOR": "203.0.113.9, junk"}, "10.0.0.2"),
        ({"REMOTE_ADDR": "10.0.0.2", "HTTP_X_FORWARDED_FOR": "10.0.0.3, 10.0.0.2"}, "10.0.0.3"),
        ({"REMOTE_ADDR": "2001:db8:1:2:3:4:5:6"}, "2001:db8:1:2::/64"),
        ({"REMOTE_ADDR": "::ffff:192.0.2.1"}, "192.0.2.1"),
    ],
)
def test_the_client_address_a_request_is_counted_by(settings, meta, expected):
    from orchestration.api.throttling import client_address

    settings.API_TRUSTED_PROXIES = ["10.0.0.2"]
    assert client_address(RequestFactory().get("/api/v1/me/", **meta)) == expected


@pytest.mark.parametrize("proxy", ["::ffff:10.0.0.2", "::ffff:10.0.0.0/120"])
def test_a_trusted_proxy_written_as_an_ipv4_mapped_address_is_trusted(settings, proxy):
    """A peer's IPv4-mapped address (a dual-stack socket's `::ffff:10.0.0.2`) is read as its
    IPv4 one; the same proxy listed that way in API_TRUSTED_PROXIES matched no peer, so its
    clients shared its budget, said nowhere."""
    from orchestration.api.throttling import client_address

    settings.API_TRUSTED_PROXIES = [proxy]
    for peer in ("::ffff:10.0.0.2", "10.0.0.2"):
        request = RequestFactory().get("/api/v1/me/", REMOTE_ADDR=peer, HTTP_X_FORWARDED_FOR="203.0.113.9")
        assert client_address(request) == "203.0.113.9"


def test_an_account_without_a_role_is_counted_with_the_anonymous_budget_of_its_own(callers, anonymous_limit):
    """Every request of a key whose owner has no role is a 403, and none was counted: such a key
    could be used without limit (each request a key lookup and a permission check)."""
    norole = callers["norole"]
    answers = [norole.client.get("/api/v1/workflows/") for _ in range(3)]
    assert [(a.status_code, a["RateLimit-Remaining"]) for a in answers] == [(403, "2"), (403, "1"), (403, "0")]
    assert norole.client.get("/api/v1/me/").status_code == 429
    assert int(_redis().get(rate_limit_key(norole.user.pk))) == 4
    assert callers["viewer"].client.get("/api/v1/me/").status_code == 200  # others keep their own


def test_a_peek_at_a_window_rounds_its_time_left_up_as_a_hit_does(db):
    """The console's sign-in lockout reads a window by `peek`, which read Redis's TTL (rounded to
    the nearest second: 1.45 s left said 1), where a hit's time left is rounded up."""
    key = "rate_limit:peek-rounding"
    backend = store()
    client = redis.Redis.from_url(django_settings.REDIS_URL)
    try:
        client.set(key, 3, px=1450)
        assert backend.peek(key) == (3, 2)
        client.set(key, 3, px=60_000)
        assert backend.peek(key) == (3, 60)
        client.delete(key)
        assert backend.peek(key) == (0, 0)
    finally:
        client.delete(key)
