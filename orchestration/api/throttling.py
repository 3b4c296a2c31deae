"""Rate limits per user per 60-second window (seed 004 §5.1), limits per role from settings.

A view may take the count's reply later than DRF's throttle check (`rate_limit_deferrable`):
the count is sent to Redis then, and the view reads the reply with `rate_limit_settle` before
its first database statement, so that the round trip overlaps the request's own work (a list
validates its filters meanwhile). A request over its limit is still refused before any of its
statements runs, and with a 429 whatever else it would have failed with, as when the count is
read in the throttle check.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from django.conf import settings
from rest_framework.exceptions import Throttled
from rest_framework.request import Request
from rest_framework.throttling import BaseThrottle

from orchestration.api.exceptions import Unavailable
from orchestration.api.permissions import request_role
from orchestration.api.redis_store import Hit, store

logger = logging.getLogger(__name__)

WINDOW_SECONDS = 60
_PENDING = "_rate_limit_pending"  # on the HttpRequest: (the hit, the limit)


class RateLimitStoreDown(Unavailable):
    default_detail = "Rate limits are counted in Redis, which is not answering; retry shortly."
    wait = 5  # Retry-After


@contextmanager
def _store_answering() -> Iterator[None]:
    """A Redis outage is a 503 saying so, not a 500: the request is not served uncounted (the
    limit is a control, not a hint). The error's text names hosts and stays in the log."""
    try:
        yield
    except redis.RedisError:
        logger.warning("rate limit: Redis did not answer", exc_info=True)
        raise RateLimitStoreDown() from None


def rate_limit_key(user_id: int) -> str:
    return f"rate_limit:{user_id}"


def rate_limit_for(role: str | None) -> int | None:
    return settings.API_RATE_LIMITS.get(role) if role else None


def _record(request: Request, limit: int, count: int, reset: int) -> bool:
    """Leave the state on the request for the RateLimit-* headers and `GET /me`."""
    request._request.rate_limit = {"limit": limit, "remaining": max(limit - count, 0), "reset": reset}
    return count <= limit


class RoleRateThrottle(BaseThrottle):
    """A fixed window counted atomically in Redis."""

    def allow_request(self, request: Request, view: Any) -> bool:
        user = request.user
        limit = rate_limit_for(request_role(request))
        if not getattr(user, "is_authenticated", False) or limit is None:
            return True
        key = rate_limit_key(user.pk)
        deferrable = getattr(view, "rate_limit_deferrable", None)
        if deferrable is not None and deferrable():
            rate_limit_close(request)  # a second check of one request must not hold two connections
            with _store_answering():
                setattr(request._request, _PENDING, (store().hit_later(key, WINDOW_SECONDS), limit))
            return True
        with _store_answering():
            count, reset = store().hit(key, WINDOW_SECONDS)
        self._wait = reset
        return _record(request, limit, count, reset)

    def wait(self) -> float | None:
        return getattr(self, "_wait", None)


def _take(request: Request) -> tuple[Hit, int] | None:
    return request._request.__dict__.pop(_PENDING, None)


def rate_limit_settle(request: Request) -> None:
    """Read the request's deferred count, if any: Throttled when it is over the limit."""
    pending = _take(request)
    if pending is None:
        return
    hit, limit = pending
    try:
        with _store_answering():
            count, reset = hit.result()
    finally:
        hit.close()
    if not _record(request, limit, count, reset):
        raise Throttled(wait=reset)


def rate_limit_close(request: Request) -> None:
    """Drop the request's deferred count unread (its connection goes back to the pool)."""
    pending = _take(request)
    if pending is not None:
        pending[0].close()
