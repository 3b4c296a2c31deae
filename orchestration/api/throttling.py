"""Rate limits per user per 60-second window (seed 004 §5.1), limits per role from settings;
requests without credentials, or with refused ones, per client address
(API_RATE_LIMIT_ANONYMOUS).

A view may take the count's reply later than DRF's throttle check (`rate_limit_deferrable`):
the count is sent to Redis then, and the view reads the reply with `rate_limit_settle` before
its first database statement, so that the round trip overlaps the request's own work (a list
validates its filters meanwhile). A request over its limit is still refused before any of its
statements runs, and with a 429 whatever else it would have failed with, as when the count is
read in the throttle check.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import redis
from django.conf import settings
from django.http import HttpRequest
from django.http.response import HttpResponseBase
from rest_framework.exceptions import APIException, Throttled
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


def anonymous_rate_limit_key(address: str) -> str:
    return f"rate_limit:anonymous:{address}"


@lru_cache(maxsize=8)
def _networks(proxies: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(_ipv4_if_mapped(ipaddress.ip_network(proxy, strict=False)) for proxy in proxies)


def _ipv4_if_mapped(
    network: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """`::ffff:10.0.0.0/120` as `10.0.0.0/24`: an address is compared as _address reads it,
    an IPv4-mapped one as IPv4."""
    mapped = network.network_address.ipv4_mapped if isinstance(network, ipaddress.IPv6Network) else None
    if mapped is None or network.prefixlen < 96:
        return network
    return ipaddress.IPv4Network(f"{mapped}/{network.prefixlen - 96}")


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_address(request: HttpRequest) -> str:
    """The address an unauthenticated request is counted by: the peer's, or, when the peer is
    one of API_TRUSTED_PROXIES, the nearest address in X-Forwarded-For that is not a trusted
    proxy (each proxy appends the address it was reached from; what lies further left, the
    client wrote). An IPv6 client is its /64, which one subscriber holds whole."""
    peer = _address(request.META.get("REMOTE_ADDR", ""))
    if peer is None:
        return "unknown"
    networks = _networks(tuple(settings.API_TRUSTED_PROXIES))
    client = peer
    if any(client in network for network in networks):
        forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")
        for hop in reversed(forwarded):
            address = _address(hop)
            if address is None:
                break  # not written by a proxy we trust: the last trusted hop is the client
            client = address
            if not any(address in network for network in networks):
                break
    if isinstance(client, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{client}/64", strict=False))
    return str(client)


def rate_limit_for(role: str | None) -> int | None:
    """A role's budget (None: a role API_RATE_LIMITS leaves unlimited). An account without a
    role, whose every request is refused (403), has the budget of a request without
    credentials: a key is not to be used without limit because its owner was given no role."""
    return settings.API_RATE_LIMITS.get(role) if role else settings.API_RATE_LIMIT_ANONYMOUS


def _record(request: Request, limit: int, count: int, reset: int) -> bool:
    """Leave the state on the request for the RateLimit-* headers and `GET /me`."""
    request._request.rate_limit = {"limit": limit, "remaining": max(limit - count, 0), "reset": reset}
    return count <= limit


class RoleRateThrottle(BaseThrottle):
    """A fixed window counted atomically in Redis."""

    def allow_request(self, request: Request, view: Any) -> bool:
        user = request.user
        authenticated = getattr(user, "is_authenticated", False)
        if not authenticated:
            # Without credentials, or with refused ones (ApiMixin counts a request refused for
            # either before it answers 401): per client address.
            limit = settings.API_RATE_LIMIT_ANONYMOUS
            key = anonymous_rate_limit_key(client_address(request._request))
        else:
            limit = rate_limit_for(request_role(request))
            if limit is None:
                return True
            key = rate_limit_key(user.pk)
        deferrable = getattr(view, "rate_limit_deferrable", None)
        if authenticated and deferrable is not None and deferrable():
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


def rate_limit_headers(request: Request, response: HttpResponseBase) -> None:
    """The RateLimit-* headers of the window the request was counted in, if it was."""
    state = getattr(request._request, "rate_limit", None)
    if state:
        response["RateLimit-Limit"] = str(state["limit"])
        response["RateLimit-Remaining"] = str(state["remaining"])
        response["RateLimit-Reset"] = str(state["reset"])


class RateLimitedMixin:
    """For an API view: a request whose credentials are refused (an unknown or revoked key) is
    counted against its client's address before its 401, as one without any is (keys are not
    to be probed at any rate; over the limit it is a 429), and every answer carries the
    RateLimit-* headers of the window it was counted in."""

    def perform_authentication(self, request: Request) -> None:
        try:
            super().perform_authentication(request)  # type: ignore[misc]
        except APIException:
            self.check_throttles(request)  # type: ignore[attr-defined]
            raise

    def finalize_response(self, request: Request, response: Any, *args: Any, **kwargs: Any) -> Any:
        response = super().finalize_response(request, response, *args, **kwargs)  # type: ignore[misc]
        rate_limit_headers(request, response)
        return response


def rate_limit_close(request: Request) -> None:
    """Drop the request's deferred count unread (its connection goes back to the pool)."""
    pending = _take(request)
    if pending is not None:
        pending[0].close()
