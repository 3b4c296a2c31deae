"""Workflows, tasks, events and `me`. Views authenticate, check the role, validate, call a
service or selector and serialize; non-admins only ever see querysets of their own rows,
so another user's object is a 404."""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db.models import Exists, OuterRef, Prefetch, Q, QuerySet
from django.urls import reverse
from django_filters.utils import translate_validation
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, PermissionDenied, Throttled, ValidationError
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import Serializer
from rest_framework.settings import api_settings
from rest_framework.views import APIView

from orchestration.api import idempotency
from orchestration.api.errors import SAFE_METHODS
from orchestration.api.filters import (
    AttemptFilter,
    EventFilter,
    TaskFilter,
    WorkflowFilter,
    check_list_parameters,
    unknown_parameters,
)
from orchestration.api.parsers import unstorable_text
from orchestration.api.permissions import (
    ActionPermission,
    HasRole,
    effective_permissions,
    has_permission,
    is_admin,
    request_role,
)
from orchestration.api.renderers import FastJSONRenderer
from orchestration.api.schema import problem_responses
from orchestration.api.serializers import (
    ApiKeyInfoSerializer,
    CancelSerializer,
    EventSerializer,
    MeSerializer,
    NoBodySerializer,
    TaskDetailSerializer,
    TaskSerializer,
    UserSpendQuerySerializer,
    UserSpendSerializer,
    WorkflowAttemptSerializer,
    WorkflowDetailSerializer,
    WorkflowSerializer,
    WorkflowSpecSerializer,
    row_reader,
)
from orchestration.api.throttling import RateLimitedMixin, rate_limit_settle
from orchestration.models import AgentPlaygroundMessage, ApiKey, Event, TaskAttempt, TaskExecution, Workflow
from orchestration.models.workflows import TaskAttemptCause, TaskAttemptStatus
from orchestration.selectors import user_spend
from orchestration.services.conversations import event_holds_conversation, is_conversation_reply
from orchestration.services.events import Actor, actor_of
from orchestration.services.workflows import task_cancel, task_retry, workflow_cancel, workflow_resume

logger = logging.getLogger(__name__)


def request_actor(request: Request) -> Actor:
    """Who an operation's events name: the user, and the API key the request came with."""
    via = f"api_key:{request.auth.prefix}" if isinstance(request.auth, ApiKey) else "api"
    return actor_of(request.user, via)


READ = "workflow:read"
WRITE = "workflow:create"
EXECUTE = "agent:execute"


class ApiMixin(RateLimitedMixin):
    """Rate-limit headers on every answer, a choice of keyset orderings, JSON by orjson."""

    renderer_classes = [
        FastJSONRenderer if renderer is JSONRenderer else renderer for renderer in api_settings.DEFAULT_RENDERER_CLASSES
    ]
    orderings: dict[str, tuple[str, ...]] = {}
    default_ordering = ""

    @property
    def cursor_ordering(self) -> tuple[str, ...]:
        request = self.request  # type: ignore[attr-defined]
        name = request.query_params.get("ordering", self.default_ordering)
        if name not in self.orderings:
            raise ValidationError({"ordering": [f"must be one of: {', '.join(self.orderings)}"]})
        return self.orderings[name]

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)  # type: ignore[misc]
        # (A query parameter holding a NUL was answered by ApiCommonMiddleware already; Django
        # decodes a query string's bytes that are not UTF-8 to U+FFFD, never to a surrogate.)
        if unstorable_text(list(kwargs.values())):
            raise NotFound()
        if request.method not in SAFE_METHODS:
            # No write reads a query parameter: one would be ignored while the write is done
            # (`POST /workflows/?dry_run=true` stored and queued the workflow). Those addressing
            # an object are refused by get_object's filter_queryset too; creates were not.
            self.refuse_unknown_parameters()

    def refuse_unknown_parameters(self, reads: frozenset[str] = frozenset()) -> None:
        """A 400 naming each query parameter this operation does not read (`reads`, and
        `format` where it chooses the renderer): ignored, the answer would not be what was asked."""
        # `format` chooses the renderer, unless the viewset's negotiation leaves it to a filter (exports).
        override = self.get_content_negotiator().settings.URL_FORMAT_OVERRIDE  # type: ignore[attr-defined]
        request = self.request  # type: ignore[attr-defined]
        unknown = unknown_parameters(request.query_params, {*reads, override} if override else set(reads))
        if unknown:
            raise ValidationError(unknown)

    def filter_queryset(self, queryset: QuerySet) -> QuerySet:
        # get_object() filters its queryset too: an object's page or a command on it applied
        # the list's filters (`GET /workflows/{id}/?status=completed` was a 404 for a running
        # workflow that exists) and refused any other parameter naming the list's. Such an
        # operation reads no query parameter; those that read their own (`events`, `stats`,
        # `download`) have no filter set and check them themselves.
        if self.action == "list" or getattr(self, "filterset_class", None) is None:  # type: ignore[attr-defined]
            return super().filter_queryset(queryset)  # type: ignore[misc]
        self.refuse_unknown_parameters()
        return queryset

    def check_throttles(self, request: Request) -> None:
        self._throttles_checked = True
        super().check_throttles(request)  # type: ignore[misc]

    def permission_denied(self, request: Request, message: str | None = None, code: str | None = None) -> None:
        # DRF checks permissions before throttles: a refused request was not counted, and its
        # answer had no RateLimit-* headers. Counted here (one without credentials by its
        # client's address), over the limit it is a 429.
        if not getattr(self, "_throttles_checked", False):
            self.check_throttles(request)
        super().permission_denied(request, message=message, code=code)  # type: ignore[misc]

    def handle_exception(self, exc: Exception) -> Response:
        # A request whose rate-limit count was deferred (RowListMixin) and failed before its
        # view read it: over the limit, the answer is the 429 the throttle check would have
        # given before anything else ran.
        try:
            rate_limit_settle(self.request)  # type: ignore[attr-defined]
        except Throttled as throttled:
            exc = throttled
        except Exception:
            logger.exception("reading the rate-limit count of a failed request")
        return super().handle_exception(exc)  # type: ignore[misc]

    def finalize_response(self, request: Request, response: Response, *args: Any, **kwargs: Any) -> Response:
        try:
            rate_limit_settle(request)  # a view that deferred the count and never read it
        except Throttled as throttled:
            response = self.handle_exception(throttled)
        return super().finalize_response(request, response, *args, **kwargs)  # type: ignore[misc]


class WriteBodyMixin:
    """A viewset whose writes take a body other than their answer's serializer. OPTIONS (DRF's
    metadata) and the browsable API's forms describe a write by get_serializer() under the
    write's method, which gave the answer's fields, every one read-only: `POST /workflows/`
    seemed to take nothing, a task's `cancel` no `reason`, an export request to require
    `sha256`. `request_serializers` names the body of each such action."""

    request_serializers: dict[str, type[Serializer]] = {}

    def get_serializer(self, *args: Any, **kwargs: Any) -> Serializer:
        # The action of the request's method: OPTIONS runs as `metadata` with a copy of the
        # request under each method it describes.
        action = getattr(self, "action_map", {}).get(self.request.method.lower())  # type: ignore[attr-defined]
        body = self.request_serializers.get(action)
        if body is None:
            return super().get_serializer(*args, **kwargs)  # type: ignore[misc]
        kwargs.setdefault("context", self.get_serializer_context())  # type: ignore[attr-defined]
        return body(*args, **kwargs)


class RowListMixin:
    """List pages read as `.values()` rows and turned into the serializer's output by its
    RowReader: the same JSON without a model instance and a walk of DRF fields per row."""

    def rate_limit_deferrable(self) -> bool:
        """A list reads its rate-limit count after validating its filters, before its
        statement (orchestration.api.throttling)."""
        return self.action == "list"  # type: ignore[attr-defined]

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        queryset = self.filter_queryset(self.get_queryset())  # type: ignore[attr-defined]
        rate_limit_settle(request)
        return self.paginated_rows(queryset, self.get_serializer_class())  # type: ignore[attr-defined]

    def paginated_rows(self, queryset: QuerySet, serializer_class: type) -> Response:
        reader = row_reader(serializer_class)
        request = self.request  # type: ignore[attr-defined]
        paginator = self.paginator  # type: ignore[attr-defined]
        page = paginator.paginate_queryset(queryset, request, view=self, values=reader.lookups)
        return paginator.get_paginated_response(reader.represent(page))


def ordering_parameter(orderings: dict[str, tuple[str, ...]], default: str) -> OpenApiParameter:
    return OpenApiParameter(
        "ordering", OpenApiTypes.STR, enum=list(orderings), description=f"sort order (default {default})"
    )


PAGE_PARAMETERS = [
    OpenApiParameter("cursor", OpenApiTypes.STR, description="position from a previous page's next/previous link"),
    OpenApiParameter(
        "limit",
        {"type": "integer", "minimum": 1, "maximum": settings.API_MAX_PAGE_SIZE},
        description=f"results per page (default {settings.API_PAGE_SIZE})",
    ),
]

WORKFLOW_ORDERINGS = {"-created_at": ("-created_at", "-workflow_id"), "created_at": ("created_at", "workflow_id")}
TASK_ORDERINGS = {"-created_at": ("-created_at", "-execution_id"), "created_at": ("created_at", "execution_id")}
EVENT_ORDERINGS = {"sequence": ("sequence",), "-sequence": ("-sequence",)}
ATTEMPT_ORDERINGS = {"started_at": ("started_at", "id"), "-started_at": ("-started_at", "-id")}

SPEC_EXAMPLE = {
    "name": "summarise and translate",
    "tasks": [
        {"name": "fetch", "agent": "echo", "input": {"text": "hello"}},
        {"name": "repeat", "agent": "echo", "depends_on": ["fetch"], "max_retries": 2},
    ],
}


def _owned_workflows(request: Request) -> QuerySet[Workflow]:
    workflows = Workflow.objects.all()
    return workflows if is_admin(request) else workflows.filter(owner=request.user)


def _owned_events(request: Request) -> QuerySet[Event]:
    events = Event.objects.all()
    if is_admin(request):
        return events
    return events.filter(workflow_id__in=Workflow.objects.filter(owner=request.user).values("workflow_id"))


@extend_schema_view(
    list=extend_schema(
        summary="List workflows",
        description="Newest first (`ordering=created_at` for oldest first). Non-admins see their own.",
        parameters=[ordering_parameter(WORKFLOW_ORDERINGS, "-created_at")],
        responses={200: WorkflowSerializer(many=True), **problem_responses(400, 401, 403, 429)},
    ),
    retrieve=extend_schema(
        summary="A workflow with its tasks",
        responses={200: WorkflowDetailSerializer, **problem_responses(401, 403, 404, 429)},
    ),
)
class WorkflowViewSet(
    ApiMixin, WriteBodyMixin, RowListMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet
):
    """Workflows: submit, list, read with tasks, cancel, resume, and their events and attempts."""

    permission_classes = [ActionPermission]
    required_permissions = {
        "list": READ,
        "retrieve": READ,
        "events": READ,
        "attempts": READ,
        "create": WRITE,
        "cancel": WRITE,
        "retry": WRITE,
    }
    queryset = Workflow.objects.none()  # for the schema; get_queryset scopes by owner
    filterset_class = WorkflowFilter
    lookup_field = "workflow_id"
    lookup_value_regex = "[^/]+"
    request_serializers = {"create": WorkflowSpecSerializer, "cancel": CancelSerializer, "retry": NoBodySerializer}
    orderings = WORKFLOW_ORDERINGS
    default_ordering = "-created_at"

    def get_queryset(self) -> QuerySet[Workflow]:
        workflows = _owned_workflows(self.request)
        if self.action == "list":
            return workflows  # rows of the listed columns only (RowListMixin)
        workflows = workflows.select_related("owner")
        if self.action == "retrieve":
            workflows = workflows.prefetch_related(
                Prefetch("tasks", queryset=TaskExecution.objects.order_by("created_at", "execution_id"))
            )
        return workflows

    def get_serializer_class(self) -> type:
        return WorkflowDetailSerializer if self.action == "retrieve" else WorkflowSerializer

    @property
    def body_is_spec(self) -> bool:
        """Whether the request body is a workflow spec, whose validation names text PostgreSQL
        cannot store among its other problems (LimitedJSONParser leaves it to that)."""
        return self.action == "create"

    @extend_schema(
        summary="Submit a workflow",
        description=(
            "Validates the whole spec (every problem is reported at once, each naming its field; nothing is "
            "stored unless it is valid), stores the workflow and its tasks, and queues the tasks without "
            "dependencies. With an `Idempotency-Key` header, the same key and body return the workflow "
            "stored first (200); the same key with another body is a 422; while the first request with a "
            "key is still being processed, another is a 409 whose `Retry-After` says when to try again."
        ),
        request=WorkflowSpecSerializer,
        parameters=[
            OpenApiParameter(
                idempotency.HEADER, OpenApiTypes.STR, OpenApiParameter.HEADER, description="any unique string"
            ),
            OpenApiParameter(
                "Location",
                OpenApiTypes.URI,
                OpenApiParameter.HEADER,
                description="the workflow created",
                response=[201],
            ),
        ],
        examples=[OpenApiExample("two tasks", value=SPEC_EXAMPLE, request_only=True)],
        responses={
            201: WorkflowDetailSerializer,
            200: WorkflowDetailSerializer,
            **problem_responses(400, 401, 403, 409, 413, 422, 429),
        },
    )
    def create(self, request: Request) -> Response:
        workflow, created = idempotency.workflow_submit_idempotent(
            owner=request.user, body=request.data, header_key=request.headers.get(idempotency.HEADER)
        )
        if not created:
            return self._workflow_response(workflow, status.HTTP_200_OK)
        response = self._workflow_response(workflow, status.HTTP_201_CREATED)
        # A 201 names what it created (RFC 9110 §15.3.2), as an export's 202 names its run.
        response["Location"] = request.build_absolute_uri(
            reverse("api:workflow-detail", kwargs={"workflow_id": workflow.pk})
        )
        return response

    def _workflow_response(self, workflow: Workflow, code: int) -> Response:
        workflow = (
            self.get_queryset()
            .prefetch_related(Prefetch("tasks", queryset=TaskExecution.objects.order_by("created_at", "execution_id")))
            .get(pk=workflow.pk)
        )
        return Response(WorkflowDetailSerializer(workflow, context=self.get_serializer_context()).data, status=code)

    @extend_schema(
        summary="Cancel a running workflow",
        description="Its unfinished tasks are cancelled and it ends `cancelled`; one that had failed already "
        "and was waiting for its running tasks ends `failed`, its failure kept as its error (the cancel is "
        "in its workflow_failed event).",
        request=CancelSerializer,
        responses={200: WorkflowDetailSerializer, **problem_responses(400, 401, 403, 404, 409, 429)},
    )
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, workflow_id: str) -> Response:
        workflow = self.get_object()
        data = CancelSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        workflow_cancel(workflow_id=workflow.pk, reason=data.validated_data["reason"], actor=request_actor(request))
        return self._workflow_response(workflow, status.HTTP_200_OK)

    @extend_schema(
        summary="Resume a failed or cancelled workflow",
        description="Failed, timed-out and cancelled tasks get a fresh retry budget and are queued again. "
        "Answers 202: follow the workflow's status. Takes no body (none, or `{}`): any other is a 400.",
        request=None,
        responses={202: WorkflowDetailSerializer, **problem_responses(400, 401, 403, 404, 409, 413, 415, 429)},
    )
    @action(detail=True, methods=["post"])
    def retry(self, request: Request, workflow_id: str) -> Response:
        workflow = self.get_object()
        NoBodySerializer(data=request.data).is_valid(raise_exception=True)
        workflow_resume(workflow_id=workflow.pk, actor=request_actor(request))
        return self._workflow_response(workflow, status.HTTP_202_ACCEPTED)

    @extend_schema(
        summary="The workflow's events, in order",
        parameters=[*PAGE_PARAMETERS, ordering_parameter(EVENT_ORDERINGS, "sequence")],
        filters=False,
        responses={200: EventSerializer(many=True), **problem_responses(400, 401, 403, 404, 429)},
    )
    @action(detail=True, methods=["get"], orderings=EVENT_ORDERINGS, default_ordering="sequence", filterset_class=None)
    def events(self, request: Request, workflow_id: str) -> Response:
        check_list_parameters(request.query_params)
        workflow = self.get_object()
        return self.paginated_rows(Event.objects.filter(workflow_id=workflow.pk), EventSerializer)

    @extend_schema(
        summary="The workflow's attempts, in the order they started",
        description="Every try at each of its tasks, with its task's id and name: the attempts the tasks' own "
        "pages show, in one list (`ordering=-started_at` for the latest first).",
        parameters=[
            *PAGE_PARAMETERS,
            ordering_parameter(ATTEMPT_ORDERINGS, "started_at"),
            OpenApiParameter("status", OpenApiTypes.STR, enum=TaskAttemptStatus.values),
            OpenApiParameter("cause", OpenApiTypes.STR, enum=TaskAttemptCause.values, description="why it ended"),
        ],
        filters=False,
        responses={200: WorkflowAttemptSerializer(many=True), **problem_responses(400, 401, 403, 404, 429)},
    )
    @action(
        detail=True, methods=["get"], orderings=ATTEMPT_ORDERINGS, default_ordering="started_at", filterset_class=None
    )
    def attempts(self, request: Request, workflow_id: str) -> Response:
        # The filter set applied here, not by the view's filter backend: that one would filter
        # get_object's workflows with it too.
        filters = AttemptFilter(request.query_params, queryset=TaskAttempt.objects.all(), request=request)
        if not filters.is_valid():
            raise translate_validation(filters.errors)
        workflow = self.get_object()
        # One join to task_executions, by its workflow index, reads the task name too (a
        # task_name slug of the same relation): one statement per page however many tasks.
        attempts = filters.qs.filter(execution__workflow_id=workflow.pk)
        return self.paginated_rows(attempts, WorkflowAttemptSerializer)


@extend_schema_view(
    list=extend_schema(
        summary="List tasks (task executions)",
        parameters=[ordering_parameter(TASK_ORDERINGS, "-created_at")],
        responses={200: TaskSerializer(many=True), **problem_responses(400, 401, 403, 429)},
    ),
    retrieve=extend_schema(
        summary="A task with every attempt",
        responses={200: TaskDetailSerializer, **problem_responses(401, 403, 404, 429)},
    ),
)
class TaskViewSet(
    ApiMixin, WriteBodyMixin, RowListMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet
):
    """Task executions with their attempts."""

    permission_classes = [ActionPermission]
    required_permissions = {"list": READ, "retrieve": READ, "cancel": WRITE, "retry": WRITE}
    queryset = TaskExecution.objects.none()
    filterset_class = TaskFilter
    lookup_field = "execution_id"
    lookup_value_regex = "[^/]+"
    request_serializers = {"cancel": CancelSerializer, "retry": NoBodySerializer}
    orderings = TASK_ORDERINGS
    default_ordering = "-created_at"

    def get_queryset(self) -> QuerySet[TaskExecution]:
        tasks = TaskExecution.objects.all()
        if not is_admin(self.request):
            user = self.request.user
            if self.action not in ("retrieve", "cancel"):
                # The list, and retry: retrying an older reply would answer it beside (and after)
                # the thread's newer message, two replies in flight at once.
                tasks = tasks.filter(workflow__owner=user)
            else:
                # A conversation's reply task has no workflow: it is the caller's when the
                # message it answers is (reachable by its id, from the thread's messages, to
                # see why a reply is late and to cancel it; the list shows workflow tasks).
                asked = AgentPlaygroundMessage.objects.filter(execution=OuterRef("pk"), owner=user)
                tasks = tasks.filter(Q(workflow__owner=user) | Q(workflow__isnull=True) & Exists(asked))
        if self.action == "retrieve":
            tasks = tasks.prefetch_related(
                Prefetch("attempts", queryset=TaskAttempt.objects.order_by("attempt_number"))
            )
        return tasks

    def get_serializer_class(self) -> type:
        return TaskSerializer if self.action == "list" else TaskDetailSerializer

    def _conversation_data_hidden(self, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The tasks, with a conversation's reply task's input (the user's message) and output
        (the agent's reply) null unless the caller may read conversations (the
        thread's messages need agent:execute: a viewer, or a key narrowed to workflow:read, is
        refused them), as the console hides them (admin.tasks.TaskExecutionAdmin)."""
        if has_permission(self.request, EXECUTE):
            return tasks
        for task in tasks:
            if is_conversation_reply(workflow_id=task["workflow_id"], task_type=task["task_type"]):
                task["input_data"] = task["output_data"] = None
        return tasks

    def paginated_rows(self, queryset: QuerySet, serializer_class: type) -> Response:
        response = super().paginated_rows(queryset, serializer_class)
        self._conversation_data_hidden(response.data["results"])
        return response

    def retrieve(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return Response(self._conversation_data_hidden([self.get_serializer(self.get_object()).data])[0])

    def _task_response(self, task: TaskExecution, code: int) -> Response:
        task = (
            self.get_queryset()
            .prefetch_related(Prefetch("attempts", queryset=TaskAttempt.objects.order_by("attempt_number")))
            .get(pk=task.pk)
        )
        return Response(self._conversation_data_hidden([TaskDetailSerializer(task).data])[0], status=code)

    @extend_schema(
        summary="Retry a failed, timed-out or cancelled task",
        description="Answers 202: the task is queued again; follow its status. Takes no body (none, or `{}`): "
        "any other is a 400.",
        request=None,
        responses={202: TaskDetailSerializer, **problem_responses(400, 401, 403, 404, 409, 413, 415, 429)},
    )
    @action(detail=True, methods=["post"])
    def retry(self, request: Request, execution_id: str) -> Response:
        task = self.get_object()
        NoBodySerializer(data=request.data).is_valid(raise_exception=True)
        task_retry(execution_id=task.pk, actor=request_actor(request))
        return self._task_response(task, status.HTTP_202_ACCEPTED)

    @extend_schema(
        summary="Cancel a task",
        request=CancelSerializer,
        responses={200: TaskDetailSerializer, **problem_responses(400, 401, 403, 404, 409, 429)},
    )
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, execution_id: str) -> Response:
        task = self.get_object()
        data = CancelSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        task_cancel(execution_id=task.pk, reason=data.validated_data["reason"], actor=request_actor(request))
        return self._task_response(task, status.HTTP_200_OK)


@extend_schema_view(
    list=extend_schema(
        summary="List events (the audit log)",
        description=(
            "In sequence order. Non-admins see the events of their own workflows. A cursor is a "
            "position among committed events: one whose transaction commits after a page was read, "
            "with a lower sequence than that page's last, is not on later pages. To follow the log "
            "without missing one, read with settled=true (pages end at the relay's settled "
            "position) and resume with after= the last sequence read; the Synapse stream carries "
            "every event in order too."
        ),
        parameters=[ordering_parameter(EVENT_ORDERINGS, "sequence")],
        responses={200: EventSerializer(many=True), **problem_responses(400, 401, 403, 429, 503)},
    )
)
class EventViewSet(ApiMixin, RowListMixin, mixins.ListModelMixin, viewsets.GenericViewSet):
    """The append-only audit log."""

    permission_classes = [ActionPermission]
    required_permissions = {"list": READ}
    queryset = Event.objects.none()
    serializer_class = EventSerializer
    filterset_class = EventFilter
    orderings = EVENT_ORDERINGS
    default_ordering = "sequence"

    # Filtering on one of these columns orders by it first: equal throughout the result, it
    # changes nothing in the order, but it makes the page one range scan of the column's
    # (column, sequence) index instead of a walk of the primary key that the planner may
    # pick when the rows it guesses are spread out are in fact bunched.
    INDEXED_FILTERS = {"entity_id": "entity_id", "workflow": "workflow_id", "agent": "agent_id"}

    def _indexed_filter(self) -> tuple[str, str] | None:
        params = self.request.query_params
        # The value the filter applies: stripped, as its form field cleans it.
        return next(
            ((c, params[p].strip()) for p, c in self.INDEXED_FILTERS.items() if params.get(p, "").strip()), None
        )

    @property
    def cursor_ordering(self) -> tuple[str, ...]:
        ordering = super().cursor_ordering
        indexed = self._indexed_filter()
        if indexed is None:
            return ordering
        column = indexed[0]
        return (f"-{column}" if ordering[0].startswith("-") else column, *ordering)

    @property
    def cursor_fixed(self) -> dict[str, str]:
        """The ordering column the filter holds equal to one value (see KeysetPagination)."""
        indexed = self._indexed_filter()
        return dict([indexed]) if indexed else {}

    def get_queryset(self) -> QuerySet[Event]:
        return _owned_events(self.request)

    def paginated_rows(self, queryset: QuerySet, serializer_class: type) -> Response:
        """A page whose conversation tool calls and hand-offs (an admin's: nobody else's events
        list them) hold their payload null unless the caller may read conversations: a key
        narrowed to workflow:read read every user's there, as TaskViewSet hides their tasks' data."""
        response = super().paginated_rows(queryset, serializer_class)
        if not has_permission(self.request, EXECUTE):
            for event in response.data["results"]:
                kind, workflow_id, payload = event["event_type"], event["workflow_id"], event["payload"]
                if event_holds_conversation(event_type=kind, workflow_id=workflow_id, payload=payload):
                    event["payload"] = None
        return response


class MeView(ApiMixin, APIView):
    permission_classes = [HasRole]

    @extend_schema(
        summary="Who am I",
        description="The caller, their role and permissions, the API key in use and the rate-limit window.",
        responses={200: MeSerializer, **problem_responses(401, 403, 429)},
    )
    def get(self, request: Request) -> Response:
        self.refuse_unknown_parameters()
        user = request.user
        role = request_role(request)
        api_key = request.auth if isinstance(request.auth, ApiKey) else None
        data = {
            "id": user.pk,
            "username": user.get_username(),
            "email": user.email,
            "role": role,
            "permissions": effective_permissions(request),
            "authentication": "api_key" if api_key else "session",
            "api_key": ApiKeyInfoSerializer(api_key).data if api_key else None,
            "rate_limit": getattr(request._request, "rate_limit", None),
        }
        return Response(MeSerializer(data).data)


SPEND_EXAMPLE = {
    "user_id": 7,
    "username": "dev",
    "since": "2026-12-04T12:00:00Z",
    "until": None,
    "workflows": {"count": 12, "tokens": 48210, "cost_usd": "1.284000", "wasted_cost_usd": "0.212000"},
    "conversation_replies": {"count": 3, "tokens": 2900, "cost_usd": "0.031000", "wasted_cost_usd": "0.000000"},
    "total_tokens": 51110,
    "total_cost_usd": "1.315000",
    "wasted_cost_usd": "0.212000",
}


class MeSpendView(ApiMixin, APIView):
    """`me/spend/`: DESIGN §4's spend and wasted spend per user.

    The figures are workflows' and tasks' costs: like every other read of them it needs
    workflow:read, so that an API key narrowed below its owner's role (an admin's key made
    for exports only) reads no one's spend."""

    permission_classes = [ActionPermission]
    required_permissions = {"get": READ}

    @extend_schema(
        summary="What my work cost, and how much of it was wasted",
        description="Tokens and cost of the caller's workflows created in [since, until) and of the replies to "
        "their conversation messages created in it, with the cost of the tries that failed, timed out or were "
        "lost (wasted spend). Default window: the last 24 hours. Admins may name another user with `user`.",
        parameters=[UserSpendQuerySerializer],
        responses={200: UserSpendSerializer, **problem_responses(400, 401, 403, 404, 429)},
        examples=[OpenApiExample("a day's spend", value=SPEND_EXAMPLE, response_only=True)],
    )
    def get(self, request: Request) -> Response:
        query = UserSpendQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        window = dict(query.validated_data)
        user = request.user
        username = window.pop("user", None)
        if username is not None and username != user.get_username():
            if not is_admin(request):
                raise PermissionDenied("Only an admin may read another user's spend; leave out user= for your own.")
            user = get_user_model().objects.filter(**{get_user_model().USERNAME_FIELD: username}).first()
            if user is None:
                raise NotFound(f"No user {username!r}.")
        spend = user_spend(user_id=user.pk, **window)
        return Response(UserSpendSerializer({**spend, "username": user.get_username()}).data)
