"""The migrated PostgreSQL schema holds the seeds' tables, columns, indexes and CHECK lists.

The expected columns are copied from the seeds' CREATE TABLE statements (seed 000's
operational tables, seed 003's agents / agent_metrics / agent_interactions, and the seed 003
columns DESIGN.md §4 adds to workflows and task_executions), so documented SQL keeps working.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from django.apps import apps as django_apps
from django.db import IntegrityError, connection, models, transaction
from django.test.utils import isolate_apps
from django.utils import timezone

from orchestration.event_types import EntityType, EventType, Severity
from orchestration.models import (
    Agent,
    AgentInteraction,
    AgentMetric,
    AgentPlaygroundMessage,
    Priority,
    TaskAttempt,
    TaskExecution,
    Workflow,
)
from orchestration.models.base import DomainCheck
from tests.factories import (
    AgentFactory,
    EventFactory,
    ExportRunFactory,
    InteractionFactory,
    MessageFactory,
    MetricFactory,
    TaskAttemptFactory,
    TaskExecutionFactory,
    WorkflowFactory,
)
from tests.pg import other_connection
from training_export.models import ExportRun

pytestmark = pytest.mark.django_db

SEED_000_COLUMNS = {
    "workflows": {
        "workflow_id": "VARCHAR(255) NOT NULL",
        "name": "VARCHAR(255)",
        "description": "TEXT",
        "workflow_type": "VARCHAR(100)",
        "status": "VARCHAR(50)",
        "current_step": "VARCHAR(255)",
        "total_steps": "INTEGER",
        "completed_steps": "INTEGER",
        "state_data": "JSONB",
        "step_results": "JSONB",
        "assigned_agents": "JSONB",
        "checkpoints": "JSONB",
        "error": "TEXT",
        "error_count": "INTEGER",
        "metadata": "JSONB",
        "tags": "JSONB",
        "created_at": "TIMESTAMP",
        "updated_at": "TIMESTAMP",
        "started_at": "TIMESTAMP",
        "completed_at": "TIMESTAMP",
        "deadline": "TIMESTAMP",
    },
    "task_executions": {
        "execution_id": "VARCHAR(255) NOT NULL",
        "workflow_id": "VARCHAR(255)",
        "agent_id": "VARCHAR(50)",  # a foreign key to agents.id: seed 003's VARCHAR(50)
        "task_name": "VARCHAR(255) NOT NULL",
        "task_type": "VARCHAR(100)",
        "priority": "VARCHAR(20)",
        "status": "VARCHAR(50)",
        "input_data": "JSONB",
        "output_data": "JSONB",
        "error": "TEXT",
        "retry_count": "INTEGER",
        "max_retries": "INTEGER",
        "timeout_seconds": "INTEGER",
        "execution_time_ms": "FLOAT",
        "created_at": "TIMESTAMP",
        "started_at": "TIMESTAMP",
        "completed_at": "TIMESTAMP",
    },
    "events": {
        "event_id": "VARCHAR(255) NOT NULL",
        "event_type": "VARCHAR(100) NOT NULL",
        "entity_type": "VARCHAR(100)",
        "entity_id": "VARCHAR(255)",
        "workflow_id": "VARCHAR(255)",
        "agent_id": "VARCHAR(255)",
        "session_id": "VARCHAR(255)",
        "source": "VARCHAR(100)",
        "payload": "JSONB",
        "severity": "VARCHAR(20)",
        "created_at": "TIMESTAMP",
    },
    "agent_playground_messages": {
        "message_id": "VARCHAR(255) NOT NULL",
        "instance_id": "VARCHAR(255) NOT NULL",
        "agent_id": "VARCHAR(50)",  # a foreign key to agents.id: seed 003's VARCHAR(50)
        "role": "VARCHAR(20) NOT NULL",
        "content": "TEXT NOT NULL",
        "tool_calls": "JSONB",
        "is_error": "BOOLEAN",
        "metadata": "JSONB",
        "created_at": "TIMESTAMP",
    },
}

# Seed 003 keys workflows and tasks by UUID; we keep seed 000's VARCHAR(255) keys, so the
# columns that reference them are VARCHAR(255) here. agents.specialties is TEXT[] in seed
# 003 and a JSON list (jsonb) here, like every other list-valued column.
SEED_003_COLUMNS = {
    "agents": {
        "id": "VARCHAR(50) NOT NULL",
        "name": "VARCHAR(100) NOT NULL",
        "role": "VARCHAR(200) NOT NULL",
        "model": "VARCHAR(100) NOT NULL",
        "specialties": "JSONB NOT NULL",
        "backstory": "TEXT",
        "personality_emoji": "VARCHAR(10)",
        "status": "VARCHAR(20)",
        "total_tasks_completed": "INTEGER",
        "total_tokens_used": "BIGINT",
        "average_latency_ms": "FLOAT",
        "success_rate": "FLOAT",
        "created_at": "TIMESTAMP",
        "updated_at": "TIMESTAMP",
        "metadata": "JSONB",
    },
    "agent_metrics": {
        "id": "UUID NOT NULL",
        "agent_id": "VARCHAR(50) NOT NULL",
        "metric_type": "VARCHAR(50) NOT NULL",
        "metric_value": "FLOAT NOT NULL",
        "metric_unit": "VARCHAR(20)",
        "recorded_at": "TIMESTAMP",
        "context": "JSONB",
    },
    "agent_interactions": {
        "id": "UUID NOT NULL",
        "workflow_id": "VARCHAR(255)",
        "from_agent_id": "VARCHAR(50) NOT NULL",
        "to_agent_id": "VARCHAR(50) NOT NULL",
        "interaction_type": "VARCHAR(50) NOT NULL",
        "message": "TEXT",
        "payload": "JSONB",
        "created_at": "TIMESTAMP",
    },
    # DESIGN.md §4: seed 003's workflow and task columns added to seed 000's tables (seed
    # 003's failed_tasks is failed_steps, beside seed 000's completed_steps).
    "workflows": {
        "initiator": "VARCHAR(100)",
        "failed_steps": "INTEGER",
        "duration_ms": "INTEGER",
        "total_tokens_used": "INTEGER",
        "total_cost_usd": "DECIMAL(10, 6)",
    },
    "task_executions": {
        "description": "TEXT",
        "tokens_used": "INTEGER",
        "cost_usd": "DECIMAL(10, 6)",
        "parent_task_id": "VARCHAR(255)",
        "metadata": "JSONB",
    },
}

# Seed type -> the information_schema.columns.data_type values that hold it without loss.
COMPATIBLE_TYPES = {
    "VARCHAR": {"character varying", "text"},
    "TEXT": {"text"},
    "JSONB": {"jsonb"},
    "TIMESTAMP": {"timestamp with time zone"},
    "INTEGER": {"integer", "bigint"},
    "BIGINT": {"bigint"},
    "FLOAT": {"double precision"},
    "BOOLEAN": {"boolean"},
    "UUID": {"uuid"},
    "DECIMAL": {"numeric"},
}

SEED_TYPE = re.compile(r"(?P<type>[A-Z]+)(?:\((?P<size>\d+)(?:, (?P<scale>\d+))?\))?(?P<not_null> NOT NULL)?$")


def seed_columns() -> list[tuple[str, str, str]]:
    return [
        (table, column, seed_type)
        for seeds in (SEED_000_COLUMNS, SEED_003_COLUMNS)
        for table, columns in seeds.items()
        for column, seed_type in columns.items()
    ]


def column_info(table: str) -> dict[str, dict[str, Any]]:
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT column_name, data_type, character_maximum_length, numeric_precision, numeric_scale, is_nullable
            FROM information_schema.columns
            WHERE table_schema = current_schema() AND table_name = %s
            """,
            [table],
        )
        names = [column.name for column in cursor.description]
        return {row[0]: dict(zip(names, row, strict=True)) for row in cursor.fetchall()}


@pytest.mark.parametrize(("table", "column", "seed_type"), seed_columns(), ids=lambda v: str(v))
def test_seed_column_exists_with_a_compatible_type(table: str, column: str, seed_type: str) -> None:
    spec = SEED_TYPE.match(seed_type)
    assert spec is not None, f"bad seed type {seed_type!r} in the test"
    info = column_info(table).get(column)

    assert info is not None, f"{table}.{column} is missing"
    assert info["data_type"] in COMPATIBLE_TYPES[spec["type"]], f"{table}.{column} is {info['data_type']}"
    if spec["type"] == "VARCHAR" and info["data_type"] == "character varying":
        assert info["character_maximum_length"] >= int(spec["size"]), f"{table}.{column} is too short"
    if spec["type"] == "DECIMAL":
        assert info["numeric_scale"] == int(spec["scale"])
        assert info["numeric_precision"] >= int(spec["size"])
    if spec["not_null"]:
        assert info["is_nullable"] == "NO", f"{table}.{column} must be NOT NULL"


def test_every_seed_table_is_checked() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
        tables = {row[0] for row in cursor.fetchall()}

    assert set(SEED_000_COLUMNS) | set(SEED_003_COLUMNS) <= tables
    assert {"task_attempts", "api_keys", "export_runs"} <= tables


# name -> (table, definition after "USING"), from seeds 001 and 003 (seed 003's agent_tasks
# is task_executions), plus the index the recent-tasks selector relies on.
SEED_INDEXES = {
    "idx_events_entity": ("events", "btree (entity_type, entity_id)"),
    "idx_events_type": ("events", "btree (event_type)"),
    "idx_workflows_status": ("workflows", "btree (status)"),
    # widened to (workflow_id, status): still leads with workflow_id, so seed 001's lookups use it
    "idx_task_executions_workflow": ("task_executions", "btree (workflow_id, status)"),
    "idx_task_executions_status": ("task_executions", "btree (status)"),
    "idx_agents_status": ("agents", "btree (status)"),
    "idx_workflows_created_at": ("workflows", "btree (created_at DESC)"),
    "idx_workflows_type": ("workflows", "btree (workflow_type)"),
    "idx_tasks_agent_status": ("task_executions", "btree (agent_id, status, created_at DESC)"),
    "idx_tasks_agent_created": ("task_executions", "btree (agent_id, created_at DESC)"),
    "idx_tasks_created_at": ("task_executions", "btree (created_at DESC)"),
    "idx_metrics_agent_type_time": ("agent_metrics", "btree (agent_id, metric_type, recorded_at DESC)"),
    "idx_interactions_workflow": ("agent_interactions", "btree (workflow_id)"),
    "idx_interactions_agents": ("agent_interactions", "btree (from_agent_id, to_agent_id)"),
}


@pytest.mark.parametrize("name", sorted(SEED_INDEXES))
def test_seed_index_exists(name: str) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT tablename, indexdef FROM pg_indexes WHERE schemaname = current_schema() AND indexname = %s",
            [name],
        )
        rows = cursor.fetchall()

    assert len(rows) == 1, f"index {name} is missing"
    table, definition = SEED_INDEXES[name]
    assert rows[0][0] == table
    assert rows[0][1].split(" USING ", 1)[1] == definition


def test_events_created_at_has_a_brin_index() -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT index.relname, pg_get_indexdef(i.indexrelid)
            FROM pg_index i
            JOIN pg_class index ON index.oid = i.indexrelid
            JOIN pg_am am ON am.oid = index.relam
            WHERE i.indrelid = 'events'::regclass AND am.amname = 'brin'
            """
        )
        rows = cursor.fetchall()

    assert len(rows) == 1
    assert rows[0][0] == "idx_events_created_brin"
    assert rows[0][1].endswith("USING brin (created_at)")


def _finished_at_unless_running(value: str) -> dict[str, Any]:
    return {"finished_at": None if value == "running" else timezone.now()}


def _with_period_start(value: str) -> dict[str, Any]:
    return {"period_start": timezone.now()}


@dataclass(frozen=True)
class CheckCase:
    """A status/role/type column (`table.column`, also the model field's name), the factory
    of its model, the choices its CHECK constraint must hold exactly, and the constraint."""

    column: str
    factory: Any
    choices: type[models.TextChoices]
    constraint: str
    other_fields: Callable[[str], dict[str, Any]] | None = None  # what other constraints need

    @property
    def field(self) -> str:
        return self.column.split(".")[1]

    def values(self, value: str) -> dict[str, Any]:
        return {self.field: value, **(self.other_fields(value) if self.other_fields else {})}


CHECK_CASES = [
    CheckCase("workflows.status", WorkflowFactory, Workflow.Status, "workflows_status_valid"),
    CheckCase("workflows.priority", WorkflowFactory, Priority, "workflows_priority_valid"),
    CheckCase("task_executions.status", TaskExecutionFactory, TaskExecution.Status, "task_executions_status_valid"),
    CheckCase("task_executions.priority", TaskExecutionFactory, Priority, "task_executions_priority_valid"),
    CheckCase(
        "task_attempts.status",
        TaskAttemptFactory,
        TaskAttempt.Status,
        "task_attempts_status_valid",
        _finished_at_unless_running,
    ),
    CheckCase("task_attempts.cause", TaskAttemptFactory, TaskAttempt.Cause, "task_attempts_cause_valid"),
    CheckCase("events.event_type", EventFactory, EventType, "events_event_type_valid"),
    CheckCase("events.entity_type", EventFactory, EntityType, "events_entity_type_valid"),
    CheckCase("events.severity", EventFactory, Severity, "events_severity_valid"),
    CheckCase(
        "agent_playground_messages.role",
        MessageFactory,
        AgentPlaygroundMessage.Role,
        "agent_playground_messages_role_valid",
    ),
    CheckCase("agent_metrics.metric_type", MetricFactory, AgentMetric.MetricType, "agent_metrics_type_valid"),
    CheckCase(
        "agent_metrics.period", MetricFactory, AgentMetric.Period, "agent_metrics_period_valid", _with_period_start
    ),
    CheckCase(
        "agent_interactions.interaction_type",
        InteractionFactory,
        AgentInteraction.InteractionType,
        "agent_interactions_type_valid",
    ),
    CheckCase("agents.status", AgentFactory, Agent.Status, "agents_status_valid"),
    CheckCase("agents.executor", AgentFactory, Agent.Executor, "agents_executor_valid"),
    CheckCase("export_runs.data_type", ExportRunFactory, ExportRun.DataType, "export_runs_data_type_valid"),
    CheckCase("export_runs.format", ExportRunFactory, ExportRun.Format, "export_runs_format_valid"),
    CheckCase("export_runs.status", ExportRunFactory, ExportRun.Status, "export_runs_status_valid"),
]
# events rows cannot be updated at all (test_database_rules.py)
UPDATE_CASES = [case for case in CHECK_CASES if case.factory is not EventFactory]


def case_id(case: CheckCase) -> str:
    return case.column


def violated_constraint(error: IntegrityError) -> str:
    return error.__cause__.diag.constraint_name


@pytest.mark.parametrize("case", CHECK_CASES, ids=case_id)
def test_check_constraint_rejects_an_insert_outside_the_choices(case: CheckCase) -> None:
    with pytest.raises(IntegrityError) as raised, transaction.atomic():
        case.factory(**case.values("bogus"))

    assert violated_constraint(raised.value) == case.constraint


@pytest.mark.parametrize("case", UPDATE_CASES, ids=case_id)
def test_check_constraint_rejects_an_update_outside_the_choices(case: CheckCase) -> None:
    row = case.factory(**case.values(case.choices.values[0]))

    with pytest.raises(IntegrityError) as raised, transaction.atomic():
        type(row).objects.filter(pk=row.pk).update(**case.values("bogus"))

    assert violated_constraint(raised.value) == case.constraint
    row.refresh_from_db()
    assert getattr(row, case.field) == case.choices.values[0]


@pytest.mark.parametrize("case", CHECK_CASES, ids=case_id)
def test_check_constraint_accepts_every_choice(case: CheckCase) -> None:
    rows = [case.factory(**case.values(value)) for value in case.choices.values]

    stored = type(rows[0]).objects.filter(pk__in=[row.pk for row in rows]).values_list(case.field, flat=True)
    assert sorted(stored) == sorted(case.choices.values)


@pytest.mark.django_db
def test_the_cancelled_steps_backfill_counts_cancelled_tasks(builtin_agents):
    import importlib

    from django.db import connection

    from orchestration.models import TaskExecution, Workflow
    from orchestration.services.workflows import workflow_submit

    backfill = importlib.import_module("orchestration.migrations.0015_backfill_cancelled_steps").BACKFILL
    workflow, _ = workflow_submit(
        spec={"name": "old", "tasks": [{"name": n, "agent": "echo"} for n in ("a", "b", "c")]}
    )
    TaskExecution.objects.filter(workflow=workflow, task_name__in=["a", "b"]).update(status="cancelled")
    Workflow.objects.filter(pk=workflow.pk).update(cancelled_steps=0)  # as 0009 left it
    with connection.cursor() as cursor:
        cursor.execute(backfill)
    assert Workflow.objects.get(pk=workflow.pk).cancelled_steps == 2


def domain_checks() -> list[tuple[type[models.Model], DomainCheck]]:
    return [
        (model, constraint)
        for model in django_apps.get_models()
        for constraint in model._meta.constraints
        if isinstance(constraint, DomainCheck)
    ]


@pytest.mark.parametrize(("model", "check"), domain_checks(), ids=lambda v: getattr(v, "name", ""))
def test_a_domain_check_is_its_columns_type_and_holds_its_check(model: type[models.Model], check: DomainCheck) -> None:
    """Every DomainCheck's column has the domain as its type and the domain holds the check under
    the constraint's name, validated; the table has no CHECK of that name. A later AlterField
    that gives the column Django's own type again (and so drops the check) fails here."""
    column = model._meta.get_field(check.field).column
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT a.atttypid::regtype::text,
                   (SELECT array_agg(conname || ':' || convalidated) FROM pg_constraint WHERE contypid = a.atttypid),
                   (SELECT count(*) FROM pg_constraint WHERE conrelid = a.attrelid AND conname = %s)
            FROM pg_attribute a WHERE a.attrelid = %s::regclass AND a.attname = %s
            """,
            [check.name, model._meta.db_table, column],
        )
        column_type, domain_checks, table_checks = cursor.fetchone()
        # What the column holds (a domain is described by its base type and length, precision
        # and scale) against what the field declares: a domain made for an older max_length.
        quote = connection.ops.quote_name
        field_type = model._meta.get_field(check.field).db_type(connection)
        cursor.execute(
            f"SELECT {quote(column)}, NULL::{field_type} FROM {quote(model._meta.db_table)} LIMIT 0"  # noqa: S608
        )
        held, declared = ((c.type_code, c.display_size, c.precision, c.scale) for c in cursor.description)

    assert column_type == check.domain_name(model)
    assert domain_checks == [f"{check.name}:true"]
    assert table_checks == 0
    assert held == declared


def test_the_hot_tables_keep_few_table_checks() -> None:
    """PostgreSQL plans a table's CHECKs again for every statement on it: on the tables written
    for every attempt, the ones a column's domain can hold are there."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT conrelid::regclass::text, array_agg(conname ORDER BY conname) FROM pg_constraint "
            "WHERE contype = 'c' AND conrelid IN ('workflows'::regclass, 'task_executions'::regclass, "
            "'task_attempts'::regclass, 'events'::regclass) GROUP BY 1"
        )
        checks = dict(cursor.fetchall())

    assert checks == {
        "workflows": ["workflows_counters_non_negative", "workflows_totals_non_negative"],
        "task_executions": ["task_executions_retries_range", "task_executions_usage_non_negative"],
        "task_attempts": ["task_attempts_finished_iff_not_running", "task_attempts_usage_non_negative"],
    }


@isolate_apps("orchestration")
def test_a_domain_check_on_a_new_table_and_its_condition_changed() -> None:
    """Created with its table (the domain applied once the table exists), enforced under its
    name; its condition changed as a migration does it (removed, then added): the wider check
    holds, and the table was neither rewritten nor its index rebuilt."""

    class Probe(models.Model):
        state = models.CharField(max_length=10, db_index=True)

        class Meta:
            app_label = "orchestration"
            db_table = "probe_domain_check"
            constraints = [
                DomainCheck(field="state", condition=models.Q(state__in=["a", "b"]), name="probe_state_valid")
            ]

        def __str__(self) -> str:
            return self.state

    def files() -> list[int]:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT relfilenode FROM pg_class WHERE oid = 'probe_domain_check'::regclass "
                "UNION ALL SELECT c.relfilenode FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "WHERE i.indrelid = 'probe_domain_check'::regclass ORDER BY 1"
            )
            return [row[0] for row in cursor.fetchall()]

    with connection.schema_editor() as editor:
        editor.create_model(Probe)
    Probe.objects.create(state="a")
    with pytest.raises(IntegrityError) as raised, transaction.atomic():
        Probe.objects.create(state="c")
    assert violated_constraint(raised.value) == "probe_state_valid"
    before = files()

    old = Probe._meta.constraints[0]
    wider = DomainCheck(field="state", condition=models.Q(state__in=["a", "b", "c"]), name="probe_state_valid")
    with connection.schema_editor() as editor:
        editor.remove_constraint(Probe, old)
        editor.add_constraint(Probe, wider)

    Probe.objects.create(state="c")
    with pytest.raises(IntegrityError) as raised, transaction.atomic():
        Probe.objects.create(state="d")
    assert violated_constraint(raised.value) == "probe_state_valid"
    assert files() == before
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_type WHERE typname = 'probe_domain_check_state'")
        assert cursor.fetchone()[0] == 1


@isolate_apps("orchestration")
def test_a_domain_check_names_only_its_own_column() -> None:
    class Pair(models.Model):
        low = models.IntegerField()
        high = models.IntegerField()

        class Meta:
            app_label = "orchestration"
            db_table = "probe_domain_pair"
            constraints = [DomainCheck(field="low", condition=models.Q(low__lte=models.F("high")), name="pair_order")]

        def __str__(self) -> str:
            return f"{self.low}..{self.high}"

    with (
        pytest.raises(ValueError, match="pair_order: a domain check may name only its field 'low'"),
        connection.schema_editor() as editor,
    ):
        editor.create_model(Pair)


@isolate_apps("orchestration")
def test_a_domain_check_created_with_its_table_keeps_a_percent_sign() -> None:
    """The domain and its check are deferred statements of CREATE TABLE, which Django runs
    without parameters: a % in the condition is written once."""

    class Rate(models.Model):
        label = models.CharField(max_length=10)

        class Meta:
            app_label = "orchestration"
            db_table = "probe_domain_percent"
            constraints = [
                DomainCheck(field="label", condition=models.Q(label__in=["50%", "100%"]), name="probe_label_valid")
            ]

        def __str__(self) -> str:
            return self.label

    with connection.schema_editor() as editor:
        editor.create_model(Rate)
    Rate.objects.create(label="50%")
    with pytest.raises(IntegrityError) as raised, transaction.atomic():
        Rate.objects.create(label="50%%")
    assert violated_constraint(raised.value) == "probe_label_valid"


def _column_and_domain_types(table: str, column: str) -> tuple[str, str | None]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT format_type(a.atttypid, a.atttypmod), format_type(t.typbasetype, t.typtypmod) "
            "FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
            "WHERE a.attrelid = %s::regclass AND a.attname = %s",
            [table, column],
        )
        return cursor.fetchone()


@isolate_apps("orchestration")
def test_a_domain_check_whose_condition_and_length_change_together() -> None:
    """A migration that adds a choice and widens the column (RemoveConstraint, AlterField,
    AddConstraint, as makemigrations writes it): the column ends with the new length, in its
    domain, under the new check."""

    class Probe(models.Model):
        state = models.CharField(max_length=10)

        class Meta:
            app_label = "orchestration"
            db_table = "probe_domain_widened"
            constraints = [DomainCheck(field="state", condition=models.Q(state__in=["a", "b"]), name="probe_state_ok")]

        def __str__(self) -> str:
            return self.state

    class Widened(models.Model):  # the same table, as the migration's new state has it
        state = models.CharField(max_length=30)

        class Meta:
            app_label = "orchestration"
            db_table = "probe_domain_widened"
            constraints = [
                DomainCheck(field="state", condition=models.Q(state__in=["a", "b", "a" * 25]), name="probe_state_ok")
            ]

        def __str__(self) -> str:
            return self.state

    with connection.schema_editor() as editor:
        editor.create_model(Probe)
    Probe.objects.create(state="a")
    with connection.schema_editor() as editor:
        editor.remove_constraint(Probe, Probe._meta.constraints[0])
        editor.alter_field(Probe, Probe._meta.get_field("state"), Widened._meta.get_field("state"), strict=True)
        editor.add_constraint(Widened, Widened._meta.constraints[0])

    assert _column_and_domain_types("probe_domain_widened", "state") == (
        "probe_domain_widened_state",
        "character varying(30)",
    )
    Widened.objects.create(state="a" * 25)
    with pytest.raises(IntegrityError) as raised, transaction.atomic():
        Widened.objects.create(state="c")
    assert violated_constraint(raised.value) == "probe_state_ok"


@isolate_apps("orchestration")
def test_a_domain_check_on_a_table_dropped_and_created_again() -> None:
    """DROP TABLE leaves the domain, with its check: a table created again (a migration
    reversed past its CreateModel and applied again) gets its domain and check anew."""

    class Probe(models.Model):
        state = models.CharField(max_length=10)

        class Meta:
            app_label = "orchestration"
            db_table = "probe_domain_again"
            constraints = [DomainCheck(field="state", condition=models.Q(state__in=["a"]), name="probe_again_ok")]

        def __str__(self) -> str:
            return self.state

    with connection.schema_editor() as editor:
        editor.create_model(Probe)
    with connection.schema_editor() as editor:
        editor.delete_model(Probe)
    with connection.schema_editor() as editor:
        editor.create_model(Probe)
    Probe.objects.create(state="a")
    with pytest.raises(IntegrityError) as raised, transaction.atomic():
        Probe.objects.create(state="b")
    assert violated_constraint(raised.value) == "probe_again_ok"


@isolate_apps("orchestration")
def test_a_domain_check_added_to_an_analyzed_table_keeps_the_columns_statistics() -> None:
    """ALTER COLUMN TYPE drops the column's planner statistics; an existing table's column
    that becomes its domain is analyzed again (autovacuum would wait for enough changed rows)."""

    class Probe(models.Model):
        state = models.CharField(max_length=10)

        class Meta:
            app_label = "orchestration"
            db_table = "probe_domain_statistics"

        def __str__(self) -> str:
            return self.state

    with connection.schema_editor() as editor:
        editor.create_model(Probe)
    Probe.objects.bulk_create([Probe(state="a" if i % 10 else "b") for i in range(200)])

    def statistics() -> list[str]:
        with connection.cursor() as cursor:
            cursor.execute("SELECT attname FROM pg_stats WHERE tablename = 'probe_domain_statistics' ORDER BY 1")
            return [row[0] for row in cursor.fetchall()]

    with connection.cursor() as cursor:
        cursor.execute("ANALYZE probe_domain_statistics")
    assert statistics() == ["id", "state"]
    with connection.schema_editor() as editor:
        editor.add_constraint(
            Probe, DomainCheck(field="state", condition=models.Q(state__in=["a", "b"]), name="probe_stats_ok")
        )
    assert _column_and_domain_types("probe_domain_statistics", "state")[0] == "probe_domain_statistics_state"
    assert statistics() == ["id", "state"]


@isolate_apps("orchestration")
@pytest.mark.django_db(transaction=True)
def test_a_column_given_its_domain_keeps_the_tables_triggers_working_in_other_sessions() -> None:
    """A session that ran a PL/pgSQL trigger of the table before one of its columns became its
    domain (a worker's, the web's: a migration runs while they do) had the trigger's expressions
    planned for the old type: PostgreSQL refused each later write of that session through the
    trigger ("type of parameter ... does not match that when preparing the plan") until it
    reconnected (workflows: calc_workflow_duration, every submission and transition)."""

    class Probe(models.Model):
        state = models.CharField(max_length=10)
        done = models.BooleanField(null=True)

        class Meta:
            app_label = "orchestration"
            db_table = "probe_domain_trigger"

        def __str__(self) -> str:
            return self.state

    with connection.schema_editor() as editor:
        editor.create_model(Probe)
    other = other_connection()
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "CREATE FUNCTION probe_domain_trigger_done() RETURNS trigger LANGUAGE plpgsql AS $$ "
                "BEGIN NEW.done := NEW.state IN ('b', 'c'); RETURN NEW; END $$"
            )
            cursor.execute(
                "CREATE TRIGGER probe_domain_trigger_done BEFORE INSERT OR UPDATE ON probe_domain_trigger "
                "FOR EACH ROW EXECUTE FUNCTION probe_domain_trigger_done()"
            )
        other.execute("INSERT INTO probe_domain_trigger (state) VALUES ('a')")
        with connection.schema_editor() as editor:
            editor.add_constraint(
                Probe, DomainCheck(field="state", condition=models.Q(state__in=["a", "b"]), name="probe_trigger_ok")
            )

        other.execute("UPDATE probe_domain_trigger SET state = 'b'")
        other.execute("INSERT INTO probe_domain_trigger (state) VALUES ('a')")
        assert other.execute("SELECT state, done FROM probe_domain_trigger ORDER BY id").fetchall() == [
            ("b", True),
            ("a", False),
        ]
        assert _column_and_domain_types("probe_domain_trigger", "state")[0] == "probe_domain_trigger_state"
    finally:
        other.close()
        with connection.schema_editor() as editor:
            editor.delete_model(Probe)
        with connection.cursor() as cursor:
            cursor.execute("DROP FUNCTION IF EXISTS probe_domain_trigger_done()")
            cursor.execute("DROP DOMAIN IF EXISTS probe_domain_trigger_state")
