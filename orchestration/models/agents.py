from django.db import models

from orchestration.models.base import TimestampedModel, in_choices


class AgentExecutor(models.TextChoices):
    PYTHON = "python"
    HTTP = "http"
    LLM = "llm"


class AgentStatus(models.TextChoices):
    ACTIVE = "active"
    INACTIVE = "inactive"
    MAINTENANCE = "maintenance"


class Agent(TimestampedModel):
    """The synced, queryable copy of an agent definition (agents/definitions/*.json|yaml).

    Columns follow seed 003's `agents` table plus seed 004's definition fields. The stats
    columns are denormalised and refreshed by the rollup.
    """

    Executor = AgentExecutor

    Status = AgentStatus

    id = models.CharField(primary_key=True, max_length=50, help_text="e.g. akira-001")
    name = models.CharField(max_length=100)
    role = models.CharField(max_length=200, blank=True, default="")
    description = models.TextField(blank=True, default="")
    category = models.CharField(max_length=100, blank=True, default="")
    version = models.CharField(max_length=50, blank=True, default="")
    executor = models.CharField(max_length=20, choices=Executor.choices, default=Executor.PYTHON)
    entrypoint = models.CharField(
        max_length=255, blank=True, default="", help_text="python executor: dotted path to a callable"
    )
    model = models.CharField(max_length=100, blank=True, default="")
    provider = models.CharField(max_length=50, blank=True, default="")
    url = models.URLField(max_length=500, blank=True, default="")
    api_key_env = models.CharField(
        max_length=100, blank=True, default="", help_text="name of the environment variable holding the API key"
    )
    system_prompt = models.TextField(blank=True, default="")
    temperature = models.FloatField(null=True, blank=True)
    max_tokens = models.PositiveIntegerField(null=True, blank=True)
    max_concurrency = models.PositiveIntegerField(
        null=True, blank=True, help_text="tasks of this agent allowed to run at once (blank: no limit)"
    )
    capabilities = models.JSONField(default=list, blank=True)
    specialties = models.JSONField(default=list, blank=True)
    backstory = models.TextField(blank=True, default="")
    personality_emoji = models.CharField(max_length=10, blank=True, default="")
    config = models.JSONField(default=dict, blank=True, help_text="executor settings from the definition")
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.ACTIVE)
    definition_path = models.CharField(max_length=500, blank=True, default="")
    definition_hash = models.CharField(max_length=64, blank=True, default="")
    definition_root = models.CharField(
        max_length=1000,
        blank=True,
        default="",
        help_text="the directory `load_agents` read the definition from (empty: the default one); a sync "
        "deactivates only the agents of the directory it reads",
    )
    definition_values = models.JSONField(
        default=dict,
        # An older release's INSERT (while a new one migrates) or a hand-written one need not name it.
        db_default=models.Value({}, output_field=models.JSONField()),
        blank=True,
        help_text="the operator's fields (status, max_concurrency) as `load_agents` last read them from the "
        "definition: one whose value differs was set by an operator, and a sync keeps it",
    )
    total_tasks_completed = models.IntegerField(default=0)
    total_tokens_used = models.BigIntegerField(default=0)
    average_latency_ms = models.FloatField(default=0)
    success_rate = models.FloatField(default=100.0, help_text="percent, 0-100")
    metadata = models.JSONField(default=dict, blank=True)

    class Meta:
        db_table = "agents"
        ordering = ["id"]
        indexes = [models.Index(fields=["status"], name="idx_agents_status")]
        constraints = [
            models.CheckConstraint(condition=in_choices("status", AgentStatus), name="agents_status_valid"),
            models.CheckConstraint(condition=in_choices("executor", AgentExecutor), name="agents_executor_valid"),
            models.CheckConstraint(
                condition=models.Q(success_rate__gte=0, success_rate__lte=100), name="agents_success_rate_range"
            ),
            models.CheckConstraint(
                condition=models.Q(temperature__isnull=True) | models.Q(temperature__gte=0, temperature__lte=2),
                name="agents_temperature_range",
            ),
        ]
        permissions = [("execute_agent", "Can run tasks and conversations on agents (agent:execute)")]

    def __str__(self) -> str:
        return f"{self.id} ({self.name})"
