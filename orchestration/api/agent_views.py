"""Agents (read by every role, changed by admins) and conversations with them."""

from __future__ import annotations

from django.db.models import QuerySet
from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, extend_schema, extend_schema_view, inline_serializer
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from orchestration.api import idempotency
from orchestration.api.errors import spec_problem
from orchestration.api.exceptions import Conflict
from orchestration.api.filters import AgentFilter, check_list_parameters
from orchestration.api.pagination import KeysetPagination
from orchestration.api.permissions import ActionPermission, HasRole, has_permission, is_admin
from orchestration.api.schema import problem_responses
from orchestration.api.serializers import (
    AGENT_WRITABLE,
    AgentCreateSerializer,
    AgentSerializer,
    AgentStatsQuerySerializer,
    AgentStatsSerializer,
    AgentUpdateSerializer,
    MessageAcceptedSerializer,
    MessagePostSerializer,
    MessageSerializer,
    NoBodySerializer,
)
from orchestration.api.views import EXECUTE, PAGE_PARAMETERS, READ, ApiMixin, WriteBodyMixin, ordering_parameter
from orchestration.errors import ConversationBusy, ConversationError, ConversationTaken
from orchestration.models import Agent, AgentPlaygroundMessage, ApiKey
from orchestration.selectors import agent_stats, conversation_messages, conversation_thread
from orchestration.services.access import AGENT_MANAGE
from orchestration.services.agent_registry import (
    agent_check_editable,
    agent_create,
    agent_deactivate,
    agent_update,
)

ANY_ROLE = "any"
# The one order each list has; `?ordering=` takes it (anything else is a 400), as the schema says.
AGENT_ORDERINGS = {"id": ("id",)}
MESSAGE_ORDERINGS = {"created_at": ("created_at", "message_id")}
AGENT_LIST = "agent:list"


class AgentPermission(ActionPermission):
    """Reading agents is open to every role (seed 004's agent:list is the viewer's, and a
    developer must see what it can run), their statistics (tasks' tokens and cost) need
    workflow:read too; changing them needs agent:manage (admins)."""

    def has_permission(self, request: Request, view: object) -> bool:
        if getattr(view, "action", None) in ("list", "retrieve", "stats"):
            if not HasRole().has_permission(request, view):
                self.message = HasRole.message
                return False
            # Every role reads agents, but a key narrowed to some permissions grants only those.
            narrowed = request.auth.permissions if isinstance(request.auth, ApiKey) else None
            if narrowed and "*" not in narrowed and AGENT_LIST not in narrowed:
                self.message = f"This API key does not grant {AGENT_LIST}, which this operation needs."
                return False
            # Statistics are the tokens and cost of tasks: like every other read of them (me/spend)
            # they need workflow:read, which every role has but a narrowed key may not.
            if view.action == "stats" and not has_permission(request, READ):
                self.message = f"This API key does not grant {READ}, which this operation needs."
                return False
            return True
        return super().has_permission(request, view)


FILE_DEFINED = (
    "Only agents created through the API can be changed here: an agent loaded from a definition file "
    "(`definition_path` set) is a 409, since the next `manage.py load_agents` would undo the change; "
    "edit its file instead."
)

AGENT_EXAMPLE = {
    "id": "summariser-001",
    "name": "Summariser",
    "executor": "llm",
    "provider": "openai",
    "model": "gpt-4o-mini",
    "api_key_env": "OPENAI_API_KEY",
    "system_prompt": "Summarise the input in three sentences.",
    "temperature": 0.2,
    "max_tokens": 512,
}


@extend_schema_view(
    list=extend_schema(
        summary="List agents",
        parameters=[ordering_parameter(AGENT_ORDERINGS, "id")],
        responses={200: AgentSerializer(many=True), **problem_responses(400, 401, 403, 429)},
    ),
    retrieve=extend_schema(
        summary="An agent", responses={200: AgentSerializer, **problem_responses(401, 403, 404, 429)}
    ),
)
class AgentViewSet(ApiMixin, WriteBodyMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Agents: every role reads them; admins create, change and deactivate them."""

    permission_classes = [AgentPermission]
    required_permissions = {
        "create": AGENT_MANAGE,
        "update": AGENT_MANAGE,
        "partial_update": AGENT_MANAGE,
        "deactivate": AGENT_MANAGE,
    }
    queryset = Agent.objects.all()
    serializer_class = AgentSerializer
    request_serializers = {
        "create": AgentCreateSerializer,
        "update": AgentUpdateSerializer,
        "partial_update": AgentUpdateSerializer,
        "deactivate": NoBodySerializer,
    }
    filterset_class = AgentFilter
    lookup_value_regex = "[^/]+"
    orderings = AGENT_ORDERINGS
    default_ordering = "id"

    @extend_schema(
        summary="Create an agent (admins)",
        request=AgentCreateSerializer,
        parameters=[
            OpenApiParameter(
                "Location", OpenApiTypes.URI, OpenApiParameter.HEADER, description="the agent created", response=[201]
            )
        ],
        examples=[OpenApiExample("an llm agent", value=AGENT_EXAMPLE, request_only=True)],
        responses={201: AgentSerializer, **problem_responses(400, 401, 403, 429)},
    )
    def create(self, request: Request) -> Response:
        data = AgentCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        agent = agent_create(fields=dict(data.validated_data), actor=request.user)
        location = request.build_absolute_uri(reverse("api:agent-detail", kwargs={"pk": agent.pk}))
        return Response(AgentSerializer(agent).data, status=status.HTTP_201_CREATED, headers={"Location": location})

    @extend_schema(
        summary="Replace an agent's settings (admins)",
        request=AgentUpdateSerializer,
        description="Every setting at once: one left out goes back to its default (PATCH changes only "
        "those sent). " + FILE_DEFINED,
        responses={200: AgentSerializer, **problem_responses(400, 401, 403, 404, 409, 429)},
    )
    def update(self, request: Request, pk: str) -> Response:
        return self._update(request, pk, partial=False)

    @extend_schema(
        summary="Change some of an agent's settings (admins)",
        request=AgentUpdateSerializer(partial=True),
        description=FILE_DEFINED,
        responses={200: AgentSerializer, **problem_responses(400, 401, 403, 404, 409, 429)},
    )
    def partial_update(self, request: Request, pk: str) -> Response:
        return self._update(request, pk, partial=True)

    def _update(self, request: Request, pk: str, *, partial: bool) -> Response:
        agent = self.get_object()
        agent_check_editable(agent)  # before the body: an invalid body for such an agent is a 409 too
        data = AgentUpdateSerializer(agent, data=request.data, partial=partial)
        data.is_valid(raise_exception=True)
        # PUT replaces the settings: a field left out goes back to its default, as for a new agent.
        replace = () if partial else AGENT_WRITABLE
        agent = agent_update(agent_id=agent.pk, fields=dict(data.validated_data), actor=request.user, replace=replace)
        return Response(AgentSerializer(agent).data)

    @extend_schema(
        summary="Deactivate an agent (admins)",
        description="Takes no body (none, or `{}`): any other is a 400. " + FILE_DEFINED,
        request=None,
        responses={200: AgentSerializer, **problem_responses(400, 401, 403, 404, 409, 413, 415, 429)},
    )
    @action(detail=True, methods=["post"])
    def deactivate(self, request: Request, pk: str) -> Response:
        agent = self.get_object()
        NoBodySerializer(data=request.data).is_valid(raise_exception=True)
        agent = agent_deactivate(agent_id=agent.pk, actor=request.user)
        return Response(AgentSerializer(agent).data)

    @extend_schema(
        summary="An agent's statistics over a window",
        description="Seed 003's aggregates over tasks created in [since, until): completed tasks, average "
        "latency, tokens, cost, failures and success rate. Default window: the last 24 hours. Non-admins get "
        "those of their own tasks (their workflows' and their conversations' replies); admins, every user's.",
        parameters=[AgentStatsQuerySerializer],
        filters=False,
        responses={200: AgentStatsSerializer, **problem_responses(400, 401, 403, 404, 429)},
    )
    @action(detail=True, methods=["get"], filterset_class=None)
    def stats(self, request: Request, pk: str) -> Response:
        agent = self.get_object()
        query = AgentStatsQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        # Of the caller's own tasks unless an admin asks: over every user's, a window as narrow as
        # one task's created_at (a microsecond) would tell another user's task, its tokens and cost.
        owner_id = None if is_admin(request) else request.user.pk
        stats = agent_stats(agent_id=agent.pk, owner_id=owner_id, **query.validated_data)
        return Response(AgentStatsSerializer(stats).data)


# An APIView's answer is not paginated in drf-spectacular's eyes: the page is spelled out.
MESSAGE_PAGE = inline_serializer(
    "PaginatedMessageList",
    fields={
        "next": serializers.URLField(allow_null=True, help_text="the next page"),
        "previous": serializers.URLField(allow_null=True, help_text="the page before"),
        "results": MessageSerializer(many=True),
    },
)


class ConversationMessagesView(ApiMixin, APIView):
    """`conversations/{instance_id}/messages/`: a thread belongs to the owner of its messages."""

    permission_classes = [ActionPermission]
    required_permissions = {"get": EXECUTE, "post": EXECUTE}
    orderings = MESSAGE_ORDERINGS
    default_ordering = "created_at"

    def _thread(self, request: Request, instance_id: str) -> QuerySet[AgentPlaygroundMessage]:
        """The thread's messages; another user's thread, or one started without a user, is a
        404 to non-admins. The owner is that of the thread's first message."""
        if not is_admin(request):
            thread = conversation_thread(instance_id=instance_id)
            if thread is not None and thread["owner_id"] != request.user.pk:
                raise NotFound(f"No conversation {instance_id!r}.")
        return conversation_messages(instance_id=instance_id)

    @extend_schema(
        summary="The messages of a conversation, in order",
        parameters=[
            OpenApiParameter("instance_id", OpenApiTypes.STR, OpenApiParameter.PATH),
            *PAGE_PARAMETERS,
            ordering_parameter(MESSAGE_ORDERINGS, "created_at"),
        ],
        responses={200: MESSAGE_PAGE, **problem_responses(400, 401, 403, 404, 429)},
    )
    def get(self, request: Request, instance_id: str) -> Response:
        check_list_parameters(request.query_params)
        messages = self._thread(request, instance_id)
        paginator = KeysetPagination()
        page = paginator.paginate_queryset(messages, request, view=self)
        if not page and "cursor" not in request.query_params:
            raise NotFound(f"No conversation {instance_id!r}.")
        return paginator.get_paginated_response(MessageSerializer(page, many=True).data)

    @extend_schema(
        summary="Post a user message",
        description="Stores the message and queues the agent's reply, which arrives as a new message of "
        "the thread. A new instance_id starts a thread. With an `Idempotency-Key` header, a post sent again "
        "with the same key, thread and body gets the first one's answer (202, the same `message_id`, "
        "`execution_id` and `Location`) and stores and queues nothing, whether its reply is pending or "
        "finished; the same key with another thread or body is a 422; while the first request with a key "
        "is still being processed, another is a 409 whose `Retry-After` says when to try again. Keys are "
        "per user, and apart from those of workflows.",
        request=MessagePostSerializer,
        parameters=[
            OpenApiParameter("instance_id", OpenApiTypes.STR, OpenApiParameter.PATH),
            OpenApiParameter(
                idempotency.HEADER, OpenApiTypes.STR, OpenApiParameter.HEADER, description="any unique string"
            ),
            OpenApiParameter(
                "Location", OpenApiTypes.URI, OpenApiParameter.HEADER, description="the reply's task", response=[202]
            ),
        ],
        examples=[OpenApiExample("hello", value={"agent": "echo", "content": "Hello!"}, request_only=True)],
        responses={202: MessageAcceptedSerializer, **problem_responses(400, 401, 403, 404, 409, 413, 422, 429)},
    )
    def post(self, request: Request, instance_id: str) -> Response:
        # Thread ids are one namespace: another user's is a conflict to resolve with another
        # id, not a missing conversation (a new id starts one).
        thread = conversation_thread(instance_id=instance_id)
        if thread is not None and thread["owner_id"] != request.user.pk:
            raise Conflict(
                f"The conversation id {instance_id!r} is taken by a conversation that is not yours; "
                "start yours under another id."
            )
        data = MessagePostSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        agent = Agent.objects.filter(pk=data.validated_data["agent"]).first()
        if agent is None:
            raise ValidationError({"agent": [f"unknown agent {data.validated_data['agent']!r}"]})
        try:
            message, _ = idempotency.conversation_message_post_idempotent(
                owner=request.user,
                agent=agent,
                instance_id=instance_id,
                content=data.validated_data["content"],
                header_key=request.headers.get(idempotency.HEADER),
            )
        except (ConversationBusy, ConversationTaken) as exc:
            raise Conflict(str(exc)) from None
        except ConversationError as exc:
            # The service's message begins with the field it names, which the answer names once.
            problem = spec_problem(str(exc))
            raise ValidationError({problem["field"] or "conversation": [problem["detail"]]}) from None
        # The id to poll is the reply's task: a message has no page of its own, and the thread's
        # list was the only way to learn the task to follow or cancel.
        body = {
            "message_id": message.message_id,
            "instance_id": instance_id,
            "execution_id": message.execution_id,
            "status": "accepted",
        }
        location = request.build_absolute_uri(reverse("api:task-detail", kwargs={"execution_id": message.execution_id}))
        return Response(
            MessageAcceptedSerializer(body).data, status=status.HTTP_202_ACCEPTED, headers={"Location": location}
        )
