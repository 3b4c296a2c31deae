"""Settings come from the environment through one helper and fail loudly on bad values."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from config.env import Env

ROOT = Path(__file__).resolve().parents[2]


def run_manage(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "DJANGO_SETTINGS_MODULE"}}
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def production_env(**overrides: str) -> dict[str, str]:
    env = {
        "DJANGO_SETTINGS_MODULE": "config.settings.production",
        "SECRET_KEY": secrets.token_urlsafe(64),
        "ALLOWED_HOSTS": "ops.example.com",
        "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/agentledger",
        "REDIS_URL": "redis://127.0.0.1:6379/0",
    }
    env.update(overrides)
    return env


class TestEnvHelper:
    def test_bool_accepts_the_usual_spellings(self):
        env = Env({"A": "yes", "B": "OFF", "C": " 1 "})
        assert (env.bool("A", False), env.bool("B", True), env.bool("C", False)) == (True, False, True)

    def test_bool_rejects_anything_else_naming_the_variable(self):
        with pytest.raises(ImproperlyConfigured, match=r"DEBUG='maybe' is not a boolean"):
            Env({"DEBUG": "maybe"}).bool("DEBUG", False)

    def test_int_rejects_non_integers_and_out_of_range(self):
        with pytest.raises(ImproperlyConfigured, match=r"DATABASE_CONN_MAX_AGE='sixty' is not an integer"):
            Env({"DATABASE_CONN_MAX_AGE": "sixty"}).int("DATABASE_CONN_MAX_AGE", 60)
        with pytest.raises(ImproperlyConfigured, match=r"X=-1 is below the minimum of 0"):
            Env({"X": "-1"}).int("X", 1, minimum=0)

    def test_empty_value_means_unset(self):
        assert Env({"X": "  "}).str("X", "fallback") == "fallback"

    def test_required_value_missing_is_named(self):
        with pytest.raises(ImproperlyConfigured, match="SECRET_KEY must be set"):
            Env({}).str("SECRET_KEY", required=True)

    def test_choice_lists_the_allowed_values(self):
        with pytest.raises(ImproperlyConfigured, match="LOG_LEVEL='LOUD' is not one of: DEBUG, ERROR"):
            Env({"LOG_LEVEL": "LOUD"}).choice("LOG_LEVEL", "INFO", {"DEBUG", "INFO", "ERROR"})

    def test_list_splits_on_commas(self):
        assert Env({"H": "a.example, b.example,,"}).list("H") == ["a.example", "b.example"]

    def test_origin_list_reads_bare_hosts_as_https_on_443_and_origins_as_written(self):
        from config.env import Origin, origin_parse

        value = "Gateway.Example.com., http://vllm.internal:8000, https://gw.example:8443/, HTTP://[0:0::1]:8000, ::1"
        entries = Env({"H": value}).origin_list("H")
        assert [origin_parse(entry) for entry in entries] == [
            Origin("https", "gateway.example.com", 443),
            Origin("http", "vllm.internal", 8000),
            Origin("https", "gw.example", 8443),
            Origin("http", "::1", 8000),
            Origin("https", "::1", 443),
        ]

    @pytest.mark.parametrize(
        ("entry", "shown", "problem"),
        [
            ("http://vllm.internal:8000/v1", "http://vllm.internal:8000/v1", "has a path"),
            ("https://gw.example?token=hunter2-secret", "https://gw.example?***", "has a query"),
            ("https://user:hunter2-secret@gw.example", "https://***@gw.example", "has userinfo"),
            ("user:hunter2-secret@gw.example", "***@gw.example", "has userinfo"),
            ("ftp://gw.example", "ftp://gw.example", "has the scheme ftp://; only http:// and https://"),
            ("gw.example:8443", "gw.example:8443", "has a port but no scheme: write http://HOST:PORT"),
            ("http://gw.example:99999", "http://gw.example:99999", "has a port that is not a number"),
            ("http://[::1", "http://[::1", "is not a host name or an origin"),
            ("http://::1:8000", "http://::1:8000", "has more than one ':' (an IPv6 address is written in brackets"),
            ("gw example", "gw example", "has a host that is not a host name or an IP address"),
            ("http://", "http://", "has no host"),
        ],
    )
    def test_origin_list_names_the_entry_and_its_fault_without_its_secrets(self, entry, shown, problem):
        with pytest.raises(ImproperlyConfigured) as info:
            Env({"AGENT_API_KEY_HOSTS": f"gw.example,{entry}"}).origin_list("AGENT_API_KEY_HOSTS")
        assert str(info.value).startswith(f"AGENT_API_KEY_HOSTS: {shown!r} {problem}"), str(info.value)
        assert "hunter2-secret" not in str(info.value)


@pytest.mark.subprocess
class TestSettingsModules:
    def test_production_passes_check_deploy_without_warnings(self):
        result = run_manage("check", "--deploy", "--fail-level", "WARNING", **production_env())
        assert result.returncode == 0, result.stdout + result.stderr
        assert "System check identified no issues" in result.stdout

    def test_production_refuses_to_start_without_secret_key(self):
        env = production_env()
        env.pop("SECRET_KEY")
        result = run_manage("check", **env)
        assert result.returncode != 0
        assert "SECRET_KEY must be set" in result.stderr

    def test_production_refuses_a_short_secret_key(self):
        result = run_manage("check", **production_env(SECRET_KEY="short"))
        assert result.returncode != 0
        assert "at least 50 characters" in result.stderr

    def test_production_refuses_a_long_secret_key_of_few_characters(self):
        result = run_manage("check", **production_env(SECRET_KEY="ab" * 30))
        assert result.returncode != 0
        assert "at least 50 characters (5 or more of them distinct)" in result.stderr

    def test_production_refuses_sqlite(self):
        result = run_manage("check", **production_env(DATABASE_URL="sqlite:////tmp/x.sqlite3"))
        assert result.returncode != 0
        assert "Production runs on PostgreSQL" in result.stderr

    def test_production_refuses_to_run_without_redis(self):
        # Without it: a filesystem broker under each container's own VAR_DIR (web's messages
        # never reach a worker), rate limits per process and no Synapse stream.
        result = run_manage("check", **production_env(REDIS_URL=""))  # empty is unset
        assert result.returncode != 0
        assert "REDIS_URL must be set in production" in result.stderr

    def test_production_refuses_the_filesystem_broker(self):
        result = run_manage("check", **production_env(CELERY_BROKER_URL="filesystem://localhost/"))
        assert result.returncode != 0
        assert "CELERY_BROKER_URL names the filesystem transport" in result.stderr

    def test_unsupported_database_url_is_named(self):
        result = run_manage("check", DATABASE_URL="mysql://root@127.0.0.1/x")
        assert result.returncode != 0
        assert "DATABASE_URL names an unsupported database" in result.stderr

    def test_bad_boolean_stops_the_process(self):
        result = run_manage("check", DEBUG="perhaps")
        assert result.returncode != 0
        assert "DEBUG='perhaps' is not a boolean" in result.stderr

    def test_a_bad_setting_stops_a_command_in_one_line_unless_traceback_is_asked_for(self):
        """The README says an operator's mistake is one line on stderr and exit status 1, never a
        traceback; a malformed variable was a 30-line traceback ending in the message."""
        result = run_manage("check", DEBUG="perhaps")
        assert result.returncode == 1
        assert result.stderr.strip() == (
            "ImproperlyConfigured: DEBUG='perhaps' is not a boolean (use one of: true, false, 1, 0, yes, no, on, off)"
        )
        result = run_manage("check", "--traceback", DEBUG="perhaps")
        assert result.returncode == 1
        assert "Traceback" in result.stderr and "DEBUG='perhaps' is not a boolean" in result.stderr

    def test_influxdb_url_alone_is_refused(self):
        result = run_manage("check", INFLUXDB_URL="http://127.0.0.1:8086")
        assert result.returncode != 0
        assert "INFLUXDB_TOKEN, INFLUXDB_ORG and INFLUXDB_BUCKET must be set too" in result.stderr

    def test_local_default_is_sqlite_under_var(self, tmp_path):
        result = run_manage(
            "shell",
            "-c",
            "from django.conf import settings; print(settings.DATABASES['default']['NAME'])",
            VAR_DIR=str(tmp_path),
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().endswith(str(tmp_path / "db.sqlite3"))


def test_postgresql_connections_give_up_after_the_connect_timeout():
    from config.settings.base import _database

    assert _database("postgres://postgres@127.0.0.1:5432/x")["OPTIONS"]["connect_timeout"] == 5


def test_a_postgresql_connection_notices_a_server_gone_silent_within_a_minute(db):
    """Without keepalive settings, libpq leaves a connection to the kernel's defaults: a server
    that vanished without closing it (a failover that moved its address, a cut network) was
    noticed after two hours of silence, a relay or consumer waiting on it hung that long. The
    socket of a real connection carries the options; a URL's own value is kept."""
    import socket

    from django.db import connection

    from config.settings.base import _database

    connection.ensure_connection()
    held = socket.socket(fileno=os.dup(connection.connection.pgconn.socket))
    try:
        assert {
            "idle": held.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            "interval": held.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            "count": held.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            "keepalive": held.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        } == {"idle": 30, "interval": 10, "count": 3, "keepalive": 1}
    finally:
        held.close()  # the duplicate; the connection keeps its own
    options = _database("postgres://postgres@127.0.0.1:5432/x?keepalives_idle=5")["OPTIONS"]
    assert (options["keepalives_idle"], options["keepalives_count"]) == (5, 3)


@pytest.mark.subprocess
def test_a_bad_connect_timeout_is_named():
    result = run_manage("check", DATABASE_URL="postgres://postgres@127.0.0.1:5432/x", DATABASE_CONNECT_TIMEOUT="0")
    assert result.returncode != 0
    assert "DATABASE_CONNECT_TIMEOUT=0 is below the minimum of 1" in result.stderr


@pytest.mark.subprocess
@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("REDIS_URL", "127.0.0.1:6379", "REDIS_URL must be a URL starting with one of: redis://, rediss://, unix://"),
        # redis-py reads a database that is not a number as database 0, without a word.
        ("REDIS_URL", "redis://:hunter2-secret@127.0.0.1:6379/1z", "REDIS_URL names Redis database '1z'"),
        ("CELERY_BROKER_URL", "localhost:6379", "CELERY_BROKER_URL must be a URL starting with one of:"),
        ("CELERY_BROKER_URL", "redis://127.0.0.1:6379/x", "CELERY_BROKER_URL names Redis database 'x'"),
        ("CELERY_BROKER_URL", "redis://127.0.0.1:port/0", "CELERY_BROKER_URL has a port that is not a number"),
        # kombu's failover list: the database check named "Redis database '0;redis:'".
        (
            "CELERY_BROKER_URL",
            "redis://:hunter2-secret@10.0.0.1:6379/0;redis://:hunter2-secret@10.0.0.2:6379/0",
            "CELERY_BROKER_URL holds a ';', which kombu reads as a list of failover brokers: give one URL",
        ),
        ("DATABASE_URL", "postgres://postgres@127.0.0.1:5432", "DATABASE_URL names no database"),
    ],
)
def test_a_malformed_service_url_stops_the_process_naming_the_variable(name, value, message):
    result = run_manage("check", **production_env(**{name: value}))
    assert result.returncode != 0, result.stdout
    assert message in result.stderr, result.stderr
    assert "hunter2-secret" not in result.stderr, "the error repeats the URL's password"


@pytest.mark.subprocess
def test_a_key_host_entry_with_a_path_stops_the_process_naming_it():
    result = run_manage("check", **production_env(AGENT_API_KEY_HOSTS="gw.example,http://vllm.internal:8000/v1"))
    assert result.returncode != 0, result.stdout
    assert "AGENT_API_KEY_HOSTS: 'http://vllm.internal:8000/v1' has a path" in result.stderr, result.stderr
    listed = "gw.example,https://gw.example:8443,http://vllm.internal:8000,http://[::1]:8000"
    result = run_manage("check", **production_env(AGENT_API_KEY_HOSTS=listed))
    assert result.returncode == 0, result.stderr


@pytest.mark.subprocess
def test_a_missing_prometheus_multiprocess_directory_is_named(tmp_path):
    result = run_manage("check", **production_env(PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "absent")))
    assert result.returncode != 0
    assert f"PROMETHEUS_MULTIPROC_DIR={str(tmp_path / 'absent')!r} is not an existing directory" in result.stderr


@pytest.mark.subprocess
def test_a_conversation_timeout_above_the_task_maximum_is_refused():
    # A reply's hard limit would outlast what the broker's visibility timeout is sized for.
    result = run_manage("check", **production_env(TASK_MAX_TIMEOUT_SECONDS="600", CONVERSATION_TIMEOUT_SECONDS="900"))
    assert result.returncode != 0
    assert "CONVERSATION_TIMEOUT_SECONDS must not exceed TASK_MAX_TIMEOUT_SECONDS" in result.stderr


@pytest.mark.subprocess
def test_the_visibility_timeout_covers_the_retry_after_a_lost_database_connection():
    """run_task sends its message again up to 30 s later when the database connection is
    lost: that countdown is held unacknowledged in a worker too, whatever the backoff cap."""
    timeouts = ("TASK_MAX_TIMEOUT_SECONDS", "TASK_DEFAULT_TIMEOUT_SECONDS", "CONVERSATION_TIMEOUT_SECONDS")
    limits = dict.fromkeys(timeouts, "60")
    result = run_manage(
        "check", **production_env(**limits, TASK_RETRY_BACKOFF_MAX_SECONDS="5", BROKER_VISIBILITY_TIMEOUT_SECONDS="80")
    )
    assert result.returncode != 0, result.stdout
    assert "BROKER_VISIBILITY_TIMEOUT_SECONDS=80 must exceed" in result.stderr
    assert "(108 s =" in result.stderr  # 60 + 10 + 38: a deferral's countdown is longer still


@pytest.mark.subprocess
def test_the_visibility_timeout_covers_a_deferral_for_the_agents_concurrency_limit():
    """A task deferred for its agent's max_concurrency comes back up to 37.5 s later, held
    unacknowledged in a worker meanwhile, then runs up to its hard limit: 60 + 10 + 30 s (the
    lost connection's retry) is not enough."""
    timeouts = ("TASK_MAX_TIMEOUT_SECONDS", "TASK_DEFAULT_TIMEOUT_SECONDS", "CONVERSATION_TIMEOUT_SECONDS")
    limits = dict.fromkeys(timeouts, "60")
    result = run_manage(
        "check", **production_env(**limits, TASK_RETRY_BACKOFF_MAX_SECONDS="5", BROKER_VISIBILITY_TIMEOUT_SECONDS="105")
    )
    assert result.returncode != 0, result.stdout
    assert "BROKER_VISIBILITY_TIMEOUT_SECONDS=105 must exceed" in result.stderr
    assert "38 s for a task deferred for its agent's max_concurrency" in result.stderr


@pytest.mark.subprocess
def test_a_publish_to_a_broker_that_stopped_answering_gives_up():
    """A broker that keeps the TCP connection open but answers nothing (failover, a NAT or
    firewall timeout) must fail a publish within the socket timeout, not hold the web request
    or beat for ever."""
    import contextlib
    import socket
    import threading
    import time

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    accepted = []

    def accept_and_say_nothing() -> None:
        with contextlib.suppress(OSError):  # closed at the end of the test
            while True:
                accepted.append(silent.accept()[0])

    threading.Thread(target=accept_and_say_nothing, daemon=True).start()
    broker = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
    script = "from config.celery import app; app.send_task('orchestration.relay_events', queue='critical')"
    started = time.monotonic()
    try:
        result = run_manage(
            "shell",
            "--no-imports",
            "-c",
            script,
            **production_env(CELERY_BROKER_URL=broker, BROKER_SOCKET_TIMEOUT_SECONDS="2"),
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the publish still waited after 60 s")
    finally:
        silent.close()
    assert result.returncode != 0, result.stdout
    assert "Timeout" in result.stderr, result.stderr[-2000:]
    assert time.monotonic() - started < 60


@pytest.mark.subprocess
def test_training_csv_retention_too_short_to_outlast_late_events_is_refused():
    result = run_manage("check", DATABASE_URL="postgres://postgres@127.0.0.1:5432/x", RETENTION_DAYS_TRAINING_CSV="1")
    assert result.returncode != 0
    assert "RETENTION_DAYS_TRAINING_CSV must be 0 (keep) or at least 2 days" in result.stderr


def test_statement_and_idle_transaction_timeouts_reach_the_postgresql_session(monkeypatch):
    """DATABASE_STATEMENT_TIMEOUT_SECONDS / DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS become
    the session's settings on a real connection, beside options the URL gave; 0 sets nothing."""
    import psycopg

    from config.settings.base import _database
    from tests.engine import database_url

    assert "options" not in _database(database_url())["OPTIONS"]
    monkeypatch.setenv("DATABASE_STATEMENT_TIMEOUT_SECONDS", "30")
    monkeypatch.setenv("DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS", "60")
    config = _database(database_url() + "?options=-c%20application_name%3Dweb-7")
    with psycopg.connect(
        dbname=config["NAME"],
        host=config["HOST"],
        port=config["PORT"] or 5432,
        user=config["USER"],
        **config["OPTIONS"],
    ) as conn:
        shown = [
            conn.execute(f"SHOW {name}").fetchone()[0]
            for name in ("statement_timeout", "idle_in_transaction_session_timeout", "application_name")
        ]
    assert shown == ["30s", "1min", "web-7"]


@pytest.mark.parametrize("value, problem", [("-1", "is below the minimum of 0"), ("1e3", "is not an integer")])
def test_a_bad_statement_timeout_is_named(monkeypatch, value, problem):
    from config.settings.base import _database

    monkeypatch.setenv("DATABASE_STATEMENT_TIMEOUT_SECONDS", value)
    with pytest.raises(ImproperlyConfigured, match=f"DATABASE_STATEMENT_TIMEOUT_SECONDS=.* {problem}"):
        _database("postgres://postgres@127.0.0.1:5432/x")
