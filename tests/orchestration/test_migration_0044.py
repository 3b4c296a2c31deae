"""Migration 0044 on a database recorded before it: each file agent's status and
max_concurrency are what its file last said (nothing else wrote them), and the first sync after
the upgrade goes on applying its files. With `definition_values` left empty, that sync took every
value differing from the file for an operator's and kept it."""

from __future__ import annotations

import json

import psycopg
import pytest

from tests.engine import manage
from tests.pg import database_migrated_to

pytestmark = [pytest.mark.django_db, pytest.mark.subprocess]

# Agents as load_agents left them at migration 0043: echo-x from a file saying max_concurrency 4,
# retired-x retired by a sync (its file was gone), api-x made through the API and deactivated.
ROWS_AT_0043 = """
INSERT INTO agents (created_at, updated_at, id, name, role, description, category, version, executor, entrypoint,
    model, provider, url, api_key_env, system_prompt, capabilities, specialties, backstory, personality_emoji, config,
    status, max_concurrency, definition_path, definition_hash, definition_root, total_tasks_completed,
    total_tokens_used, average_latency_ms, success_rate, metadata)
SELECT now(), now(), id, id, '', '', '', '', 'python', 'orchestration.runtime.builtin.echo', '', '', '', '', '', '[]',
    '[]', '', '', '{}', status, concurrency, path, '', %(root)s, 0, 0, 0, 100, '{}'
FROM (VALUES ('echo-x', 'active', 4, 'echo.json'), ('retired-x', 'inactive', NULL, 'retired.json'),
    ('api-x', 'inactive', NULL, '')) AS agent (id, status, concurrency, path)
"""
AGENT = {"executor": "python", "entrypoint": "orchestration.runtime.builtin.echo"}


def test_the_first_sync_after_the_upgrade_applies_the_files_as_every_sync_before_it(tmp_path) -> None:
    definitions = tmp_path / "definitions"
    definitions.mkdir()
    # The release bringing 0044 raises echo-x's limit, and brings retired-x's file back.
    (definitions / "echo.json").write_text(
        json.dumps({"id": "echo-x", "name": "echo-x", "max_concurrency": 8, **AGENT})
    )
    (definitions / "retired.json").write_text(json.dumps({"id": "retired-x", "name": "retired-x", **AGENT}))
    with database_migrated_to("orchestration", "0043") as (url, env):
        with psycopg.connect(url, autocommit=True) as db:
            db.execute(ROWS_AT_0043, {"root": str(definitions.resolve())})
            manage("migrate", "--no-input", env=env)

            out = manage("load_agents", str(definitions), env=env).stdout
            rows = db.execute(
                "SELECT id, status, max_concurrency, definition_values FROM agents ORDER BY id"
            ).fetchall()
        assert "kept" not in out, out
        assert rows == [
            ("api-x", "inactive", None, {}),  # not a file's: left alone
            ("echo-x", "active", 8, {"status": "active", "max_concurrency": 8}),
            ("retired-x", "active", None, {"status": "active", "max_concurrency": None}),
        ], out
