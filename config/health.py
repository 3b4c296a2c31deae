"""Liveness (`/healthz`) and readiness (`/readyz`) probes.

Liveness touches nothing outside the process, so a slow database never gets a healthy web
process restarted. Readiness runs one small check per dependency (and one that the database
has every migration of the code), all at once, each bounded
on the client's side (a server that accepts connections and never answers is a failed check
after CHECK_TIMEOUT_SECONDS, not a request thread held for good), and answers 503 when any of
them fails. Connection settings are read from django.conf.settings at call time (not from the
Celery app's cached configuration).
"""

from __future__ import annotations

import functools
import math
import selectors
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import orjson
import psycopg
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

CHECK_TIMEOUT_SECONDS = 2.0

Check = Callable[[], dict[str, Any]]


def _database_rows(sql: str) -> list[tuple[Any, ...]]:
    """The rows `sql` answers, on a PostgreSQL connection of its own, opened and answered within
    CHECK_TIMEOUT_SECONDS each. Not Django's connection: a server that stopped answering holds
    a query on it for good (no statement_timeout fires on a server that does not run, and its
    kernel answers the TCP keepalives), and a new one waits DATABASE_CONNECT_TIMEOUT. A query
    the server refuses raises psycopg's error of its SQLSTATE (UndefinedTable, …)."""
    if connection.vendor != "postgresql":
        try:
            with connection.cursor() as cursor:  # SQLite: a local file
                cursor.execute(sql)
                return cursor.fetchall()
        finally:
            connection.close()  # this thread's own, and the thread ends with the request
    params = {**connection.get_connection_params(), "connect_timeout": math.ceil(CHECK_TIMEOUT_SECONDS)}
    conn = psycopg.connect(**params, autocommit=True)
    try:
        pgconn = conn.pgconn
        pgconn.send_query(sql.encode())
        deadline = time.monotonic() + CHECK_TIMEOUT_SECONDS
        # A selector, not select(): a busy process's descriptor may be past 1023, which select()
        # refuses (the database was reported down).
        with selectors.DefaultSelector() as selector:
            selector.register(pgconn.socket, selectors.EVENT_READ)
            while pgconn.is_busy():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    raise TimeoutError(f"PostgreSQL did not answer {sql} within {CHECK_TIMEOUT_SECONDS} s")
                pgconn.consume_input()
        result = pgconn.get_result()
        if result is None or result.status != psycopg.pq.ExecStatus.TUPLES_OK:
            if result is None:
                raise psycopg.OperationalError("no result")
            try:
                error = psycopg.errors.lookup((result.error_field(psycopg.pq.DiagnosticField.SQLSTATE) or b"").decode())
            except KeyError:
                error = psycopg.OperationalError
            raise error(result.error_message.decode(errors="replace").strip())
        return [
            tuple(
                None if value is None else value.decode()
                for value in (result.get_value(row, column) for column in range(result.nfields))
            )
            for row in range(result.ntuples)
        ]
    finally:
        conn.close()


def check_database() -> dict[str, Any]:
    """`SELECT 1` within CHECK_TIMEOUT_SECONDS (_database_rows)."""
    _database_rows("SELECT 1")
    return {}


# Set once a check found every migration applied: this process's code never needs more, and
# a probe then reads nothing. Not set while any is missing: the next probe looks again.
MIGRATIONS_APPLIED = threading.Event()


@functools.cache
def migrations_on_disk() -> dict[tuple[str, str], tuple[tuple[str, str], ...]]:
    """Every migration of this release's code (squashed ones as their squash), with the
    migrations it replaces: the graph `migrate` would apply, read from the files once."""
    from django.db.migrations.loader import MigrationLoader

    loader = MigrationLoader(None, ignore_no_migrations=True)
    return {key: tuple(loader.graph.nodes[key].replaces) for key in loader.graph.nodes}


class MigrationsNotApplied(Exception):
    """Migrations of the code are missing from the database."""


def check_migrations() -> dict[str, Any]:
    """Every migration of the code applied in the database (django_migrations, read as the
    database check reads, within CHECK_TIMEOUT_SECONDS); otherwise an error naming how many
    are not, per app. A web started before `migrate` ran, or while it runs, would fail on the
    columns and tables its code expects."""
    if MIGRATIONS_APPLIED.is_set():
        return {}
    try:
        # SQLite tells a missing table only in its error's message: asked first.
        never_migrated = connection.vendor != "postgresql" and not _database_rows(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'django_migrations'"
        )
        applied = set() if never_migrated else set(_database_rows("SELECT app, name FROM django_migrations"))
    except psycopg.errors.UndefinedTable:  # never migrated
        applied = set()
    missing: dict[str, list[str]] = {}
    for (app, name), replaces in sorted(migrations_on_disk().items()):
        if (app, name) not in applied and not (replaces and set(replaces) <= applied):
            missing.setdefault(app, []).append(name)
    if missing:
        count = sum(len(names) for names in missing.values())
        apps = ", ".join(
            f"{app} ({len(names)}: {', '.join(names) if len(names) <= 3 else f'{names[0]} … {names[-1]}'})"
            for app, names in missing.items()
        )
        raise MigrationsNotApplied(
            f"{count} migration{'s' if count > 1 else ''} not applied: {apps}; run `manage.py migrate`"
        )
    MIGRATIONS_APPLIED.set()
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


CHECKS: dict[str, Check] = {
    "database": check_database,
    "migrations": check_migrations,
    "broker": check_broker,
    "stream": check_stream,
}


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


def _answer(data: dict[str, Any], *, status: int = 200) -> HttpResponse:
    """The probe's JSON, not through the API's renderer (json_response): its masking reads the
    agents table once a minute on this thread's database connection, which would hold a probe,
    liveness too, for as long as PostgreSQL does not answer. Errors went through redact_public."""
    return HttpResponse(orjson.dumps(data), status=status, content_type="application/json")


def _probe(view: Callable[[HttpRequest], HttpResponse]) -> Callable[[HttpRequest], HttpResponse]:
    """Open to anyone (no login, no CSRF), GET/HEAD only, never cached."""
    return login_not_required(csrf_exempt(require_http_methods(["GET", "HEAD"])(never_cache(view))))


@_probe
def healthz(request: HttpRequest) -> HttpResponse:
    """Liveness: the process answers. Touches no database, broker or cache."""
    return _answer({"status": "ok"})


@_probe
def readyz(request: HttpRequest) -> HttpResponse:
    """Readiness: every dependency check passes (200) or at least one fails (503). The checks
    run side by side: the answer takes the slowest one's time, not their sum (compose's
    healthcheck gives up after 5 s)."""
    with ThreadPoolExecutor(max_workers=len(CHECKS), thread_name_prefix="readyz") as pool:
        futures = {name: pool.submit(run_check, check) for name, check in CHECKS.items()}
    results = {name: future.result() for name, future in futures.items()}
    ready = all(result["ok"] for result in results.values())
    return _answer({"status": "ok" if ready else "unavailable", "checks": results}, status=200 if ready else 503)
