"""What an agent receives (TaskContext) and may return (AgentResult)."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: Decimal = Decimal("0")

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


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
    """Outputs of the tasks this one depends on, by task name."""
    agent_config: dict[str, Any] = field(default_factory=dict)
