"""The embedded first-run default: `manage.py migrate` on a fresh SQLite file installs the same
database rules as on PostgreSQL (orchestration migration 0002's SQLite triggers), and the
selectors work there too. Runs manage.py in subprocesses; needs no PostgreSQL."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.engine import sqlite_manage

pytestmark = pytest.mark.subprocess


# Rows are made through the ORM (it fills in every NOT NULL column); the rules are then
# exercised below with plain sqlite3, outside Django.
SETUP = """
import datetime as dt
import json
from decimal import Decimal
from django.utils import timezone
from orchestration.models import Agent, Event, TaskAttempt, TaskExecution, Workflow
from orchestration.selectors import agent_stats, workflow_with_tasks

agent = Agent.objects.create(id="lite-001", name="Lite")
workflow = Workflow.objects.create(name="lite", status="running")
empty = Workflow.objects.create(name="empty")
task = TaskExecution.objects.create(
    workflow=workflow, agent=agent, task_name="only", status="completed",
    execution_time_ms=12.5, tokens_used=3, cost_usd=Decimal("0.000100"),
)
broken = TaskExecution.objects.create(workflow=workflow, agent=agent, task_name="broken", status="failed")
now = timezone.now()
TaskExecution.objects.filter(pk=broken.pk).update(created_at=now - dt.timedelta(seconds=1))
running = TaskAttempt.objects.create(execution=task, attempt_number=1, started_at=now)
finished = TaskAttempt.objects.create(
    execution=task, attempt_number=2, started_at=now, status="failed", finished_at=now
)
cancelled = TaskAttempt.objects.create(
    execution=task, attempt_number=3, started_at=now, status="cancelled", finished_at=now, tokens_used=10
)
event = Event.objects.create(event_type="workflow_created", entity_type="workflow", entity_id=workflow.pk)
found = workflow_with_tasks(workflow_id=workflow.pk)
print(json.dumps({
    "workflow": workflow.pk,
    "running_attempt": running.pk,
    "finished_attempt": finished.pk,
    "cancelled_attempt": cancelled.pk,
    "event": event.pk,
    "tasks": [[t["task_name"], t["agent_id"], str(t["cost_usd"])] for t in found["tasks"]],
    "empty_tasks": workflow_with_tasks(workflow_id=empty.pk)["tasks"],
    "unknown": workflow_with_tasks(workflow_id="nope"),
    "stats": agent_stats(agent_id="lite-001"),
}, default=str))
"""


@pytest.fixture(scope="module")
def migrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    tmp_path = tmp_path_factory.mktemp("sqlite_default")
    sqlite_manage(tmp_path, "migrate", "--no-input")
    created = sqlite_manage(tmp_path, "shell", "-c", SETUP)
    return tmp_path / "db.sqlite3", json.loads(created.stdout.strip().splitlines()[-1])


@pytest.fixture
def db_file(migrated: tuple[Path, dict[str, Any]]) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection; each test's changes are rolled back."""
    conn = sqlite3.connect(migrated[0])
    try:
        yield conn
    finally:
        conn.rollback()
        conn.close()


@pytest.fixture
def ids(migrated: tuple[Path, dict[str, Any]]) -> dict[str, Any]:
    return migrated[1]


def test_migrate_creates_the_sqlite_file_with_the_tables(db_file: sqlite3.Connection) -> None:
    tables = {row[0] for row in db_file.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    assert {"workflows", "task_executions", "task_attempts", "events", "agents", "export_runs"} <= tables


def test_migrate_keeps_the_events_indexes_migrations_made_in_sql(db_file: sqlite3.Connection) -> None:
    """Migrations 0014 and 0019 index events in SQL, outside the models' state: a later migration
    that alters the table (SQLite copies it to a new one: 0025, 0030) dropped them, and the
    API's pages of an entity's events, or of its warnings and errors, read the whole table."""
    indexes = {
        row[0] for row in db_file.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'events'")
    }
    plan = db_file.execute(
        "EXPLAIN QUERY PLAN SELECT sequence FROM events WHERE entity_id = 'x' ORDER BY sequence LIMIT 50"
    ).fetchall()

    assert {"idx_events_entity_id_sequence", "idx_events_severity_flagged"} <= indexes
    assert "idx_events_entity_id_sequence" in plan[-1][-1]


def test_events_reject_update(db_file: sqlite3.Connection, ids: dict[str, Any]) -> None:
    with pytest.raises(sqlite3.IntegrityError, match="events is append-only: UPDATE is not allowed"):
        db_file.execute("UPDATE events SET severity = 'error' WHERE sequence = ?", [ids["event"]])

    assert db_file.execute("SELECT severity FROM events WHERE sequence = ?", [ids["event"]]).fetchall() == [("info",)]


def test_events_reject_delete(db_file: sqlite3.Connection, ids: dict[str, Any]) -> None:
    with pytest.raises(sqlite3.IntegrityError, match="events is append-only: DELETE is not allowed"):
        db_file.execute("DELETE FROM events")

    assert db_file.execute("SELECT count(*) FROM events").fetchone() == (1,)


def test_events_accept_insert(db_file: sqlite3.Connection) -> None:
    db_file.execute(
        "INSERT INTO events (event_id, event_type, source, payload, severity, created_at)"
        " VALUES ('lite-event', 'workflow_started', 'test', '{}', 'info', '2025-03-01 12:00:00')"
    )

    assert db_file.execute("SELECT count(*) FROM events").fetchone() == (2,)


@pytest.mark.parametrize(
    "change",
    # worker_pid and pool_pid came with a later migration (0028), which installs the rule again
    ["error = 'rewritten'", "worker_pid = 1", "pool_pid = 1"],
)
def test_finished_attempt_rejects_update(db_file: sqlite3.Connection, ids: dict[str, Any], change: str) -> None:
    with pytest.raises(sqlite3.IntegrityError, match="task attempt is finished and cannot change"):
        db_file.execute(f"UPDATE task_attempts SET {change} WHERE id = ?", [ids["finished_attempt"]])  # noqa: S608

    row = db_file.execute(
        "SELECT status, error, worker_pid, pool_pid FROM task_attempts WHERE id = ?", [ids["finished_attempt"]]
    ).fetchone()
    assert row == ("failed", None, None, None)


def test_an_attempt_closed_without_a_result_may_only_gain_spend(
    db_file: sqlite3.Connection, ids: dict[str, Any]
) -> None:
    cancelled = ids["cancelled_attempt"]
    db_file.execute("UPDATE task_attempts SET tokens_used = tokens_used + 5 WHERE id = ?", [cancelled])
    for statement in (
        "UPDATE task_attempts SET tokens_used = tokens_used + 1, error = 'rewritten' WHERE id = ?",
        "UPDATE task_attempts SET tokens_used = 0 WHERE id = ?",
    ):
        with pytest.raises(sqlite3.IntegrityError, match="task attempt is finished and cannot change"):
            db_file.execute(statement, [cancelled])
    with pytest.raises(sqlite3.IntegrityError, match="task attempt is finished and cannot change"):
        db_file.execute("UPDATE task_attempts SET tokens_used = 99 WHERE id = ?", [ids["finished_attempt"]])
    row = db_file.execute("SELECT status, tokens_used, error FROM task_attempts WHERE id = ?", [cancelled]).fetchone()
    assert row == ("cancelled", 15, None)


def test_running_attempt_can_be_finished_once(db_file: sqlite3.Connection, ids: dict[str, Any]) -> None:
    finish = "UPDATE task_attempts SET status = 'succeeded', finished_at = '2025-03-01 12:00:01' WHERE id = ?"
    assert db_file.execute(finish, [ids["running_attempt"]]).rowcount == 1

    with pytest.raises(sqlite3.IntegrityError, match="task attempt is finished and cannot change"):
        db_file.execute("UPDATE task_attempts SET status = 'failed' WHERE id = ?", [ids["running_attempt"]])


@pytest.mark.parametrize("status", ["completed", "failed", "cancelled"])
def test_workflow_duration_is_computed_on_a_terminal_status(
    db_file: sqlite3.Connection, ids: dict[str, Any], status: str
) -> None:
    db_file.execute(
        "UPDATE workflows SET status = ?, started_at = '2025-03-01 12:00:00',"
        " completed_at = '2025-03-01 12:01:30.250400' WHERE workflow_id = ?",
        [status, ids["workflow"]],
    )

    row = db_file.execute("SELECT duration_ms FROM workflows WHERE workflow_id = ?", [ids["workflow"]]).fetchone()
    assert row == (90250,)


def test_workflow_duration_is_cleared_when_running_again(db_file: sqlite3.Connection, ids: dict[str, Any]) -> None:
    db_file.execute(
        "UPDATE workflows SET status = 'failed', started_at = '2025-03-01 12:00:00',"
        " completed_at = '2025-03-01 12:00:02' WHERE workflow_id = ?",
        [ids["workflow"]],
    )
    db_file.execute("UPDATE workflows SET status = 'running' WHERE workflow_id = ?", [ids["workflow"]])

    row = db_file.execute("SELECT duration_ms FROM workflows WHERE workflow_id = ?", [ids["workflow"]]).fetchone()
    assert row == (None,)


def test_workflow_update_refreshes_updated_at(db_file: sqlite3.Connection, ids: dict[str, Any]) -> None:
    db_file.execute("UPDATE workflows SET updated_at = '2000-01-01 00:00:00' WHERE workflow_id = ?", [ids["workflow"]])
    db_file.execute("UPDATE workflows SET current_step = 'two' WHERE workflow_id = ?", [ids["workflow"]])

    (updated_at,) = db_file.execute(
        "SELECT updated_at FROM workflows WHERE workflow_id = ?", [ids["workflow"]]
    ).fetchone()
    assert updated_at > "2025-01-01"


def test_selectors_work_on_sqlite(ids: dict[str, Any]) -> None:
    assert ids["tasks"] == [["broken", "lite-001", "0.000000"], ["only", "lite-001", "0.000100"]]
    assert (ids["empty_tasks"], ids["unknown"]) == ([], None)
    stats = ids["stats"]
    assert (stats["total_tasks"], stats["avg_latency_ms"], stats["total_tokens"]) == (1, 12.5, 3)
    assert (Decimal(stats["total_cost_usd"]), stats["failed"], stats["success_rate"]) == (Decimal("0.0001"), 1, 50.0)


IDEMPOTENT_REPLAY = """
import json
from django.contrib.auth import get_user_model
from orchestration.models import Agent
from orchestration.api.idempotency import workflow_submit_idempotent
from orchestration.api.exceptions import Unprocessable
Agent.objects.create(id="lite-001", name="Lite")
owner = get_user_model().objects.create(username="u")
body = {"name": "wf", "tasks": [{"name": "t", "agent": "lite-001"}]}
first, _ = workflow_submit_idempotent(owner=owner, body=dict(body), header_key="k-1")
again, created = workflow_submit_idempotent(owner=owner, body=dict(body), header_key="k-1")
try:
    workflow_submit_idempotent(owner=owner, body={**body, "name": "other"}, header_key="k-1")
    other = "accepted"
except Unprocessable:
    other = "refused"
print(json.dumps({"same": again.pk == first.pk, "created": created, "other": other}))
"""


def test_the_same_body_with_the_same_idempotency_key_is_a_replay_on_sqlite(tmp_path: Path) -> None:
    """SQLite's JSON equality compares texts in the order the body came in: the replay check
    must not depend on it (found in review)."""
    sqlite_manage(tmp_path, "migrate", "--no-input")
    out = sqlite_manage(tmp_path, "shell", "-c", IDEMPOTENT_REPLAY).stdout.strip().splitlines()[-1]
    assert json.loads(out) == {"same": True, "created": False, "other": "refused"}
