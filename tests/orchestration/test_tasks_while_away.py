"""The beat's every-few-seconds tasks (relay, reaper) while PostgreSQL or Redis is away: one
warning line a run, the next run tries again; they failed with a traceback every tick."""

from __future__ import annotations

import logging
import socket

import pytest
from django.db import connection

from orchestration.tasks import reap_stale_tasks, relay_events
from tests.pg import other_connection

pytestmark = pytest.mark.django_db(transaction=True)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def database_away():
    saved = dict(connection.settings_dict)
    connection.close()
    connection.settings_dict.update(HOST="127.0.0.1", PORT=_closed_port())
    yield
    connection.close()
    connection.settings_dict.update(saved)


def test_the_relay_and_the_reaper_skip_a_run_while_the_database_is_away(database_away, caplog):
    caplog.set_level(logging.WARNING, logger="orchestration.tasks")
    assert relay_events.run() == 0
    assert reap_stale_tasks.run() == {}
    said = [r.getMessage() for r in caplog.records if r.name == "orchestration.tasks"]
    assert [m.split(":")[0] for m in said] == ["relay_events skipped", "reap_stale_tasks skipped"]
    assert all("the database is not answering (connection failed" in m for m in said), said
    assert not any(r.exc_info for r in caplog.records)


def test_the_relay_skips_a_run_while_redis_is_away(settings, caplog):
    settings.REDIS_URL = f"redis://127.0.0.1:{_closed_port()}/0"
    caplog.set_level(logging.WARNING, logger="orchestration.tasks")
    assert relay_events.run() == 0
    said = [r.getMessage() for r in caplog.records if r.name == "orchestration.tasks"]
    assert len(said) == 1 and said[0].startswith("relay_events skipped: Redis is not answering"), said


def test_another_database_error_still_fails_the_run():
    """A statement cancelled (its timeout, waiting for a lock another session holds) is an
    OperationalError too, but not an unreachable database: the run fails, as before."""
    from django.db import OperationalError

    with other_connection() as other, other.transaction():
        other.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        with connection.cursor() as cursor:
            cursor.execute("SET statement_timeout = '200ms'")
        try:
            with pytest.raises(OperationalError, match="statement timeout"):
                relay_events.run()
        finally:
            connection.close()  # its session's timeout with it
