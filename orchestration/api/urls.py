"""Routes of the orchestration API, mounted at /api/v1/ by config/api_router.py."""

from __future__ import annotations

from django.urls import path
from rest_framework.routers import SimpleRouter

from orchestration.api.agent_views import AgentViewSet, ConversationMessagesView
from orchestration.api.views import EventViewSet, MeSpendView, MeView, TaskViewSet, WorkflowViewSet
from training_export.api.views import ExportRunViewSet

router = SimpleRouter()
router.register("workflows", WorkflowViewSet, basename="workflow")
router.register("tasks", TaskViewSet, basename="task")
router.register("events", EventViewSet, basename="event")
router.register("agents", AgentViewSet, basename="agent")
router.register("exports", ExportRunViewSet, basename="export")

urlpatterns = [
    path("me/", MeView.as_view(), name="me"),
    path("me/spend/", MeSpendView.as_view(), name="me-spend"),
    path(
        "conversations/<str:instance_id>/messages/",
        ConversationMessagesView.as_view(),
        name="conversation-messages",
    ),
    *router.urls,
]
