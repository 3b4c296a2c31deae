from orchestration.models.access import ApiKey
from orchestration.models.agents import Agent
from orchestration.models.conversations import AgentInteraction, AgentPlaygroundMessage, AgentPromptVersion
from orchestration.models.events import Event
from orchestration.models.metrics import AgentMetric
from orchestration.models.workflows import Priority, TaskAttempt, TaskExecution, Workflow

__all__ = [
    "Agent",
    "AgentInteraction",
    "AgentMetric",
    "AgentPlaygroundMessage",
    "AgentPromptVersion",
    "ApiKey",
    "Event",
    "Priority",
    "TaskAttempt",
    "TaskExecution",
    "Workflow",
]
