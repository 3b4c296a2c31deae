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


def run_manage(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "DJANGO_SETTINGS_MODULE"}}
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
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

    def test_production_refuses_sqlite(self):
        result = run_manage("check", **production_env(DATABASE_URL="sqlite:////tmp/x.sqlite3"))
        assert result.returncode != 0
        assert "Production runs on PostgreSQL" in result.stderr

    def test_unsupported_database_url_is_named(self):
        result = run_manage("check", DATABASE_URL="mysql://root@127.0.0.1/x")
        assert result.returncode != 0
        assert "DATABASE_URL names an unsupported database" in result.stderr

    def test_bad_boolean_stops_the_process(self):
        result = run_manage("check", DEBUG="perhaps")
        assert result.returncode != 0
        assert "DEBUG='perhaps' is not a boolean" in result.stderr

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


@pytest.mark.subprocess
def test_a_bad_connect_timeout_is_named():
    result = run_manage("check", DATABASE_URL="postgres://postgres@127.0.0.1:5432/x", DATABASE_CONNECT_TIMEOUT="0")
    assert result.returncode != 0
    assert "DATABASE_CONNECT_TIMEOUT=0 is below the minimum of 1" in result.stderr
