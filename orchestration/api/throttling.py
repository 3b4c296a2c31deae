"""Rate limits per user per 60-second window (seed 004 §5.1), limits per role from settings."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from rest_framework.request import Request
from rest_framework.throttling import BaseThrottle

from orchestration.api.permissions import request_role
from orchestration.api.redis_store import store

WINDOW_SECONDS = 60


def rate_limit_key(user_id: int) -> str:
    return f"rate_limit:{user_id}"


def rate_limit_for(role: str | None) -> int | None:
    return settings.API_RATE_LIMITS.get(role) if role else None


class RoleRateThrottle(BaseThrottle):
    """A fixed window counted atomically in Redis. The count, limit and reset are left on
    the request for the RateLimit-* response headers and `GET /me`."""

    def allow_request(self, request: Request, view: Any) -> bool:
        user = request.user
        limit = rate_limit_for(request_role(request))
        if not getattr(user, "is_authenticated", False) or limit is None:
            return True
        count, reset = store().hit(rate_limit_key(user.pk), WINDOW_SECONDS)
        request._request.rate_limit = {"limit": limit, "remaining": max(limit - count, 0), "reset": reset}
        self._wait = reset
        return count <= limit

    def wait(self) -> float | None:
        return getattr(self, "_wait", None)
