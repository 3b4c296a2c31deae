"""Sample records for a first look at the operations console (`manage.py load_sample_data`).

Everything written here is marked `metadata.sample = true`. It is a recorded history, not a
run: a two-agent code-review workflow whose first attempt hit a provider rate limit and was
retried, with its attempts, events, conversation, hand-off and rolled-up metrics.
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass, field
from decimal import Decimal

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db import transaction
from django.utils import timezone

from orchestration.event_types import EntityType, EventType, Severity
from orchestration.models import (
    Agent,
    AgentInteraction,
    AgentMetric,
    AgentPlaygroundMessage,
    Event,
    TaskAttempt,
    TaskExecution,
    Workflow,
)

SAMPLE_WORKFLOW_ID = "sample-code-review-0001"
SAMPLE = {"sample": True}

SAMPLE_AGENTS = [
    {
        "id": "akira-001",
        "name": "Akira - Code Review Master",
        "role": "code_review",
        "description": "Reviews changes for security, performance and architecture.",
        "category": "engineering",
        "executor": Agent.Executor.LLM,
        "provider": "anthropic",
        "model": "claude-3-5-sonnet-20241022",
        "api_key_env": "ANTHROPIC_API_KEY",
        "system_prompt": "You are a meticulous senior code reviewer.",
        "temperature": 0.2,
        "max_tokens": 4096,
        "specialties": ["security", "performance", "architecture"],
        "capabilities": ["code_review"],
    },
    {
        "id": "yuki-002",
        "name": "Yuki - Test Engineering Specialist",
        "role": "test_engineering",
        "description": "Writes and reviews tests for a change.",
        "category": "engineering",
        "executor": Agent.Executor.LLM,
        "provider": "openai",
        "model": "gpt-4o-mini",
        "api_key_env": "OPENAI_API_KEY",
        "system_prompt": "You write focused, deterministic tests.",
        "temperature": 0.2,
        "max_tokens": 4096,
        "specialties": ["unit_testing", "integration_testing"],
        "capabilities": ["test_generation"],
    },
]


@dataclass
class SampleDataResult:
    created: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    admin_username: str = "admin"
    admin_password: str | None = None


def _event(when: dt.datetime, event_type: str, entity_type: str, entity_id: str, **fields: object) -> Event:
    return Event(
        event_type=event_type,
        entity_type=entity_type,
        entity_id=entity_id,
        workflow_id=SAMPLE_WORKFLOW_ID,
        created_at=when,
        source="sample",
        **fields,
    )


@transaction.atomic
def sample_data_load(*, now: dt.datetime | None = None) -> SampleDataResult:
    """Create the sample agents, an admin user and one recorded workflow, idempotently."""
    now = now or timezone.now()
    result = SampleDataResult()

    for spec in SAMPLE_AGENTS:
        _, created = Agent.objects.get_or_create(id=spec["id"], defaults={**spec, "metadata": SAMPLE})
        (result.created if created else result.skipped).append(f"agent {spec['id']}")

    user_model = get_user_model()
    admin = user_model.objects.filter(username=result.admin_username).first()
    if admin is None:
        result.admin_password = secrets.token_urlsafe(12)
        admin = user_model.objects.create_superuser(
            username=result.admin_username, email="admin@example.com", password=result.admin_password
        )
        admin.groups.add(Group.objects.get(name="admin"))
        result.created.append(f"superuser {result.admin_username}")
    else:
        result.skipped.append(f"user {result.admin_username} (already exists)")

    if Workflow.objects.filter(workflow_id=SAMPLE_WORKFLOW_ID).exists():
        result.skipped.append(f"workflow {SAMPLE_WORKFLOW_ID}")
        return result

    _create_sample_workflow(owner=admin, now=now)
    result.created.append(f"workflow {SAMPLE_WORKFLOW_ID} with 2 tasks, 3 attempts, events and a conversation")
    return result


def _create_sample_workflow(*, owner: object, now: dt.datetime) -> None:
    t0 = now - dt.timedelta(minutes=10)
    ms = dt.timedelta(milliseconds=1)
    # The record is backdated: its rows say when they were created (the INSERT's time would put
    # the workflow's creation after its end), at its workflow_created event.
    created = t0 - 5 * ms
    akira, yuki = Agent.objects.get(id="akira-001"), Agent.objects.get(id="yuki-002")
    review_cost, retry_cost, tests_cost = Decimal("0.004215"), Decimal("0.000900"), Decimal("0.001830")

    workflow = Workflow.objects.create(
        workflow_id=SAMPLE_WORKFLOW_ID,
        name="Review pull request #42",
        description="Review a change, then write tests for what the review asked for.",
        workflow_type="code_review",
        status=Workflow.Status.COMPLETED,
        owner=owner,
        initiator="admin",
        total_steps=2,
        completed_steps=2,
        current_step="tests",
        assigned_agents=[akira.id, yuki.id],
        tags=["sample", "code_review"],
        metadata=SAMPLE,
        spec={
            "name": "Review pull request #42",
            "tasks": [
                {"name": "review", "agent": akira.id, "input": {"pull_request": 42}},
                {"name": "tests", "agent": yuki.id, "depends_on": ["review"]},
            ],
        },
        step_results={"review": {"verdict": "changes requested"}, "tests": {"tests_written": 3}},
        created_at=created,
        started_at=t0,
        completed_at=t0 + 9200 * ms,
        total_tokens_used=1523 + 310 + 880,
        total_cost_usd=review_cost + retry_cost + tests_cost,
        # The review's first try failed after paying: an error, and wasted spend, as the engine
        # records such a try (its agent's rolled-up wasted_cost below counts it too).
        error_count=1,
        wasted_cost_usd=retry_cost,
    )
    review = TaskExecution.objects.create(
        workflow=workflow,
        agent=akira,
        task_name="review",
        task_type="code_review",
        status=TaskExecution.Status.COMPLETED,
        input_data={"pull_request": 42, "diff_lines": 180},
        output_data={"verdict": "changes requested", "findings": ["unchecked input in parse()"]},
        retry_count=1,
        max_retries=3,
        timeout_seconds=120,
        execution_time_ms=5100.0,
        input_tokens=1410,
        output_tokens=423,
        tokens_used=1833,
        cost_usd=review_cost + retry_cost,
        worker="celery@worker-1",
        metadata=SAMPLE,
        created_at=created,
        queued_at=t0,
        started_at=t0 + 20 * ms,
        completed_at=t0 + 6000 * ms,
    )
    tests = TaskExecution.objects.create(
        workflow=workflow,
        agent=yuki,
        task_name="tests",
        task_type="test_generation",
        depends_on=["review"],
        status=TaskExecution.Status.COMPLETED,
        input_data={"review": "$review.output"},
        output_data={"tests_written": 3},
        max_retries=3,
        timeout_seconds=120,
        execution_time_ms=3150.0,
        input_tokens=600,
        output_tokens=280,
        tokens_used=880,
        cost_usd=tests_cost,
        worker="celery@worker-2",
        metadata=SAMPLE,
        created_at=created,
        queued_at=t0 + 6010 * ms,
        started_at=t0 + 6040 * ms,
        completed_at=t0 + 9190 * ms,
    )
    TaskAttempt.objects.bulk_create(
        [
            TaskAttempt(
                execution=review,
                attempt_number=1,
                status=TaskAttempt.Status.FAILED,
                cause=TaskAttempt.Cause.ERROR,
                error_class="RateLimitError",
                retryable=True,
                error="429 Too Many Requests (retry after 1 s)",
                worker="celery@worker-1",
                timeout_seconds=120,
                input_tokens=310,
                tokens_used=310,
                cost_usd=retry_cost,
                created_at=t0 + 20 * ms,
                started_at=t0 + 20 * ms,
                finished_at=t0 + 900 * ms,
                duration_ms=880.0,
            ),
            TaskAttempt(
                execution=review,
                attempt_number=2,
                status=TaskAttempt.Status.SUCCEEDED,
                worker="celery@worker-1",
                timeout_seconds=120,
                input_tokens=1100,
                output_tokens=423,
                tokens_used=1523,
                cost_usd=review_cost,
                created_at=t0 + 1780 * ms,
                started_at=t0 + 1780 * ms,
                finished_at=t0 + 6000 * ms,
                duration_ms=4220.0,
            ),
            TaskAttempt(
                execution=tests,
                attempt_number=1,
                status=TaskAttempt.Status.SUCCEEDED,
                worker="celery@worker-2",
                timeout_seconds=120,
                input_tokens=600,
                output_tokens=280,
                tokens_used=880,
                cost_usd=tests_cost,
                created_at=t0 + 6040 * ms,
                started_at=t0 + 6040 * ms,
                finished_at=t0 + 9190 * ms,
                duration_ms=3150.0,
            ),
        ]
    )
    wf, task = EntityType.WORKFLOW, EntityType.TASK
    Event.objects.bulk_create(
        [
            _event(t0 - 5 * ms, EventType.WORKFLOW_CREATED, wf, workflow.workflow_id, payload={"tasks": 2}),
            _event(t0, EventType.WORKFLOW_STARTED, wf, workflow.workflow_id),
            _event(t0, EventType.TASK_QUEUED, task, review.execution_id, agent_id=akira.id),
            _event(t0 + 20 * ms, EventType.TASK_STARTED, task, review.execution_id, agent_id=akira.id),
            _event(
                t0 + 900 * ms,
                EventType.TASK_RETRYING,
                task,
                review.execution_id,
                agent_id=akira.id,
                severity=Severity.WARNING,
                payload={"attempt": 1, "error_class": "RateLimitError", "countdown_s": 0.88},
            ),
            _event(t0 + 1780 * ms, EventType.TASK_STARTED, task, review.execution_id, agent_id=akira.id),
            _event(
                t0 + 6000 * ms,
                EventType.TASK_COMPLETED,
                task,
                review.execution_id,
                agent_id=akira.id,
                payload={"attempt": 2},
            ),
            _event(
                t0 + 6005 * ms,
                EventType.AGENT_INTERACTION,
                EntityType.AGENT,
                akira.id,
                agent_id=akira.id,
                payload={"type": "handoff", "to": yuki.id},
            ),
            _event(t0 + 6010 * ms, EventType.TASK_QUEUED, task, tests.execution_id, agent_id=yuki.id),
            _event(t0 + 6040 * ms, EventType.TASK_STARTED, task, tests.execution_id, agent_id=yuki.id),
            _event(t0 + 9190 * ms, EventType.TASK_COMPLETED, task, tests.execution_id, agent_id=yuki.id),
            _event(t0 + 9200 * ms, EventType.WORKFLOW_COMPLETED, wf, workflow.workflow_id),
        ]
    )
    AgentInteraction.objects.create(
        workflow=workflow,
        execution=review,
        from_agent=akira,
        to_agent=yuki,
        interaction_type=AgentInteraction.InteractionType.HANDOFF,
        message="Review done: please cover the unchecked input in parse() with tests.",
        payload={"findings": 1},
    )
    thread = f"{SAMPLE_WORKFLOW_ID}:review"
    turns = [
        ("system", akira.system_prompt, 0),
        ("user", "Review pull request #42 (180 changed lines).", 0),
        ("assistant", "Changes requested: parse() does not check its input.", 423),
    ]
    AgentPlaygroundMessage.objects.bulk_create(
        [
            AgentPlaygroundMessage(
                instance_id=thread,
                agent=akira,
                owner=owner,
                role=role,
                content=content,
                execution=review,
                output_tokens=tokens,
                tokens_used=tokens,
                created_at=t0 + (1780 + i) * ms,
                metadata=SAMPLE,
            )
            for i, (role, content, tokens) in enumerate(turns)
        ]
    )
    hour = t0.replace(minute=0, second=0, microsecond=0)
    AgentMetric.objects.bulk_create(
        [
            AgentMetric(
                agent=agent,
                metric_type=metric_type,
                metric_value=value,
                metric_unit=unit,
                period=AgentMetric.Period.HOUR,
                period_start=hour,
                recorded_at=now,
                context=SAMPLE,
            )
            for agent, metric_type, value, unit in [
                (akira, AgentMetric.MetricType.LATENCY, 4220.0, "ms"),
                (akira, AgentMetric.MetricType.COST, float(review_cost + retry_cost), "usd"),
                (akira, AgentMetric.MetricType.WASTED_COST, float(retry_cost), "usd"),
                (yuki, AgentMetric.MetricType.LATENCY, 3150.0, "ms"),
                (yuki, AgentMetric.MetricType.COST, float(tests_cost), "usd"),
            ]
        ]
    )
