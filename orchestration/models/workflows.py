from django.conf import settings
from django.db import models

from orchestration.errors import ERROR_CLASS_MAX_LENGTH
from orchestration.ids import new_id
from orchestration.models.agents import Agent
from orchestration.models.base import DomainCheck, TimestampedModel, in_choices


class Priority(models.TextChoices):
    """Maps onto the Celery queues of the same names."""

    CRITICAL = "critical"
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


def priority_rank() -> models.Case:
    """A priority as its place in the queue order (critical 0, high 1, normal 2, low 3), for
    ordering tasks by urgency: the values' own (alphabetical) order puts low before normal."""
    return models.Case(
        *(models.When(priority=value, then=models.Value(rank)) for rank, value in enumerate(Priority.values)),
        output_field=models.SmallIntegerField(),
    )


class WorkflowStatus(models.TextChoices):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Workflow(TimestampedModel):
    """A submitted workflow: a DAG of task executions. Columns follow seed 000, plus seed 003
    (initiator, failed_steps, duration_ms, token and cost totals) and seed 004 (owner, spec)."""

    Status = WorkflowStatus

    TERMINAL_STATUSES = (Status.COMPLETED, Status.FAILED, Status.CANCELLED)

    workflow_id = models.CharField(primary_key=True, max_length=255, default=new_id, editable=False)
    name = models.CharField(max_length=255)
    description = models.TextField(blank=True, default="")
    workflow_type = models.CharField(max_length=100, blank=True, default="")
    status = models.CharField(max_length=50, choices=Status.choices, default=Status.PENDING)
    priority = models.CharField(max_length=20, choices=Priority.choices, default=Priority.NORMAL)
    current_step = models.CharField(max_length=255, blank=True, default="")
    total_steps = models.IntegerField(default=0)
    completed_steps = models.IntegerField(default=0)
    failed_steps = models.IntegerField(default=0)
    cancelled_steps = models.IntegerField(default=0)
    state_data = models.JSONField(default=dict, blank=True)
    step_results = models.JSONField(
        default=dict, blank=True, help_text="outputs by task name, recorded when the workflow ends"
    )
    assigned_agents = models.JSONField(default=list, blank=True)
    checkpoints = models.JSONField(
        default=list, blank=True, help_text="completed tasks in completion order, recorded when the workflow ends"
    )
    error = models.TextField(null=True, blank=True)
    error_count = models.IntegerField(default=0)
    metadata = models.JSONField(default=dict, blank=True)
    tags = models.JSONField(default=list, blank=True)
    spec = models.JSONField(default=dict, blank=True, help_text="the workflow spec as submitted")
    continue_on_failure = models.BooleanField(default=False)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="workflows",
        db_column="owner_id",
        db_index=False,
    )
    initiator = models.CharField(max_length=100, blank=True, default="", help_text="user or system that started it")
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    deadline = models.DateTimeField(null=True, blank=True)
    duration_ms = models.BigIntegerField(
        null=True, blank=True, help_text="completed_at - started_at, set by the database when the workflow ends"
    )
    total_tokens_used = models.BigIntegerField(default=0)
    total_cost_usd = models.DecimalField(max_digits=14, decimal_places=6, default=0)
    wasted_cost_usd = models.DecimalField(
        max_digits=14,
        decimal_places=6,
        default=0,
        db_default=0,  # hand-written INSERTs (seed SQL, bulk loads) need not name it
        help_text="cost of its tries that failed, timed out or were lost (part of total_cost_usd)",
    )

    class Meta:
        db_table = "workflows"
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["status"], name="idx_workflows_status"),
            models.Index(fields=["-created_at"], name="idx_workflows_created_at"),
            models.Index(fields=["workflow_type"], name="idx_workflows_type"),
            models.Index(fields=["owner", "-created_at"], name="idx_workflows_owner_created"),
            # Retention's batches, the longest ended first up to its cutoff (migration 0040).
            models.Index(
                fields=["completed_at"],
                name="idx_workflows_ended",
                condition=models.Q(status__in=["completed", "failed", "cancelled"]),
            ),
        ]
        constraints = [
            DomainCheck(field="status", condition=in_choices("status", WorkflowStatus), name="workflows_status_valid"),
            DomainCheck(field="priority", condition=in_choices("priority", Priority), name="workflows_priority_valid"),
            models.CheckConstraint(
                condition=models.Q(total_steps__gte=0, completed_steps__gte=0, failed_steps__gte=0, error_count__gte=0),
                name="workflows_counters_non_negative",
            ),
            models.CheckConstraint(
                condition=models.Q(total_tokens_used__gte=0, total_cost_usd__gte=0),
                name="workflows_totals_non_negative",
            ),
            DomainCheck(
                field="wasted_cost_usd",
                condition=models.Q(wasted_cost_usd__gte=0),
                name="workflows_wasted_non_negative",
            ),
            models.UniqueConstraint(
                fields=["owner", "idempotency_key"],
                condition=models.Q(idempotency_key__isnull=False),
                name="workflows_owner_idempotency_key_unique",
            ),
            # Without an owner (manage.py submit_workflow) the one above never applies: a
            # unique index holds NULLs distinct. The key is unique among ownerless workflows too.
            models.UniqueConstraint(
                fields=["idempotency_key"],
                condition=models.Q(owner__isnull=True, idempotency_key__isnull=False),
                name="workflows_ownerless_idempotency_key_unique",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} [{self.status}]"

    @property
    def is_terminal(self) -> bool:
        return self.status in self.TERMINAL_STATUSES


class TaskExecutionStatus(models.TextChoices):
    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"


class TaskExecution(TimestampedModel):
    """One task of a workflow (seed 000's task_executions, plus seed 003's columns)."""

    Status = TaskExecutionStatus

    TERMINAL_STATUSES = (Status.COMPLETED, Status.FAILED, Status.TIMED_OUT, Status.CANCELLED)

    execution_id = models.CharField(primary_key=True, max_length=255, default=new_id, editable=False)
    workflow = models.ForeignKey(
        Workflow,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="tasks",
        db_column="workflow_id",
        db_index=False,
    )
    agent = models.ForeignKey(
        Agent, on_delete=models.PROTECT, related_name="task_executions", db_column="agent_id", db_index=False
    )
    parent_task = models.ForeignKey(
        "self",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="subtasks",
        db_column="parent_task_id",
        db_index=False,
    )
    task_name = models.CharField(max_length=255)
    task_type = models.CharField(max_length=100, blank=True, default="")
    description = models.TextField(blank=True, default="")
    priority = models.CharField(max_length=20, choices=Priority.choices, default=Priority.NORMAL)
    status = models.CharField(max_length=50, choices=Status.choices, default=Status.PENDING)
    depends_on = models.JSONField(default=list, blank=True, help_text="names of tasks in the same workflow")
    input_data = models.JSONField(default=dict, blank=True)
    output_data = models.JSONField(null=True, blank=True)
    error = models.TextField(null=True, blank=True)
    retry_count = models.IntegerField(default=0)
    max_retries = models.IntegerField(default=3)
    timeout_seconds = models.IntegerField(default=300)
    execution_time_ms = models.FloatField(null=True, blank=True)
    input_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    tokens_used = models.BigIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=14, decimal_places=6, default=0)
    celery_task_id = models.CharField(max_length=255, null=True, blank=True)
    worker = models.CharField(max_length=255, blank=True, default="")
    metadata = models.JSONField(default=dict, blank=True)
    queued_at = models.DateTimeField(null=True, blank=True)
    # When the task's last wait for its agent's max_concurrency ends: a claim that found the
    # agent at its limit sent the message again with a countdown, and sets this to when it comes
    # back (or to when a freed slot woke the task). Waiting for the agent is not waiting for a
    # worker, so the queue timeout counts from here; queued_at keeps when the task began to wait.
    deferred_at = models.DateTimeField(null=True, blank=True, editable=False)
    started_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "task_executions"
        ordering = ["created_at"]
        indexes = [
            # seed 001's index, widened: also serves "pending/unfinished tasks of a workflow"
            models.Index(fields=["workflow", "status"], name="idx_task_executions_workflow"),
            models.Index(fields=["status"], name="idx_task_executions_status"),
            models.Index(fields=["agent", "status", "-created_at"], name="idx_tasks_agent_status"),
            models.Index(fields=["agent", "-created_at"], name="idx_tasks_agent_created"),
            models.Index(fields=["-created_at"], name="idx_tasks_created_at"),
            models.Index(
                fields=["parent_task"], name="idx_tasks_parent", condition=models.Q(parent_task__isnull=False)
            ),
            # The line of tasks waiting for their agent's max_concurrency, in the order a freed
            # slot wakes them (services/execution.py, agent_slot_hand_on: the most urgent
            # priority first, then the longest waiting): only the waiting tasks of limited
            # agents, the only ones with deferred_at set (migrations 0036, 0039).
            models.Index(
                models.F("agent"),
                priority_rank(),
                models.F("queued_at"),
                models.F("execution_id"),
                name="idx_tasks_agent_priority_line",
                condition=models.Q(
                    status__in=[TaskExecutionStatus.QUEUED, TaskExecutionStatus.RETRYING], deferred_at__isnull=False
                ),
            ),
        ]
        constraints = [
            DomainCheck(
                field="status", condition=in_choices("status", TaskExecutionStatus), name="task_executions_status_valid"
            ),
            DomainCheck(
                field="priority", condition=in_choices("priority", Priority), name="task_executions_priority_valid"
            ),
            models.CheckConstraint(
                condition=models.Q(retry_count__gte=0, max_retries__gte=0, max_retries__lte=100),
                name="task_executions_retries_range",
            ),
            DomainCheck(
                field="timeout_seconds",
                condition=models.Q(timeout_seconds__gt=0, timeout_seconds__lte=86400),
                name="task_executions_timeout_range",
            ),
            models.CheckConstraint(
                condition=models.Q(input_tokens__gte=0, output_tokens__gte=0, tokens_used__gte=0, cost_usd__gte=0),
                name="task_executions_usage_non_negative",
            ),
            models.UniqueConstraint(fields=["workflow", "task_name"], name="task_executions_workflow_task_name_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.task_name} [{self.status}]"

    @property
    def is_terminal(self) -> bool:
        return self.status in self.TERMINAL_STATUSES


class TaskAttemptStatus(models.TextChoices):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    LOST = "lost"
    CANCELLED = "cancelled"


class TaskAttemptCause(models.TextChoices):
    ERROR = "error", "the agent raised an error"
    SOFT_TIMEOUT = "soft_timeout", "soft time limit exceeded"
    HARD_TIMEOUT = "hard_timeout", "hard time limit exceeded (child killed)"
    QUEUE_TIMEOUT = "queue_timeout", "waited in the queue too long"
    DEADLINE = "deadline", "the workflow deadline passed"
    WORKER_LOST = "worker_lost", "the worker died or vanished mid-attempt"
    CONNECTION_LOST = "connection_lost", "the worker lost its database connection mid-attempt"
    DATABASE_ERROR = "database_error", "the database refused a write of the worker's (not a lost connection)"
    REDELIVERY = "redelivery", "the broker redelivered the message"
    CANCELLED = "cancelled", "cancelled by a user"


class TaskAttempt(TimestampedModel):
    """One try at a task execution. Immutable once finished (a trigger rejects updates of a
    finished row), and unique per (execution, attempt_number): each try is recorded once."""

    Status = TaskAttemptStatus

    Cause = TaskAttemptCause

    # Tries whose cost bought nothing: "wasted spend" (DESIGN §4); a cancelled try's was the
    # user's choice. Plain strings: the rollup writes the tuple into its SQL.
    WASTED_STATUSES = ("failed", "timed_out", "lost")

    execution = models.ForeignKey(
        TaskExecution, on_delete=models.CASCADE, related_name="attempts", db_column="execution_id", db_index=False
    )
    # Integer fields with their checks in Meta (DomainCheck): a PositiveIntegerField would add
    # a table CHECK of its own, read back for every statement on the table.
    attempt_number = models.IntegerField()
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.RUNNING)
    cause = models.CharField(max_length=20, choices=Cause.choices, null=True, blank=True)
    error_class = models.CharField(max_length=ERROR_CLASS_MAX_LENGTH, blank=True, default="")
    retryable = models.BooleanField(null=True, blank=True)
    error = models.TextField(null=True, blank=True)
    traceback = models.TextField(null=True, blank=True)
    worker = models.CharField(max_length=255, blank=True, default="")
    # The process behind the node name: a restarted worker keeps its name (and in a container
    # often its pid), so the reaper tells it from the one that ran the attempt by these.
    worker_pid = models.IntegerField(null=True, blank=True, help_text="pid of the worker's main process")
    worker_started_at = models.DateTimeField(null=True, blank=True, help_text="when the worker's main process started")
    pool_pid = models.IntegerField(null=True, blank=True, help_text="pid of the pool process that ran the attempt")
    celery_task_id = models.CharField(max_length=255, null=True, blank=True)
    delivery_count = models.IntegerField(default=1)
    redelivered = models.BooleanField(default=False)
    timeout_seconds = models.IntegerField(null=True, blank=True, help_text="the limit this attempt ran under")
    input_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    tokens_used = models.BigIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=14, decimal_places=6, default=0)
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)
    duration_ms = models.FloatField(null=True, blank=True)

    class Meta:
        db_table = "task_attempts"
        ordering = ["execution_id", "attempt_number"]
        indexes = [
            models.Index(fields=["status", "started_at"], name="idx_attempts_status_started"),
            models.Index(fields=["celery_task_id"], name="idx_attempts_celery_task_id"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["execution", "attempt_number"], name="task_attempts_execution_number_unique"
            ),
            DomainCheck(
                field="status", condition=in_choices("status", TaskAttemptStatus), name="task_attempts_status_valid"
            ),
            DomainCheck(
                field="cause",
                condition=models.Q(cause__isnull=True) | in_choices("cause", TaskAttemptCause),
                name="task_attempts_cause_valid",
            ),
            DomainCheck(
                field="attempt_number", condition=models.Q(attempt_number__gte=1), name="task_attempts_number_positive"
            ),
            DomainCheck(
                field="delivery_count",
                condition=models.Q(delivery_count__gte=0),
                name="task_attempts_delivery_count_non_negative",
            ),
            models.CheckConstraint(
                condition=models.Q(status="running", finished_at__isnull=True)
                | (~models.Q(status="running") & models.Q(finished_at__isnull=False)),
                name="task_attempts_finished_iff_not_running",
            ),
            models.CheckConstraint(
                condition=models.Q(input_tokens__gte=0, output_tokens__gte=0, tokens_used__gte=0, cost_usd__gte=0),
                name="task_attempts_usage_non_negative",
            ),
        ]

    def __str__(self) -> str:
        return f"attempt {self.attempt_number} of {self.execution_id} [{self.status}]"
