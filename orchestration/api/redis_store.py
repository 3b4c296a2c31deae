"""The Redis client the API uses for rate limits and idempotency locks (and the console for
its count of failed sign-ins).

Without REDIS_URL (the embedded first-run setup, one process) an in-process store with the
same semantics stands in; every deployment with Redis configured uses Redis.
"""

from __future__ import annotations

import threading
import time
from functools import lru_cache
from typing import Any, Protocol

import redis
from django.conf import settings
from redis.connection import Connection

# INCR and, on the first hit of a window, EXPIRE: one atomic step, so concurrent requests
# can neither lose a count nor leave a counter without its expiry. The time left is read in
# milliseconds: TTL rounds to the nearest second, and a Retry-After rounded down sends the
# client back before the window ends, to be refused again.
_COUNT_SCRIPT = """
local count = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1]) * 1000
end
return {count, ttl}
"""


@lru_cache(maxsize=4)
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


def _hit_reply(reply: Any) -> tuple[int, int]:
    """(hits so far, seconds until the window ends, rounded up)."""
    count, ttl_ms = reply
    return int(count), max(-(-int(ttl_ms) // 1000), 1)


class Hit(Protocol):
    def result(self) -> tuple[int, int]: ...

    def close(self) -> None: ...


class CountedHit:
    """A hit already counted: its answer at hand."""

    def __init__(self, answer: tuple[int, int]) -> None:
        self.answer = answer

    def result(self) -> tuple[int, int]:
        return self.answer

    def close(self) -> None:
        pass


class PendingHit:
    """A hit sent to Redis whose reply is read later, on the pooled connection it was sent
    on (held until then): the round trip overlaps the caller's own work. `result` reads
    the reply once; `close` reads it if it is still due, so that the connection goes back
    to the pool with nothing left unread, or drops the connection when it cannot.

    Every path must read the reply or drop the connection: redis-py 8 (RESP3, maintenance
    notifications "auto") no longer checks a connection it hands out for unread data, so a
    reply left behind would be taken as the next command's answer."""

    def __init__(self, store: RedisStore, connection: Connection, key: str, window_seconds: int) -> None:
        self.store = store
        self.connection: Connection | None = connection
        self.key = key
        self.window_seconds = window_seconds
        self.answer: tuple[int, int] | None = None

    def result(self) -> tuple[int, int]:
        if self.answer is not None:
            return self.answer
        connection = self._take()
        if connection is None:
            raise RuntimeError("the rate-limit reply was closed unread")
        try:
            reply = connection.read_response()
        except redis.exceptions.NoScriptError:
            # Redis lost its scripts (restart, SCRIPT FLUSH): it ran nothing. The client's
            # script call loads it again.
            self._give_back(connection)
            self.answer = self.store.hit(self.key, self.window_seconds)
        except BaseException:
            # Lost (a timeout, a broken connection) after the count may have reached Redis:
            # failing, as `hit` does (the client retries nothing), rather than counting again.
            self._give_back(connection, broken=True)
            raise
        else:
            self._give_back(connection)
            self.answer = _hit_reply(reply)
        return self.answer

    def close(self) -> None:
        connection = self._take()
        if connection is None:
            return
        try:
            connection.read_response()
        except redis.exceptions.ResponseError:
            self._give_back(connection)  # an error reply: the connection is in step
        except BaseException:
            self._give_back(connection, broken=True)
            raise
        else:
            self._give_back(connection)

    def _take(self) -> Connection | None:
        connection, self.connection = self.connection, None
        return connection

    def _give_back(self, connection: Connection, *, broken: bool = False) -> None:
        if broken:
            connection.disconnect()
        self.store.client.connection_pool.release(connection)


class RedisStore:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._count = client.register_script(_COUNT_SCRIPT)

    def hit(self, key: str, window_seconds: int) -> tuple[int, int]:
        """Count one hit in the window; returns (hits so far, seconds until the window ends)."""
        return _hit_reply(self._count(keys=[key], args=[window_seconds]))

    def hit_later(self, key: str, window_seconds: int) -> Hit:
        """`hit`, with the reply read by the returned object's `result()`: the count is sent
        now and the caller goes on with its own work while Redis answers. The caller must
        call `result()` or `close()` (the connection is held until then)."""
        pool = self.client.connection_pool
        connection = pool.get_connection()
        try:
            connection.send_command("EVALSHA", self._count.sha, 1, key, window_seconds)
        except (redis.ConnectionError, redis.TimeoutError):
            # The command did not reach Redis whole, so it ran nothing: count through the
            # client, on a new connection.
            connection.disconnect()
            pool.release(connection)
            return CountedHit(self.hit(key, window_seconds))
        except BaseException:
            connection.disconnect()
            pool.release(connection)
            raise
        return PendingHit(self, connection, key, window_seconds)

    def peek(self, key: str) -> tuple[int, int]:
        """(hits so far, seconds until the window ends, rounded up, as a hit's are)."""
        with self.client.pipeline() as pipe:
            count, ttl_ms = pipe.get(key).pttl(key).execute()
        return int(count or 0), max(-(-int(ttl_ms) // 1000), 0)

    def acquire(self, key: str, token: str, seconds: int) -> bool:
        return bool(self.client.set(key, token, nx=True, ex=seconds))

    def release(self, key: str, token: str) -> None:
        # Delete only our own lock: it may have expired and been taken by another request.
        self.client.eval(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
            1,
            key,
            token,
        )


class LocalStore:
    """Single-process stand-in (no REDIS_URL): dicts under a lock, same semantics. Expired
    entries are dropped, as Redis expires its keys, whenever an entry would double what the
    last sweep left (at least SWEEP_AT entries): a counter per client address, signed-in user
    or sign-in attempt would otherwise be kept for the life of the process."""

    SWEEP_AT = 1024

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, tuple[int, float]] = {}
        self._locks: dict[str, tuple[str, float]] = {}
        self._sweep_at = {"counts": self.SWEEP_AT, "locks": self.SWEEP_AT}

    def _swept(self, name: str, entries: dict[str, tuple[Any, float]], now: float) -> None:
        """Drop `entries`' expired ones when it has reached its sweep size (under the lock)."""
        if len(entries) < self._sweep_at[name]:
            return
        for key in [key for key, (_, expires) in entries.items() if expires <= now]:
            del entries[key]
        self._sweep_at[name] = max(self.SWEEP_AT, 2 * len(entries))

    def hit_later(self, key: str, window_seconds: int) -> Hit:
        return CountedHit(self.hit(key, window_seconds))

    def hit(self, key: str, window_seconds: int) -> tuple[int, int]:
        now = time.monotonic()
        with self._lock:
            count, expires = self._counts.get(key, (0, now + window_seconds))
            if expires <= now:
                count, expires = 0, now + window_seconds
            self._counts[key] = (count + 1, expires)
            self._swept("counts", self._counts, now)
        return count + 1, max(int(expires - now + 0.999), 1)

    def peek(self, key: str) -> tuple[int, int]:
        now = time.monotonic()
        with self._lock:
            count, expires = self._counts.get(key, (0, now))
        return (count, int(expires - now + 0.999)) if expires > now else (0, 0)

    def acquire(self, key: str, token: str, seconds: int) -> bool:
        now = time.monotonic()
        with self._lock:
            held = self._locks.get(key)
            if held is not None and held[1] > now:
                return False
            self._locks[key] = (token, now + seconds)
            self._swept("locks", self._locks, now)
            return True

    def release(self, key: str, token: str) -> None:
        with self._lock:
            held = self._locks.get(key)
            if held is not None and held[0] == token:
                del self._locks[key]


_local = LocalStore()


def redis_client() -> redis.Redis | None:
    """The API's Redis client (short timeouts, one per process), or None without REDIS_URL."""
    url = settings.REDIS_URL
    return _client(url) if url else None


def store() -> RedisStore | LocalStore:
    url = settings.REDIS_URL
    if not url:
        return _local
    return _store_for(url)


@lru_cache(maxsize=4)
def _store_for(url: str) -> RedisStore:
    return RedisStore(_client(url))
