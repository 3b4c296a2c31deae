"""Credential shapes in free text (a URL with an empty user, quoted keys and values, a
percent-encoded password) and key collisions, from the relay and consumer to the exports."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from django.core.management import call_command

from orchestration.event_types import EventType
from orchestration.models import TaskExecution
from tests.factories import AgentFactory, EventFactory, TaskExecutionFactory
from training_export.services.redaction import redact
from training_export.services.store import store_agent_event, store_agent_task

T0 = dt.datetime(2024, 3, 5, 10, 0, tzinfo=dt.UTC)
CANARY = "canary7f3a9c1e5b"

# Credentials in shapes the log filter (observability/logs.py) masks and the training data's
# default REDACT_PATTERNS did not: a URL with an empty user (Redis's usual `redis://:pw@host`),
# and key/value pairs whose key or value is quoted (JSON or a Python literal inside a string:
# a tool's output, an error message quoting a request body).
LEAKY_TEXTS = {
    "redis_url": f"connect to redis://:{CANARY}@cache:6379/0 failed",
    "json_text": f'upstream said {{"password": "{CANARY}", "user": "bob"}}',
    "python_literal": f"config was {{'api_key': '{CANARY}'}}",
    "quoted_value": f'api_key="{CANARY}"',
    "json_token": f'{{"access_token":"{CANARY}","token_type":"bearer"}}',
}


def test_default_patterns_mask_url_credentials_with_an_empty_user_and_quoted_key_values(db):
    for name, text in LEAKY_TEXTS.items():
        masked = redact(text)
        assert CANARY not in masked, f"{name}: {masked!r}"
    # Nothing else is lost: token counts and plain words are kept.
    assert redact('{"tokens_used": 12, "max_tokens": 5}') == '{"tokens_used": 12, "max_tokens": 5}'
    assert redact("the password policy: at least 12 characters") == "the password policy: at least 12 characters"


def test_credentials_in_text_never_reach_a_csv_partition_or_a_jsonl_export(db, settings, tmp_path: Path):
    settings.TRAINING_DATA_DIR = tmp_path / "training"
    settings.TRAINING_EXPORT_DIR = tmp_path / "exports"
    agent = AgentFactory()
    output = {"body": LEAKY_TEXTS["json_text"], "log": LEAKY_TEXTS["redis_url"]}
    task = TaskExecutionFactory(
        agent=agent,
        status=TaskExecution.Status.COMPLETED,
        output_data=output,
        error=LEAKY_TEXTS["python_literal"],
        started_at=T0,
        completed_at=T0,
    )
    EventFactory(event_type=EventType.TASK_COMPLETED, entity_id=task.execution_id, created_at=T0, payload=output)
    store_agent_task(
        execution_id=task.execution_id,
        agent_id=agent.id,
        task_name=task.task_name,
        status="completed",
        output_data=output,
        error=LEAKY_TEXTS["quoted_value"],
        recorded_at=T0,
    )
    store_agent_event(event_type="agent_started", payload={"tool_output": LEAKY_TEXTS["json_token"]}, created_at=T0)
    call_command(
        "export_training_data", "--type", "all", "--start", "2024-03-05", "--end", "2024-03-05", "--no-progress"
    )

    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".csv", ".jsonl")]
    assert len(files) >= 3
    for path in files:
        assert CANARY not in path.read_text("utf-8"), f"{path} leaks the credential"


def test_a_percent_encoded_password_of_a_configured_url_is_masked_as_the_password_it_is(db, settings):
    # A password with reserved characters is percent-encoded in the URL; the client sends (and
    # a connection dump, an error or a tool's output shows) the decoded password.
    settings.CELERY_BROKER_URL = "redis://:Xy%40Zq%2F7w-k9Lm@cache:6379/0"
    decoded = "Xy@Zq/7w-k9Lm"
    masked = redact(f"connection_kwargs={{'host': 'cache', 'password': {decoded!r}}} auth with {decoded}")
    assert decoded not in masked, masked


def test_a_masked_key_and_a_key_spelled_as_the_mask_keep_both_values_in_either_order(db):
    assert sorted(redact({"alice@example.org": 1, "[REDACTED]": 2}).values()) == [1, 2]
    assert sorted(redact({"[REDACTED]": 2, "alice@example.org": 1}).values()) == [1, 2]
