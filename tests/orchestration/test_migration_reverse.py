"""Reversing a migration on a database in use: one that rows written since make impossible
(a new event type, attempt cause or export status the older check refuses, in records that
cannot change) is refused by an IrreversibleError naming them, before anything changes; one
that can be reversed keeps what it can (the role groups and their members)."""

from __future__ import annotations

import pytest

from tests.engine import manage
from tests.pg import database_migrated_to

pytestmark = pytest.mark.django_db

APPLIED = (
    "from django.db.migrations.recorder import MigrationRecorder as R\n"
    "print(sorted(R.Migration.objects.filter(app={app!r}).values_list('name', flat=True)))"
)


def shell(code: str, env: dict[str, str]) -> str:
    return manage("shell", "-c", code, env=env).stdout


def applied(app: str, env: dict[str, str]) -> str:
    return shell(APPLIED.format(app=app), env)


@pytest.mark.parametrize(
    ("target", "reversed_", "rows", "named"),
    [
        (
            "0037",
            "0038",
            "EventFactory(event_type='workflow_changed', entity_type='workflow')",
            "events holds rows whose event_type the schema before it refuses (1 with 'workflow_changed'); "
            "events are append-only",
        ),
        (
            "0034",
            "0035",
            "TaskAttemptFactory(status='lost', cause='database_error', finished_at=timezone.now())",
            "task_attempts holds rows whose cause the schema before it refuses (1 with 'database_error'); "
            "finished attempts are immutable",
        ),
        (
            "0029",
            "0030",
            "EventFactory(event_type='task_ended_late', entity_type='task')",
            "events holds rows whose event_type the schema before it refuses (1 with 'task_ended_late'); "
            "events are append-only",
        ),
        (
            "0015",
            "0016",
            "TaskAttemptFactory(status='lost', cause='connection_lost', finished_at=timezone.now())\n"
            "TaskAttemptFactory(status='lost', cause='connection_lost', finished_at=timezone.now())",
            "(2 with 'connection_lost')",
        ),
    ],
)
def test_a_reverse_that_the_rows_forbid_is_refused_by_name_and_the_migration_stays(
    target: str, reversed_: str, rows: str, named: str
) -> None:
    # The latest migration: the factories write rows as the current models have them.
    with database_migrated_to("orchestration", "0044") as (_, env):
        shell(f"from django.utils import timezone\nfrom tests.factories import *\n{rows}", env)
        result = manage("migrate", "orchestration", target, "--no-input", env=env, check=False)
        assert result.returncode != 0
        output = result.stdout + result.stderr
        assert "IrreversibleError" in output, output
        assert f"orchestration {reversed_} cannot be reversed on this database" in output, output
        assert named in output, output
        assert f"'{reversed_}_" in applied("orchestration", env)


def test_an_export_run_superseded_refuses_the_reverse_by_name_until_it_is_deleted() -> None:
    with database_migrated_to("orchestration", "0036") as (_, env):
        manage("migrate", "training_export", "--no-input", env=env)
        shell(
            "import datetime as dt\nfrom training_export.models import ExportRun\n"
            "start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)\n"
            "ExportRun.objects.create(data_type='events', window_start=start, "
            "window_end=start + dt.timedelta(days=1), status='superseded')",
            env,
        )
        result = manage("migrate", "training_export", "0002", "--no-input", env=env, check=False)
        assert result.returncode != 0
        output = result.stdout + result.stderr
        assert "training_export 0003 cannot be reversed on this database" in output, output
        assert "(1 with 'superseded'); delete those runs" in output, output
        assert "'0003_export_runs_superseded'" in applied("training_export", env)

        shell(
            "from training_export.models import ExportRun\nExportRun.objects.filter(status='superseded').delete()", env
        )
        manage("migrate", "training_export", "0002", "--no-input", env=env)
        manage("migrate", "training_export", "--no-input", env=env)


def test_reversing_the_roles_keeps_the_groups_and_their_members() -> None:
    with database_migrated_to("orchestration", "0036") as (_, env):
        shell("from tests.factories import UserFactory\nUserFactory(username='dev', role='developer')", env)
        manage("migrate", "orchestration", "0002", "--no-input", env=env)
        manage("migrate", "orchestration", "--no-input", env=env)
        groups = shell(
            "from django.contrib.auth.models import User\n"
            "print(list(User.objects.get(username='dev').groups.values_list('name', flat=True)))",
            env,
        )
        assert groups.strip().splitlines()[-1] == "['developer']"
