"""Liveness (`/healthz`) and readiness (`/readyz`) probes.

Liveness touches nothing outside the process, so a slow database never gets a healthy web
process restarted. Readiness runs one small check per dependency, each bounded by its own
client timeouts, and answers 503 when any of them fails. Connection settings are read from
django.conf.settings at call time (not from the Celery app's cached configuration).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import redis
from django.conf import settings
from django.contrib.auth.decorators import login_not_required
from django.db import connection
from django.http import HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods

from observability.collectors import redis_client
from observability.logs import redact_public
from orchestration.api.errors import json_response

CHECK_TIMEOUT_SECONDS = 2.0

Check = Callable[[], dict[str, Any]]


def check_database() -> dict[str, Any]:
    """`SELECT 1` on Django's default connection."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
    return {}


def check_broker() -> dict[str, Any]:
    """A Redis PING when the broker is Redis, otherwise one bounded kombu connection attempt."""
    url = settings.CELERY_BROKER_URL
    if urlsplit(url).scheme in ("redis", "rediss"):
        client = redis_client(url, timeout_seconds=CHECK_TIMEOUT_SECONDS)
        try:
            client.ping()
        finally:
            client.close()
        return {}
    from config.celery import app

    with app.connection_for_write(
        url=url,
        connect_timeout=CHECK_TIMEOUT_SECONDS,
        transport_options=getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", {}),
    ) as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, timeout=CHECK_TIMEOUT_SECONDS)
    return {}


def check_stream() -> dict[str, Any]:
    """PING the Synapse Redis and describe its stream; a stream not created yet is fine."""
    if not settings.REDIS_URL:
        return {"skipped": "REDIS_URL not set"}
    stream = settings.SYNAPSE_STREAM
    client = redis_client(settings.REDIS_URL, timeout_seconds=CHECK_TIMEOUT_SECONDS)
    try:
        client.ping()
        try:
            info = client.xinfo_stream(stream)
        except redis.ResponseError as exc:
            if "no such key" not in str(exc).lower():
                raise
            return {"stream": stream, "exists": False}
    finally:
        client.close()
    last_id = info["last-generated-id"]
    return {
        "stream": stream,
        "exists": True,
        "length": info["length"],
        "last_id": last_id.decode() if isinstance(last_id, bytes) else last_id,
    }


CHECKS: dict[str, Check] = {"database": check_database, "broker": check_broker, "stream": check_stream}


def run_check(check: Check) -> dict[str, Any]:
    """Run one check: `ok`, `latency_ms`, whatever the check reports, and `error` on failure."""
    started = time.perf_counter()
    try:
        details = check()
    except Exception as exc:  # any failure is a failed check: reported, never raised
        return {
            "ok": False,
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
            "error": redact_public(f"{type(exc).__name__}: {exc}"),
        }
    return {"ok": True, "latency_ms": round((time.perf_counter() - started) * 1000, 3), **details}


def _probe(view: Callable[[HttpRequest], HttpResponse]) -> Callable[[HttpRequest], HttpResponse]:
    """Open to anyone (no login, no CSRF), GET/HEAD only, never cached."""
    return login_not_required(csrf_exempt(require_http_methods(["GET", "HEAD"])(never_cache(view))))


@_probe
def healthz(request: HttpRequest) -> HttpResponse:
    """Liveness: the process answers. Touches no database, broker or cache."""
    return json_response({"status": "ok"})


@_probe
def readyz(request: HttpRequest) -> HttpResponse:
    """Readiness: every dependency check passes (200) or at least one fails (503)."""
    results = {name: run_check(check) for name, check in CHECKS.items()}
    ready = all(result["ok"] for result in results.values())
    return json_response({"status": "ok" if ready else "unavailable", "checks": results}, status=200 if ready else 503)
