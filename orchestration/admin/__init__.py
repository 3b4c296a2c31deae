"""The operations console: every orchestration model in the Django admin."""

from django.contrib import admin

from orchestration.admin import access, agents, conversations, events, tasks, workflows
from orchestration.admin.base import checked_filters_everywhere

# After access, which registers its own UserAdmin; training_export's admin has its own.
checked_filters_everywhere(admin.site)

__all__ = ["access", "agents", "conversations", "events", "tasks", "workflows"]
