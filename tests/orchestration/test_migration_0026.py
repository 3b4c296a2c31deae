"""Migration 0026 on a database recorded before it: the column and its check commit first, then
the backfill writes workflows batch by batch, holding their rows, not the table. In one
transaction with ADD COLUMN, the backfill held its exclusive lock, and so every read and write
of workflows (the API's, every task transition's), for as long as it ran. A run stopped during
the backfill is run again."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import psycopg
import pytest

from tests.engine import manage, manage_started, output_of, wait_for
from tests.pg import database_migrated_to

pytestmark = pytest.mark.django_db

# Rows as a deployment at migration 0025 holds them: a workflow with failed and timed-out tries
# that cost something, and one whose only try succeeded.
ROWS_AT_0025 = """
INSERT INTO agents (created_at, updated_at, id, name, role, description, category, version, executor, entrypoint,
    model, provider, url, api_key_env, system_prompt, capabilities, specialties, backstory, personality_emoji, config,
    status, definition_path, definition_hash, definition_root, total_tasks_completed, total_tokens_used,
    average_latency_ms, success_rate, metadata)
VALUES (now(), now(), 'echo', 'echo', '', '', '', '1', 'python', 'orchestration.runtime.builtin.echo', '', '', '', '',
    '', '[]', '[]', '', '', '{}', 'active', '', '', '', 0, 0, 0, 0, '{}');
INSERT INTO workflows (updated_at, workflow_id, name, description, workflow_type, status, priority, current_step,
    total_steps, completed_steps, failed_steps, cancelled_steps, state_data, step_results, assigned_agents,
    checkpoints, error_count, metadata, tags, spec, continue_on_failure, initiator, total_tokens_used, total_cost_usd)
SELECT now(), id, id, '', '', 'completed', 'normal', '', 1, 1, 0, 0, '{}', '{}', '[]', '[]', 0, '{}', '[]', '{}',
    false, '', 0, 1.75
FROM unnest(ARRAY['wf-retried', 'wf-clean']) AS id;
INSERT INTO task_executions (updated_at, execution_id, task_name, task_type, description, priority, status, depends_on,
    input_data, retry_count, max_retries, timeout_seconds, input_tokens, output_tokens, tokens_used, cost_usd,
    worker, metadata, agent_id, workflow_id)
SELECT now(), 'task-' || id, 't', '', '', 'normal', 'completed', '[]', '{}', 0, 3, 60, 0, 0, 0, 1.75, '', '{}',
    'echo', id
FROM unnest(ARRAY['wf-retried', 'wf-clean']) AS id;
INSERT INTO task_attempts (updated_at, attempt_number, status, error_class, worker, delivery_count, redelivered,
    input_tokens, output_tokens, tokens_used, cost_usd, started_at, finished_at, execution_id)
VALUES (now(), 1, 'failed', '', '', 1, false, 0, 0, 0, 0.25, now(), now(), 'task-wf-retried'),
       (now(), 2, 'timed_out', '', '', 1, false, 0, 0, 0, 0.5, now(), now(), 'task-wf-retried'),
       (now(), 3, 'succeeded', '', '', 1, false, 0, 0, 0, 1, now(), now(), 'task-wf-retried'),
       (now(), 1, 'succeeded', '', '', 1, false, 0, 0, 0, 1.75, now(), now(), 'task-wf-clean');
"""

# The backfill's write of wf-retried waits for the test's advisory lock: the moment to look at
# what the migration holds.
GATE = 260026
GATE_TRIGGER = f"""
CREATE FUNCTION probe_backfill_gate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_advisory_xact_lock_shared({GATE}); RETURN NEW; END $$;
CREATE TRIGGER probe_backfill_gate BEFORE UPDATE ON workflows
    FOR EACH ROW WHEN (OLD.workflow_id = 'wf-retried') EXECUTE FUNCTION probe_backfill_gate();
"""


@pytest.fixture
def database_at_0025() -> Iterator[tuple[str, dict[str, str]]]:
    """A database of its own, migrated to 0025 by manage.py, holding ROWS_AT_0025."""
    with database_migrated_to("orchestration", "0025") as (url, env):
        with psycopg.connect(url, autocommit=True) as db:
            db.execute(ROWS_AT_0025)
        yield url, env


def test_the_backfill_lets_workflows_be_read_and_a_stopped_run_is_run_again(
    database_at_0025: tuple[str, dict[str, str]],
) -> None:
    url, env = database_at_0025
    with psycopg.connect(url, autocommit=True) as test:
        test.execute(GATE_TRIGGER)
        test.execute("SELECT pg_advisory_lock(%s)", [GATE])
        run = manage_started("migrate", "orchestration", "0026", "--no-input", env=env)
        try:
            backfilling = wait_for(
                lambda: test.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event = 'advisory'"
                ).fetchone(),
                timeout=120,
                what="the backfill to reach wf-retried",
            )[0]
            held = test.execute(
                "SELECT mode FROM pg_locks WHERE relation = 'workflows'::regclass AND pid = %s AND granted",
                [backfilling],
            ).fetchall()
            assert ("AccessExclusiveLock",) not in held
            with psycopg.connect(url, autocommit=True) as reader:  # the API, a worker
                reader.execute("SET lock_timeout = '2s'")
                assert reader.execute("SELECT count(*) FROM workflows").fetchone() == (2,)
                assert reader.execute("SELECT wasted_cost_usd FROM workflows ORDER BY 1").fetchall() == [
                    (Decimal(0),),
                    (Decimal(0),),
                ]

            # Stopped there (killed, its connection lost): run again, it adds nothing twice.
            test.execute("SELECT pg_terminate_backend(%s)", [backfilling])
            assert run.wait(timeout=60) != 0
        finally:
            test.execute("SELECT pg_advisory_unlock(%s)", [GATE])
            output_of(run, timeout=60)
        manage("migrate", "orchestration", "0026", "--no-input", env=env)
        wasted = dict(test.execute("SELECT workflow_id, wasted_cost_usd FROM workflows").fetchall())
        assert wasted == {"wf-retried": Decimal("0.750000"), "wf-clean": Decimal(0)}
        checks = test.execute(
            "SELECT conname FROM pg_constraint WHERE conrelid = 'workflows'::regclass AND conname LIKE '%wasted%'"
        ).fetchall()
        assert checks == [("workflows_wasted_non_negative",)]
