"""The Redis client the API uses for rate limits and idempotency locks.

Without REDIS_URL (the embedded first-run setup, one process) an in-process store with the
same semantics stands in; every deployment with Redis configured uses Redis.
"""

from __future__ import annotations

import threading
import time
from functools import lru_cache

import redis
from django.conf import settings

# INCR and, on the first hit of a window, EXPIRE: one atomic step, so concurrent requests
# can neither lose a count nor leave a counter without its expiry.
_COUNT_SCRIPT = """
local count = redis.call('INCR', KEYS[1])
local ttl = redis.call('TTL', KEYS[1])
if ttl < 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {count, ttl}
"""


@lru_cache(maxsize=4)
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


class RedisStore:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._count = client.register_script(_COUNT_SCRIPT)

    def hit(self, key: str, window_seconds: int) -> tuple[int, int]:
        """Count one hit in the window; returns (hits so far, seconds until the window ends)."""
        count, ttl = self._count(keys=[key], args=[window_seconds])
        return int(count), max(int(ttl), 1)

    def peek(self, key: str) -> tuple[int, int]:
        with self.client.pipeline() as pipe:
            count, ttl = pipe.get(key).ttl(key).execute()
        return int(count or 0), max(int(ttl), 0)

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
    """Single-process stand-in (no REDIS_URL): dicts under a lock, same semantics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, tuple[int, float]] = {}
        self._locks: dict[str, tuple[str, float]] = {}

    def hit(self, key: str, window_seconds: int) -> tuple[int, int]:
        now = time.monotonic()
        with self._lock:
            count, expires = self._counts.get(key, (0, now + window_seconds))
            if expires <= now:
                count, expires = 0, now + window_seconds
            self._counts[key] = (count + 1, expires)
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
            return True

    def release(self, key: str, token: str) -> None:
        with self._lock:
            held = self._locks.get(key)
            if held is not None and held[0] == token:
                del self._locks[key]


_local = LocalStore()


def store() -> RedisStore | LocalStore:
    url = settings.REDIS_URL
    if not url:
        return _local
    return _store_for(url)


@lru_cache(maxsize=4)
def _store_for(url: str) -> RedisStore:
    return RedisStore(_client(url))
