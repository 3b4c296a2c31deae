from django.db import models
from django.db.models.functions import Coalesce

from orchestration.ids import uuid7
from orchestration.models.agents import Agent
from orchestration.models.base import CreatedModel, in_choices


class AgentMetricMetricType(models.TextChoices):
    LATENCY = "latency", "average latency"
    LATENCY_P95 = "latency_p95", "95th percentile latency"
    TOKENS = "tokens"
    INPUT_TOKENS = "input_tokens"
    OUTPUT_TOKENS = "output_tokens"
    COST = "cost"
    WASTED_COST = "wasted_cost", "cost of failed attempts"
    TASKS = "tasks", "tasks finished"
    SUCCESS_RATE = "success_rate"
    ERROR_RATE = "error_rate"
    RETRIES = "retries"


class AgentMetricPeriod(models.TextChoices):
    HOUR = "hour"
    DAY = "day"


class AgentMetric(CreatedModel):
    """A rolled-up measurement of an agent over a period (seed 003's agent_metrics).

    The rollup writes one row per (agent, metric_type, period, period_start); the unique
    constraint makes re-running a rollup an upsert instead of a duplicate.
    """

    MetricType = AgentMetricMetricType

    Period = AgentMetricPeriod

    id = models.UUIDField(primary_key=True, default=uuid7, editable=False)
    agent = models.ForeignKey(
        Agent, on_delete=models.CASCADE, related_name="metrics", db_column="agent_id", db_index=False
    )
    metric_type = models.CharField(max_length=50, choices=MetricType.choices)
    metric_value = models.FloatField()
    metric_unit = models.CharField(max_length=20, null=True, blank=True)
    period = models.CharField(max_length=10, choices=Period.choices, null=True, blank=True)
    period_start = models.DateTimeField(null=True, blank=True)
    recorded_at = models.DateTimeField()
    context = models.JSONField(default=dict, blank=True)

    class Meta:
        db_table = "agent_metrics"
        ordering = ["-recorded_at"]
        indexes = [
            models.Index(fields=["agent", "metric_type", "-recorded_at"], name="idx_metrics_agent_type_time"),
            # Retention's batches, the oldest first up to its cutoff (migration 0040).
            models.Index(Coalesce("period_start", "recorded_at"), name="idx_metrics_age"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=in_choices("metric_type", AgentMetricMetricType), name="agent_metrics_type_valid"
            ),
            models.CheckConstraint(
                condition=models.Q(period__isnull=True) | in_choices("period", AgentMetricPeriod),
                name="agent_metrics_period_valid",
            ),
            models.CheckConstraint(
                condition=models.Q(period__isnull=True, period_start__isnull=True)
                | models.Q(period__isnull=False, period_start__isnull=False),
                name="agent_metrics_period_pair",
            ),
            models.UniqueConstraint(
                fields=["agent", "metric_type", "period", "period_start"],
                condition=models.Q(period__isnull=False),
                name="agent_metrics_one_per_period",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.agent_id} {self.metric_type}={self.metric_value}"
