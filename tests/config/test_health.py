"""Liveness and readiness probes: /healthz touches nothing, /readyz checks the database, the
broker and the Synapse stream against the real services (or a port where nothing listens)."""

from __future__ import annotations

import json
import os
import resource
import secrets
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from django.conf import settings
from django.db import connection
from django.test import Client

from config import health
from observability.logs import redact_public
from tests.engine import manage, sqlite_manage
from tests.pg import database_migrated_to

ROOT = Path(__file__).resolve().parents[2]
PROBE_EXEMPTIONS = [r"^healthz$", r"^readyz$", r"^metrics$"]


@pytest.fixture
def dead_port() -> int:
    """A local port where nothing listens: bound by the OS, noted, then released."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A local port that accepts TCP connections (the kernel completes the handshake) and never
    answers: a hung broker."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


@pytest.fixture
def stream_name(settings) -> Iterator[str]:
    """A Synapse stream name of this test's own, deleted afterwards."""
    settings.SYNAPSE_STREAM = f"health-test-{uuid.uuid4().hex[:8]}"
    yield settings.SYNAPSE_STREAM
    redis.Redis.from_url(settings.REDIS_URL).delete(settings.SYNAPSE_STREAM)


def readyz(client: Client) -> tuple[int, dict, float]:
    """Status, body and seconds taken. Each check gives up after 2 s; one without a bound would
    hold the probe for good (a silent broker) or through kombu's retries: the tests' 30 s bound
    tells those apart with a margin no pause of a loaded machine comes near."""
    started = time.monotonic()
    response = client.get("/readyz")
    elapsed = time.monotonic() - started
    assert response["Content-Type"] == "application/json"
    assert "no-store" in response["Cache-Control"]
    return response.status_code, response.json(), elapsed


def test_healthz_answers_ok_without_touching_database_or_broker(client, settings, dead_port):
    # No `db` fixture: pytest-django raises on any database access, so a query here fails the test.
    settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{dead_port}/0"
    settings.REDIS_URL = f"redis://127.0.0.1:{dead_port}/0"
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert "no-store" in response["Cache-Control"]


def test_readyz_reports_every_check_ok_with_latencies(client, db, stream_name):
    status, body, _ = readyz(client)
    assert status == 200, body
    assert body["status"] == "ok"
    assert set(body["checks"]) == {"database", "migrations", "broker", "stream"}
    for name, check in body["checks"].items():
        assert check["ok"] is True, name
        assert isinstance(check["latency_ms"], float), name
        assert check["latency_ms"] >= 0, name
        assert "error" not in check, name


def test_database_check_answers_on_a_descriptor_past_select_s_limit(db):
    # A web process with a thousand files and sockets open (a raised ulimit, as in containers):
    # the probe's connection gets a descriptor past 1023, which select() refuses ("filedescriptor
    # out of range"): the database was reported down, and the replica taken out of service.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"the hard limit on open files ({hard}) keeps every descriptor under select()'s")
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))
    held = []
    try:
        while not held or held[-1] < 1100:
            held.append(os.open(os.devnull, os.O_RDONLY))
        result = health.run_check(health.check_database)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert result["ok"] is True, result


def test_readyz_describes_an_existing_stream(client, db, stream_name):
    stream = redis.Redis.from_url(settings.REDIS_URL)
    stream.xadd(stream_name, {"n": "1"}, id="4-1")
    stream.xadd(stream_name, {"n": "2"}, id="5-1")
    status, body, _ = readyz(client)
    assert status == 200, body
    assert body["checks"]["stream"] == {
        "ok": True,
        "latency_ms": body["checks"]["stream"]["latency_ms"],
        "stream": stream_name,
        "exists": True,
        "length": 2,
        "last_id": "5-1",
    }


def test_readyz_accepts_a_stream_not_created_yet(client, db, stream_name):
    status, body, _ = readyz(client)
    assert status == 200, body
    assert body["checks"]["stream"]["exists"] is False
    assert body["checks"]["stream"]["stream"] == stream_name


def test_readyz_is_503_naming_the_broker_when_it_refuses_connections(client, db, settings, dead_port, stream_name):
    # Only Django settings change: the check reads them at call time.
    settings.CELERY_BROKER_URL = f"redis://:s3cret-pw@127.0.0.1:{dead_port}/0"
    status, body, elapsed = readyz(client)
    assert status == 503, body
    assert body["status"] == "unavailable"
    broker = body["checks"]["broker"]
    assert broker["ok"] is False
    assert "refused" in broker["error"].lower()
    assert str(dead_port) in broker["error"]
    assert isinstance(broker["latency_ms"], float)
    assert body["checks"]["database"]["ok"] is True
    assert body["checks"]["stream"]["ok"] is True
    assert elapsed < 30
    assert "s3cret-pw" not in client.get("/readyz").content.decode()


def test_readyz_gives_up_on_a_broker_that_never_answers(client, db, settings, silent_port, stream_name):
    settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{silent_port}/0"
    status, body, elapsed = readyz(client)
    assert status == 503, body
    assert body["checks"]["broker"]["ok"] is False
    assert "timeout" in body["checks"]["broker"]["error"].lower()
    assert body["checks"]["stream"]["ok"] is True
    assert elapsed < 30


@pytest.mark.parametrize("connected_before", [True, False], ids=["connection-in-use", "new-connection"])
def test_readyz_answers_within_its_bound_when_postgresql_stops_answering(
    client, database_relay, monkeypatch, stream_name, connected_before
):
    # A PostgreSQL that accepts connections and never answers (stopped, frozen): the probe is
    # 503 within a few seconds, whether the server stopped under a connection already open (no
    # statement_timeout fires, and its kernel answers the keepalives: Django's connection waits
    # for good) or before one is made (which would wait the whole connect_timeout, longer here).
    monkeypatch.setitem(connection.settings_dict["OPTIONS"], "connect_timeout", 20)
    if connected_before:
        status, body, _ = readyz(client)
        assert status == 200, body
    database_relay.pause()
    watchdog = threading.Timer(30, database_relay.resume)  # a probe that hung answers after it
    watchdog.start()
    try:
        status, body, elapsed = readyz(client)
    finally:
        watchdog.cancel()
    assert status == 503, body
    assert body["checks"]["database"]["ok"] is False
    assert body["checks"]["broker"]["ok"] is True
    assert elapsed < 10


def test_healthz_answers_at_once_when_postgresql_stops_answering(client, database_relay, settings):
    # Liveness touches no database, not even to mask secrets in its answer: the API's renderer
    # reads the agents table once a minute (here at each settings change) on the thread's
    # connection, which a stopped server holds for good.
    settings.LOG_REDACT_ENV = []
    assert client.get("/healthz").status_code == 200
    database_relay.pause()
    settings.LOG_REDACT_ENV = ["NOT_SET_ANYWHERE"]
    watchdog = threading.Timer(30, database_relay.resume)
    watchdog.start()
    try:
        started = time.monotonic()
        response = client.get("/healthz")
        elapsed = time.monotonic() - started
    finally:
        watchdog.cancel()
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert elapsed < 10


def test_readyz_is_503_naming_a_non_redis_broker_that_refuses_connections(client, db, settings, dead_port):
    settings.CELERY_BROKER_URL = f"amqp://guest:s3cret-pw@127.0.0.1:{dead_port}//"
    status, body, elapsed = readyz(client)
    assert status == 503, body
    assert body["checks"]["broker"]["ok"] is False
    assert "s3cret-pw" not in body["checks"]["broker"]["error"]
    assert body["checks"]["database"]["ok"] is True
    assert elapsed < 30


def test_readyz_is_503_naming_the_stream_when_redis_is_unreachable(client, db, settings, dead_port):
    settings.REDIS_URL = f"redis://127.0.0.1:{dead_port}/0"
    status, body, elapsed = readyz(client)
    assert status == 503, body
    assert body["checks"]["stream"]["ok"] is False
    assert "refused" in body["checks"]["stream"]["error"].lower()
    assert body["checks"]["broker"]["ok"] is True
    assert elapsed < 30


def test_readyz_skips_the_stream_in_embedded_mode_with_the_filesystem_broker(client, db, settings, tmp_path):
    folder = tmp_path / "broker"
    folder.mkdir()
    settings.REDIS_URL = None
    settings.CELERY_BROKER_URL = "filesystem://localhost/"
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {"data_folder_in": str(folder), "data_folder_out": str(folder)}
    status, body, _ = readyz(client)
    assert status == 200, body
    assert body["checks"]["broker"]["ok"] is True
    assert body["checks"]["stream"]["ok"] is True
    assert body["checks"]["stream"]["skipped"] == "REDIS_URL not set"


def test_errors_are_reported_without_credentials(settings):
    settings.REDIS_URL = "redis://:configured-pw@redis.internal:6379/0"
    message = redact_public("cannot reach amqp://user:url-pw@mq:5672// (auth configured-pw rejected)")
    assert "url-pw" not in message
    assert "configured-pw" not in message
    assert "amqp://***@mq:5672//" in message


def test_readyz_errors_mask_every_secret_the_logs_mask_and_more(client, db, settings, monkeypatch, stream_name):
    # Besides the URL credentials and the Redis/broker passwords masked before: the settings'
    # secrets, the database password, the variables LOG_REDACT_ENV names, bearer tokens and
    # API-key patterns, as in the logs; and, unlike the logs, user names in URLs and
    # configured URL passwords shorter than the logs' minimum.
    settings.SECRET_KEY = "django-secret-value-0123456789"
    settings.INFLUXDB_TOKEN = "influx-token-value-42"
    settings.INFLUXDB_URL = "https://metrics:influx-url-pw@influx.internal:8086"
    settings.LOG_REDACT_ENV = ["EXTRA_SERVICE_PASSWORD"]
    monkeypatch.setenv("EXTRA_SERVICE_PASSWORD", "hunter2-extra-pw")
    monkeypatch.setitem(settings.DATABASES["default"], "PASSWORD", "database-pw-77")  # trust auth ignores it
    settings.CELERY_BROKER_URL = "redis://:pw5@127.0.0.1:6379/0"
    leaks = [
        "django-secret-value-0123456789",
        "influx-token-value-42",
        "influx-url-pw",
        "hunter2-extra-pw",
        "database-pw-77",
        "abcdefghijklmnop",
        "sk-proj-abcdefghijklmnopqrstu",
        "pw5",
        "opsuser",
    ]

    def failing() -> dict:
        raise RuntimeError(
            "cannot reach https://opsuser@influx.internal with django-secret-value-0123456789 influx-token-value-42 "
            "influx-url-pw hunter2-extra-pw database-pw-77 Authorization: Bearer abcdefghijklmnop "
            "sk-proj-abcdefghijklmnopqrstu auth pw5"
        )

    monkeypatch.setitem(health.CHECKS, "failing", failing)
    status, body, _ = readyz(client)
    assert status == 503
    error = body["checks"]["failing"]["error"]
    assert error.startswith("RuntimeError: cannot reach https://***@influx.internal with ***")
    assert [leak for leak in leaks if leak in error] == []


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_probes_refuse_other_methods_without_asking_for_csrf(path):
    client = Client(enforce_csrf_checks=True)
    for method in (client.post, client.put, client.delete):
        response = method(path)
        assert response.status_code == 405, (method, response.status_code)  # 403 would mean CSRF applied


def test_healthz_answers_head(client):
    assert client.head("/healthz").status_code == 200


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_probes_need_no_login_under_login_required_middleware(client, db, settings, path, stream_name):
    settings.MIDDLEWARE = [*settings.MIDDLEWARE, "django.contrib.auth.middleware.LoginRequiredMiddleware"]
    assert client.get("/admin/").status_code == 302  # the middleware is active
    assert client.get(path).status_code == 200


def test_proposed_redirect_exemption_keeps_probes_on_plain_http(client, db, settings, stream_name):
    settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_REDIRECT_EXEMPT = PROBE_EXEMPTIONS
    assert client.get("/admin/").status_code == 301  # everything else is redirected to https
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200


@pytest.mark.subprocess
def test_production_settings_serve_probes_on_plain_http():
    code = (
        "from django.test import Client; c = Client(HTTP_HOST='ops.example.com'); "
        "print(c.get('/healthz').status_code, c.get('/readyz').status_code)"
    )
    env = {
        **{k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"},
        "DJANGO_SETTINGS_MODULE": "config.settings.production",
        "SECRET_KEY": secrets.token_urlsafe(64),
        "ALLOWED_HOSTS": "ops.example.com",
        "DATABASE_URL": os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/agentledger"),
        "REDIS_URL": settings.REDIS_URL,
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    healthz_status, readyz_status = result.stdout.split()[-2:]
    assert healthz_status == "200"
    assert readyz_status in {"200", "503"}  # a dependency may be down; what matters is no 301 to https


@pytest.mark.subprocess
def test_readyz_is_503_naming_unapplied_migrations_until_migrate_has_run(client, db, monkeypatch, stream_name):
    # A release started before `migrate` ran (or while it runs): the database answers, but the
    # web would fail on the columns and tables it expects; a load balancer must not send it
    # traffic. The "all applied" outcome is kept for the process: a probe then queries nothing.
    monkeypatch.setattr(health, "MIGRATIONS_APPLIED", threading.Event(), raising=False)
    later = sorted(p.stem for p in (ROOT / "orchestration" / "migrations").glob("00*.py") if p.stem[:4] > "0041")
    with database_migrated_to("orchestration", "0041") as (url, env), monkeypatch.context() as web:
        web.setitem(connection.settings_dict, "NAME", url.rsplit("/", 1)[1])  # the probe's database
        for _ in range(2):  # not applied is no outcome to keep: each probe looks again
            status, body, elapsed = readyz(client)
            assert status == 503, body
            migrations = body["checks"]["migrations"]
            assert migrations["ok"] is False
            assert "not applied" in migrations["error"]
            assert f"orchestration ({len(later)}: 0042_messages_idempotency_key" in migrations["error"]
            assert "training_export (" in migrations["error"]
            assert body["checks"]["database"]["ok"] is True
            assert elapsed < 10

        manage("migrate", "--no-input", env=env)
        status, body, _ = readyz(client)
        assert status == 200, body
        assert body["checks"]["migrations"]["ok"] is True

        with psycopg.connect(url, autocommit=True) as other:
            other.execute("DELETE FROM django_migrations WHERE app = 'orchestration' AND name LIKE '0043%'")
        status, body, _ = readyz(client)
        assert status == 200, body  # kept: the migrations table was not read again


@pytest.mark.subprocess
def test_readyz_names_the_migrations_to_apply_on_a_never_migrated_sqlite_file(tmp_path):
    # The embedded first run (SQLite) started before `migrate`: SQLite tells a missing
    # django_migrations only in an OperationalError's message, which the check passed on
    # instead of the migrations to apply.
    code = (
        "import json; from django.test import Client; "
        "response = Client(HTTP_HOST='localhost').get('/readyz'); "
        "print(response.status_code, json.dumps(response.json()['checks']['migrations']))"
    )
    status, migrations = sqlite_manage(tmp_path, "shell", "-c", code).stdout.strip().splitlines()[-1].split(" ", 1)
    assert status == "503"
    error = json.loads(migrations)["error"]
    assert error.startswith("MigrationsNotApplied: "), error
    assert "orchestration (" in error and "run `manage.py migrate`" in error
