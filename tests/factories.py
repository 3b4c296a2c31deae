"""factory_boy factories for the operational models (test data only)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import factory
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.utils import timezone

from orchestration.models import (
    Agent,
    AgentInteraction,
    AgentMetric,
    AgentPlaygroundMessage,
    ApiKey,
    Event,
    TaskAttempt,
    TaskExecution,
    Workflow,
)
from training_export.models import ExportRun


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda o: f"{o.username}@example.com")
    password = factory.django.Password("correct horse battery staple")

    @factory.post_generation
    def role(self, create: bool, extracted: str | None, **kwargs: object) -> None:
        if create and extracted:
            self.groups.add(Group.objects.get(name=extracted))
            if not self.is_staff:
                self.is_staff = True
                self.save(update_fields=["is_staff"])


class AgentFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Agent
        django_get_or_create = ("id",)

    id = factory.Sequence(lambda n: f"agent-{n:03d}")
    name = factory.Sequence(lambda n: f"Agent {n}")
    role = "testing"
    executor = Agent.Executor.PYTHON
    entrypoint = "builtins.print"


class WorkflowFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Workflow

    name = factory.Sequence(lambda n: f"workflow {n}")
    workflow_type = "test"
    owner = factory.SubFactory(UserFactory)


class TaskExecutionFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = TaskExecution

    workflow = factory.SubFactory(WorkflowFactory)
    agent = factory.SubFactory(AgentFactory)
    task_name = factory.Sequence(lambda n: f"task-{n}")
    input_data = factory.LazyFunction(lambda: {"text": "hello"})


class TaskAttemptFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = TaskAttempt

    execution = factory.SubFactory(TaskExecutionFactory)
    attempt_number = factory.Sequence(lambda n: n + 1)
    started_at = factory.LazyFunction(timezone.now)
    status = TaskAttempt.Status.RUNNING

    class Params:
        succeeded = factory.Trait(
            status=TaskAttempt.Status.SUCCEEDED,
            finished_at=factory.LazyAttribute(lambda o: o.started_at + dt.timedelta(milliseconds=250)),
            duration_ms=250.0,
        )
        failed = factory.Trait(
            status=TaskAttempt.Status.FAILED,
            cause=TaskAttempt.Cause.ERROR,
            error_class="RuntimeError",
            error="boom",
            retryable=True,
            finished_at=factory.LazyAttribute(lambda o: o.started_at + dt.timedelta(milliseconds=100)),
            duration_ms=100.0,
            cost_usd=Decimal("0.001"),
        )


class EventFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Event

    event_type = "workflow_created"
    entity_type = "workflow"
    entity_id = factory.Sequence(lambda n: f"wf-{n}")
    payload = factory.LazyFunction(lambda: {"k": "v"})


class MessageFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = AgentPlaygroundMessage

    instance_id = "thread-1"
    agent = factory.SubFactory(AgentFactory)
    role = AgentPlaygroundMessage.Role.USER
    content = factory.Sequence(lambda n: f"message {n}")


class InteractionFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = AgentInteraction

    workflow = factory.SubFactory(WorkflowFactory)
    from_agent = factory.SubFactory(AgentFactory)
    to_agent = factory.SubFactory(AgentFactory)
    interaction_type = AgentInteraction.InteractionType.HANDOFF
    message = "over to you"


class MetricFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = AgentMetric

    agent = factory.SubFactory(AgentFactory)
    metric_type = AgentMetric.MetricType.LATENCY
    metric_value = 123.0
    metric_unit = "ms"
    recorded_at = factory.LazyFunction(timezone.now)


class ApiKeyFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = ApiKey

    prefix = factory.Sequence(lambda n: f"pfx{n:05d}")
    secret_hash = "0" * 64
    name = factory.Sequence(lambda n: f"key {n}")
    owner = factory.SubFactory(UserFactory)


class ExportRunFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = ExportRun

    data_type = ExportRun.DataType.EVENTS
    # A day of its own per run (counting back from yesterday): one pending run per type and
    # window is allowed (export_runs_one_pending_per_window).
    window_start = factory.Sequence(
        lambda n: timezone.now().replace(hour=0, minute=0, second=0, microsecond=0) - dt.timedelta(days=n + 1)
    )
    window_end = factory.LazyAttribute(lambda o: o.window_start + dt.timedelta(days=1))
