from django.conf import settings
from django.db import models

from orchestration.ids import new_id, uuid7
from orchestration.models.agents import Agent
from orchestration.models.base import CreatedModel, in_choices
from orchestration.models.workflows import TaskAttempt, TaskExecution, Workflow


class AgentPlaygroundMessageRole(models.TextChoices):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class AgentPlaygroundMessage(CreatedModel):
    """One message of a conversation thread (`instance_id`), seed 000's agent playground."""

    Role = AgentPlaygroundMessageRole

    message_id = models.CharField(primary_key=True, max_length=255, default=new_id, editable=False)
    instance_id = models.CharField(max_length=255, help_text="the conversation thread")
    agent = models.ForeignKey(
        Agent,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="messages",
        db_column="agent_id",
        db_index=False,
    )
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="agent_messages",
        db_column="owner_id",
    )
    role = models.CharField(max_length=20, choices=Role.choices)
    content = models.TextField()
    tool_calls = models.JSONField(null=True, blank=True)
    tool_call_id = models.CharField(max_length=255, null=True, blank=True, help_text="for role=tool replies")
    is_error = models.BooleanField(default=False)
    execution = models.ForeignKey(
        TaskExecution,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="messages",
        db_column="execution_id",
    )
    attempt = models.ForeignKey(
        TaskAttempt, on_delete=models.SET_NULL, null=True, blank=True, related_name="messages", db_column="attempt_id"
    )
    input_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    tokens_used = models.BigIntegerField(default=0)
    metadata = models.JSONField(default=dict, blank=True)
    idempotency_key = models.CharField(
        max_length=255, null=True, blank=True, help_text="the Idempotency-Key a user message was posted with"
    )

    class Meta:
        db_table = "agent_playground_messages"
        ordering = ["instance_id", "created_at", "message_id"]
        indexes = [
            models.Index(fields=["instance_id", "created_at"], name="idx_messages_instance_created"),
            models.Index(fields=["agent", "-created_at"], name="idx_messages_agent_created"),
            # Retention's batches, oldest first up to its cutoff (migration 0040).
            models.Index(fields=["created_at"], name="idx_messages_created_at"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=in_choices("role", AgentPlaygroundMessageRole), name="agent_playground_messages_role_valid"
            ),
            models.CheckConstraint(
                condition=models.Q(input_tokens__gte=0, output_tokens__gte=0, tokens_used__gte=0),
                name="agent_playground_messages_tokens_non_negative",
            ),
            # Built CONCURRENTLY (migration 0042): a unique index, as Django makes a partial one.
            models.UniqueConstraint(
                fields=["owner", "idempotency_key"],
                condition=models.Q(idempotency_key__isnull=False),
                name="messages_owner_idempotency_key_unique",
            ),
        ]

    def __str__(self) -> str:
        # Not the content: this text is every page title, log entry and choice label.
        return f"{self.role} message {self.message_id} of {self.instance_id}"


class AgentPromptVersion(CreatedModel):
    """A system prompt and the tool schemas an agent's reply ran with, stored once under the
    sha256 of their canonical JSON. Assistant messages name theirs in
    `metadata["prompt_version"]`: the chat export pairs a turn with the prompt it was generated
    under, which an edit of the agent (or of a tool's schema in code) does not change."""

    sha256 = models.CharField(primary_key=True, max_length=64, editable=False)
    system_prompt = models.TextField(blank=True, default="")
    tools = models.JSONField(default=list, blank=True, help_text="OpenAI function-tool schemas, in the order sent")

    class Meta:
        db_table = "agent_prompt_versions"
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.sha256[:12]


class AgentInteractionInteractionType(models.TextChoices):
    HANDOFF = "handoff"
    COLLABORATION = "collaboration"
    REVIEW = "review"
    FEEDBACK = "feedback"


class AgentInteraction(CreatedModel):
    """Communication between agents in a workflow (seed 003's agent_interactions)."""

    InteractionType = AgentInteractionInteractionType

    id = models.UUIDField(primary_key=True, default=uuid7, editable=False)
    workflow = models.ForeignKey(
        Workflow,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="interactions",
        db_column="workflow_id",
        db_index=False,
    )
    execution = models.ForeignKey(
        TaskExecution,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="interactions",
        db_column="execution_id",
    )
    from_agent = models.ForeignKey(
        Agent, on_delete=models.PROTECT, related_name="interactions_sent", db_column="from_agent_id", db_index=False
    )
    to_agent = models.ForeignKey(
        Agent, on_delete=models.PROTECT, related_name="interactions_received", db_column="to_agent_id"
    )
    interaction_type = models.CharField(max_length=50, choices=InteractionType.choices)
    message = models.TextField(null=True, blank=True)
    payload = models.JSONField(null=True, blank=True)

    class Meta:
        db_table = "agent_interactions"
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["workflow"], name="idx_interactions_workflow"),
            models.Index(fields=["from_agent", "to_agent"], name="idx_interactions_agents"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=in_choices("interaction_type", AgentInteractionInteractionType),
                name="agent_interactions_type_valid",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.from_agent_id} -{self.interaction_type}-> {self.to_agent_id}"
