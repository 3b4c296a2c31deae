"""The operations console: every orchestration model in the Django admin."""

from orchestration.admin import access, agents, conversations, events, tasks, workflows

__all__ = ["access", "agents", "conversations", "events", "tasks", "workflows"]
