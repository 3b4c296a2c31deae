"""What an agent receives (TaskContext) and may return (AgentResult)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestration.runtime.collaboration import Peers
    from orchestration.runtime.tools import ToolBox


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: Decimal = Decimal("0")

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def add(self, other: Usage) -> None:
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cost_usd += other.cost_usd

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cost_usd + other.cost_usd,
        )


@dataclass
class AgentResult:
    """An agent may return a plain JSON mapping, or this to report usage as well."""

    output: dict[str, Any]
    usage: Usage = field(default_factory=Usage)


@dataclass(frozen=True)
class TaskContext:
    execution_id: str
    workflow_id: str | None
    task_name: str
    agent_id: str
    attempt_number: int
    timeout_seconds: int
    upstream: dict[str, Any]
    """Outputs of the tasks this one depends on, by task name, in its depends_on order."""
    agent_config: dict[str, Any] = field(default_factory=dict)
    tools: ToolBox | None = None
    """The tools this agent may call (its definition's config.tools); each call is recorded."""
    peers: Peers | None = None
    """Hand-offs, reviews and feedback to other agents, each recorded as an interaction."""
    conversation: Conversation | None = None
    """Set when the task is a conversation turn (a reply to a user message)."""
    spend: Usage = field(default_factory=Usage)
    """Usage of the agents this one delegated to, added to the attempt's own."""
    depth: int = 0
    """How many hand-offs deep this agent runs (0: the task's own agent)."""
    meter: Callable[[Usage], None] | None = None
    """Told each amount as soon as it is paid (a model's answer, an agent service's result),
    so that spend stays on record if the attempt never gets to report it (cancelled,
    killed). The attempt's final usage replaces what was metered; it is not added to it."""

    def paid(self, usage: Usage) -> None:
        if self.meter is not None and (usage.tokens or usage.cost_usd):
            self.meter(usage)


@dataclass
class Conversation:
    """A conversation turn: the thread so far and what the agent says in this attempt."""

    instance_id: str
    message_id: str
    """The user message being answered."""
    history: list[dict[str, Any]]
    """The thread in OpenAI chat shape (user, assistant with tool_calls, tool), oldest first,
    ending with the user message; messages of failed attempts are left out."""
    transcript: list[dict[str, Any]] = field(default_factory=list)
    """Messages produced by this attempt before the final reply (tool calls and results)."""
    missing: bool = False
    """The user message was deleted (retention) while its reply waited: nothing to answer."""
    history_from: str | None = None
    """The message_id of the history's first message: where what the agent was sent began,
    stored on its turns for the chat export."""
    prompt: dict[str, Any] | None = None
    """What the agent answered with besides the thread, {"system_prompt", "tools"}: set by
    the executor (the llm executor: what it sent), stored as the reply's prompt version."""
