"""Outputs too large for PostgreSQL: an agent's output beyond AGENT_MAX_OUTPUT_BYTES fails its
attempt for good, a workflow's step_results stay within WORKFLOW_STEP_RESULTS_MAX_BYTES however
large its tasks' outputs are together, and a write PostgreSQL refuses for one of its limits fails
the attempt at once instead of being sent again. Real workers; PostgreSQL's 256 MiB jsonb limit
is stood for by a trigger raising the same error (SQLSTATE 54000) at a size a test can reach."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.db import connection

from orchestration.models import TaskAttempt, TaskExecution, Workflow
from tests.orchestration.edge_agents import edge_agent
from tests.orchestration.test_engine import attempts, finished, submit, task

LIMITS = {"AGENT_MAX_OUTPUT_BYTES": "400000", "WORKFLOW_STEP_RESULTS_MAX_BYTES": "500000"}
LIMIT_MESSAGE = "total size of jsonb object elements exceeds the maximum of 700000 bytes"


@pytest.fixture
def jsonb_limit(transactional_db: None) -> Iterator[None]:
    """PostgreSQL's jsonb limit, lowered: a workflow's step_results over 700 000 bytes of JSON, or
    an output naming `too_big`, are refused as PostgreSQL refuses a jsonb over 256 MiB."""
    refuse = f"RAISE EXCEPTION '{LIMIT_MESSAGE}' USING ERRCODE = 'program_limit_exceeded'"
    with connection.cursor() as cursor:
        for table, over in (
            ("workflows", "octet_length(NEW.step_results::text) > 700000"),
            ("task_executions", "NEW.output_data::text LIKE '%too_big%'"),
        ):
            cursor.execute(
                f"CREATE FUNCTION test_jsonb_limit_{table}() RETURNS trigger LANGUAGE plpgsql AS $$ "
                f"BEGIN IF {over} THEN {refuse}; END IF; RETURN NEW; END $$; "
                f"CREATE TRIGGER test_jsonb_limit BEFORE UPDATE ON {table} "
                f"FOR EACH ROW EXECUTE FUNCTION test_jsonb_limit_{table}()"
            )
    yield
    with connection.cursor() as cursor:
        for table in ("workflows", "task_executions"):
            cursor.execute(f"DROP TRIGGER test_jsonb_limit ON {table}; DROP FUNCTION test_jsonb_limit_{table}()")


@pytest.mark.django_db(transaction=True)
def test_python_output_over_the_cap_fails_for_good_before_anything_is_stored(engine):
    engine(env=LIMITS)
    edge_agent("blob", "blob")
    workflow = finished(submit({"name": "big", "agent": "blob", "input": {"bytes": 400_000}, "max_retries": 2}))
    big = task(workflow, "big")
    assert (workflow.status, big.status, big.output_data) == (Workflow.Status.FAILED, TaskExecution.Status.FAILED, None)
    assert big.error == (
        "PermanentError: agent output is 400012 bytes of JSON, more than AGENT_MAX_OUTPUT_BYTES (400000)"
    )
    [only] = attempts(workflow, "big")
    assert (only.status, only.retryable) == (TaskAttempt.Status.FAILED, False)


@pytest.mark.django_db(transaction=True)
def test_outputs_too_large_together_are_referenced_in_step_results_and_the_workflow_ends(engine, jsonb_limit):
    # The audit's workflow, scaled down: three parents whose outputs each fit, into a small sink;
    # copied together into step_results they were over the jsonb limit, and the workflow never ended.
    engine(env=LIMITS)
    edge_agent("blob", "blob")
    edge_agent("sink", "small_sink")
    parents = [{"name": f"p{i}", "agent": "blob", "input": {"bytes": 300_000}, "max_retries": 0} for i in (1, 2, 3)]
    sink = {"name": "sink", "agent": "sink", "depends_on": ["p1", "p2", "p3"], "max_retries": 0}
    workflow = finished(submit(*parents, sink), timeout=60)
    assert workflow.status == Workflow.Status.COMPLETED, workflow.error
    tasks = {t.task_name: t for t in TaskExecution.objects.filter(workflow=workflow)}
    first = min(("p1", "p2", "p3"), key=lambda name: (tasks[name].completed_at, tasks[name].execution_id))
    # In completion order, as long as they fit: the first parent, then the sink's small output.
    assert workflow.step_results[first] == {"blob": "x" * 300_000}
    assert workflow.step_results["sink"] == {"parents": ["p1", "p2", "p3"]}
    for name in {"p1", "p2", "p3"} - {first}:
        assert workflow.step_results[name] == {
            "output_omitted": {"task_name": name, "execution_id": tasks[name].execution_id, "bytes": 300_012}
        }
    assert [c["task"] for c in workflow.checkpoints][-1] == "sink" and len(workflow.checkpoints) == 4


@pytest.mark.django_db(transaction=True)
def test_a_write_over_a_database_limit_fails_the_attempt_at_once_naming_it(engine, jsonb_limit):
    engine()
    workflow = finished(submit({"name": "odd", "agent": "echo", "input": {"too_big": True}, "max_retries": 2}))
    odd = task(workflow, "odd")
    assert (workflow.status, odd.status) == (Workflow.Status.FAILED, TaskExecution.Status.FAILED)
    [only] = attempts(workflow, "odd")  # not tried again: the same write would be refused again
    assert (only.status, only.retryable) == (TaskAttempt.Status.FAILED, False)
    assert odd.error == only.error
    assert only.error.startswith(
        f"PermanentError: the agent's result could not be stored: OperationalError: {LIMIT_MESSAGE}"
    )
    assert LIMIT_MESSAGE in workflow.error
