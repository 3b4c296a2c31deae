"""Input and output shapes of the API. No business logic here: serializers check types and
shapes; services decide. Server-owned fields (owner, status, counters, stats) are read-only."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Mapping
from functools import cache, cached_property
from typing import Any

from django.conf import settings
from django.core.exceptions import FieldDoesNotExist
from django.core.validators import URLValidator
from django.utils import timezone
from drf_spectacular.utils import extend_schema_field
from rest_framework import ISO_8601, serializers
from rest_framework.settings import api_settings

from orchestration.api.filters import DATETIME_FORM, PLUS_AS_SPACE, plus_read_as_space, unknown_parameters
from orchestration.isodates import is_iso_datetime_form, iso_datetime_canonical
from orchestration.models import Agent, AgentPlaygroundMessage, ApiKey, Event, TaskAttempt, TaskExecution, Workflow
from orchestration.models.workflows import Priority
from orchestration.selectors import DEFAULT_STATS_WINDOW

JSON_OBJECT = {"type": "object", "additionalProperties": True}
JSON_ARRAY_OF_STRINGS = {"type": "array", "items": {"type": "string"}}


@extend_schema_field(JSON_OBJECT)
class JSONObjectField(serializers.JSONField):
    pass


@extend_schema_field({"type": "object", "nullable": True, "additionalProperties": True})
class NullableJSONField(serializers.JSONField):
    pass


@extend_schema_field({"type": "array", "items": {}})
class JSONListField(serializers.JSONField):
    pass


@extend_schema_field(JSON_ARRAY_OF_STRINGS)
class StringListField(serializers.JSONField):
    pass


def _type_problem(field: serializers.Field, value: Any) -> str | None:
    """DRF coerces (0 becomes "0", "5" becomes 5); a JSON API should not."""
    if value is None:
        return None  # allow_null decides
    if isinstance(field, serializers.CharField | serializers.ChoiceField) and not isinstance(value, str):
        return "must be a string"
    if isinstance(field, serializers.BooleanField) and not isinstance(value, bool):
        return "must be true or false"
    if isinstance(field, serializers.IntegerField) and (isinstance(value, bool) or not isinstance(value, int)):
        return "must be an integer"
    if isinstance(field, serializers.FloatField) and (isinstance(value, bool) or not isinstance(value, int | float)):
        return "must be a number"
    if isinstance(field, serializers.ListField):
        if not isinstance(value, list):
            return "must be a list"
        if isinstance(field.child, serializers.CharField) and not all(isinstance(v, str) for v in value):
            return "must be a list of strings"
    return None


class StrictFieldsMixin:
    """JSON bodies are taken as typed: fields the serializer does not accept (server-owned
    ones included) are refused instead of silently dropped, so a client learns that its
    `status` was not applied, and values of the wrong JSON type are refused, not coerced. The
    other fields are still checked, so one answer names every field that is wrong."""

    def to_internal_value(self, data: Any) -> Any:
        if not isinstance(data, dict):
            return super().to_internal_value(data)  # type: ignore[misc]
        fields = self.fields  # type: ignore[attr-defined]
        errors = {
            name: ["is not accepted here"] for name in sorted(data) if name not in fields or fields[name].read_only
        }
        for name, value in data.items():
            problem = _type_problem(fields[name], value) if name in fields else None
            if problem:
                errors[name] = [problem]
        if not errors:
            return super().to_internal_value(data)  # type: ignore[misc]
        try:
            # The fields not refused above, checked as usual (a wrongly typed one would only be
            # named again, coerced).
            super().to_internal_value({name: value for name, value in data.items() if name not in errors})  # type: ignore[misc]
        except serializers.ValidationError as exc:
            if isinstance(exc.detail, dict):
                errors.update({name: detail for name, detail in exc.detail.items() if name not in errors})
        raise serializers.ValidationError(errors)


# Fields whose output depends on the request (their serializer's context) or on the
# serializer instance: a plan holding them is not shared between requests.
_CONTEXT_FIELDS = (
    serializers.SerializerMethodField,
    serializers.HyperlinkedRelatedField,
    serializers.HyperlinkedIdentityField,
    serializers.FileField,
)


def _context_free(serializer: serializers.BaseSerializer) -> bool:
    if isinstance(serializer, serializers.ListSerializer):
        return _context_free(serializer.child)
    for field in serializer.fields.values():
        if isinstance(field, _CONTEXT_FIELDS):
            return False
        if isinstance(field, serializers.BaseSerializer) and not _context_free(field):
            return False
    return True


class FastReadMixin:
    """Output of plain columns without DRF's per-field lookup machinery (a list page is
    50 rows x 25 fields; the generic path costs more than the query). Fields with a dotted
    source, relations and nested serializers keep the generic path; the values and their
    formats are DRF's own (each field's to_representation).

    The plan (the bound fields) is built once per serializer class, not per instance:
    building a ModelSerializer's fields costs more than serializing a workflow with its
    tasks. Serializers with fields that read the request or the serializer instance keep a
    plan per instance."""

    _shared_plans: dict[type, list[tuple[str, serializers.Field, str | None]]] = {}

    @cached_property
    def _plan(self) -> list[tuple[str, serializers.Field, str | None]]:
        cls = type(self)
        shared = FastReadMixin._shared_plans.get(cls)
        if shared is not None:
            return shared
        prototype = cls()  # without this request's context, to be shared
        if _context_free(prototype):
            FastReadMixin._shared_plans[cls] = plan = self._build_plan(prototype)
            return plan
        return self._build_plan(self)

    @staticmethod
    def _build_plan(serializer: Any) -> list[tuple[str, serializers.Field, str | None]]:
        plan = []
        for field in serializer._readable_fields:
            plain = (
                len(field.source_attrs) == 1
                and not isinstance(field, serializers.BaseSerializer | serializers.RelatedField)
                and field.source != "*"
            )
            plan.append((field.field_name, field, field.source_attrs[0] if plain else None))
        return plan

    def to_representation(self, instance: Any) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for name, field, attribute in self._plan:
            value = field.get_attribute(instance) if attribute is None else getattr(instance, attribute)
            data[name] = None if value is None else field.to_representation(value)
        return data


class RowReader:
    """A flat read serializer's output built from `.values()` rows instead of model
    instances: on a list page (50 rows x up to 25 fields) instantiating models and walking
    DRF's fields cost more than the query. Built once per serializer class from that
    serializer's own fields, so names, order and formats are the same; each value goes
    through the field's own to_representation except where that is the identity or a
    plain type cast (strings, integers, JSON) and for ISO 8601 datetimes, done here the way
    DRF does them. Fields that are not one column (nested serializers, method fields,
    dotted sources, properties) are refused when the reader is built."""

    def __init__(self, serializer_class: type[serializers.ModelSerializer]) -> None:
        serializer = serializer_class()
        model = serializer.Meta.model
        self.names: list[tuple[str, str]] = []  # (output name, values() lookup)
        self.converted: list[tuple[str, Callable[[Any], Any]]] = []
        self.datetimes: list[tuple[str, serializers.DateTimeField]] = []
        for name, field in serializer.fields.items():
            if field.write_only:
                continue
            lookup, model_field = self._column(model, name, field)
            self.names.append((name, lookup))
            if self._is_iso_datetime(field):
                self.datetimes.append((name, field))
            elif not self._is_identity(field, model_field):
                self.converted.append((name, field.to_representation))
        self.lookups = tuple(dict.fromkeys(lookup for _, lookup in self.names))

    @staticmethod
    def _column(model: type, name: str, field: serializers.Field) -> tuple[str, Any]:
        plain = (
            len(field.source_attrs) == 1
            and not isinstance(field, serializers.BaseSerializer | serializers.SerializerMethodField)
            and (not isinstance(field, serializers.RelatedField) or isinstance(field, serializers.SlugRelatedField))
        )
        try:
            model_field = model._meta.get_field(field.source) if plain else None
        except FieldDoesNotExist:
            model_field = None
        if model_field is None or not model_field.concrete:
            raise TypeError(f"{model.__name__} field {name!r} is not a single column; a RowReader cannot read it")
        if isinstance(field, serializers.SlugRelatedField):
            if not model_field.is_relation:
                raise TypeError(f"{model.__name__} field {name!r} is not a relation")
            slug_field = model_field.related_model._meta.get_field(field.slug_field)
            return f"{field.source}__{field.slug_field}", slug_field
        return field.source, model_field

    @staticmethod
    def _is_identity(field: serializers.Field, model_field: Any) -> bool:
        """Whether the field's to_representation returns a column value unchanged: JSON as
        parsed, text as text, integers as integers, a slug as itself."""
        if isinstance(field, serializers.JSONField):
            return not field.binary
        if isinstance(field, serializers.SlugRelatedField):
            return True
        column_type = model_field.target_field.get_internal_type() if model_field.is_relation else None
        column_type = column_type or model_field.get_internal_type()
        if type(field) is serializers.CharField:
            return column_type in ("CharField", "TextField")
        if type(field) is serializers.ChoiceField:
            # choice_strings_to_values maps each text key to itself, and a value it does not
            # hold to itself: text from a text column comes out as it went in.
            return column_type in ("CharField", "TextField") and all(isinstance(key, str) for key in field.choices)
        integer_columns = ("IntegerField", "BigIntegerField", "SmallIntegerField", "BigAutoField", "AutoField")
        if type(field) is serializers.IntegerField:
            return column_type in integer_columns
        big_integer = getattr(serializers, "BigIntegerField", None)  # DRF 3.16
        if big_integer is not None and type(field) is big_integer:
            coerce = getattr(field, "coerce_to_string", api_settings.COERCE_BIGINT_TO_STRING)
            return not coerce and column_type in integer_columns
        return False

    @staticmethod
    def _is_iso_datetime(field: serializers.Field) -> bool:
        """Whether the output is ISO 8601 in the current time zone (DRF's default)."""
        if not isinstance(field, serializers.DateTimeField) or hasattr(field, "timezone"):
            return False
        output_format = getattr(field, "format", api_settings.DATETIME_FORMAT)
        return isinstance(output_format, str) and output_format.lower() == ISO_8601

    def represent(self, rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        zone = timezone.get_current_timezone() if settings.USE_TZ else None
        converted = self.converted
        datetimes = self.datetimes
        if zone is None:
            converted = [*converted, *((name, field.to_representation) for name, field in datetimes)]
            datetimes = []
        utc = _is_utc(zone)
        results = []
        for row in rows:
            item = {name: row[lookup] for name, lookup in self.names}
            for name, convert in converted:
                value = item[name]
                if value is not None:
                    item[name] = convert(value)
            for name, field in datetimes:
                value = item[name]
                if value is None:
                    continue
                if value.tzinfo is dt.UTC and utc:
                    item[name] = value.isoformat()[:-6] + "Z"  # what _iso_datetime makes of it
                else:
                    item[name] = _iso_datetime(value, zone, field)
            results.append(item)
        return results


def _is_utc(zone: Any) -> bool:
    return zone is dt.UTC or str(zone) == "UTC"


def _iso_datetime(value: Any, zone: Any, field: serializers.DateTimeField) -> str:
    """DateTimeField.to_representation with USE_TZ, without its per-value lookups."""
    if value.utcoffset() is None:
        return field.to_representation(value)  # naive: DRF's way
    try:
        text = value.astimezone(zone).isoformat()
    except OverflowError:
        return field.to_representation(value)  # DRF's error
    return text[:-6] + "Z" if text.endswith("+00:00") else text


@cache
def row_reader(serializer_class: type[serializers.ModelSerializer]) -> RowReader:
    return RowReader(serializer_class)


# --- Workflows and tasks ----------------------------------------------------------------


class AttemptSerializer(FastReadMixin, serializers.ModelSerializer):
    """One try at a task: when it ran, on which worker, how it ended and why, and what it spent."""

    class Meta:
        model = TaskAttempt
        fields = (
            "attempt_number",
            "status",
            "cause",
            "error_class",
            "retryable",
            "error",
            "traceback",
            "worker",
            "worker_pid",
            "worker_started_at",
            "pool_pid",
            "celery_task_id",
            "delivery_count",
            "redelivered",
            "timeout_seconds",
            "input_tokens",
            "output_tokens",
            "tokens_used",
            "cost_usd",
            "started_at",
            "finished_at",
            "duration_ms",
        )
        read_only_fields = fields


class WorkflowAttemptSerializer(AttemptSerializer):
    """An attempt among its workflow's, naming its task."""

    execution_id = serializers.CharField(read_only=True, help_text="its task (`GET /tasks/{execution_id}/`)")
    task_name = serializers.SlugRelatedField(source="execution", slug_field="task_name", read_only=True)

    class Meta(AttemptSerializer.Meta):
        fields = ("execution_id", "task_name", *AttemptSerializer.Meta.fields)
        read_only_fields = fields


CONVERSATION_DATA = (
    "null on a conversation's reply task (task_type conversation, no workflow) to a caller who may not "
    "read conversations (agent:execute): its input is the user's message, its output the agent's reply"
)


class TaskSerializer(FastReadMixin, serializers.ModelSerializer):
    """A task of a workflow (a task execution): its agent, status, retries, timings, usage and cost."""

    workflow_id = serializers.CharField(read_only=True, allow_null=True)
    agent_id = serializers.CharField(read_only=True)
    depends_on = StringListField(read_only=True)
    input_data = NullableJSONField(read_only=True, help_text=CONVERSATION_DATA)
    output_data = serializers.JSONField(read_only=True, allow_null=True, help_text=CONVERSATION_DATA)
    metadata = JSONObjectField(read_only=True)

    class Meta:
        model = TaskExecution
        fields = (
            "execution_id",
            "workflow_id",
            "agent_id",
            "task_name",
            "task_type",
            "description",
            "priority",
            "status",
            "depends_on",
            "input_data",
            "output_data",
            "error",
            "retry_count",
            "max_retries",
            "timeout_seconds",
            "execution_time_ms",
            "input_tokens",
            "output_tokens",
            "tokens_used",
            "cost_usd",
            "worker",
            "metadata",
            "created_at",
            "queued_at",
            "started_at",
            "completed_at",
            "updated_at",
        )
        read_only_fields = fields


class TaskDetailSerializer(TaskSerializer):
    """A task with every attempt at it."""

    attempts = AttemptSerializer(many=True, read_only=True)

    class Meta(TaskSerializer.Meta):
        fields = (*TaskSerializer.Meta.fields, "attempts")
        read_only_fields = fields


class WorkflowSerializer(FastReadMixin, serializers.ModelSerializer):
    """A workflow: its status, progress counters, timings, token and cost totals."""

    owner = serializers.SlugRelatedField(
        slug_field="username",
        read_only=True,
        allow_null=True,
        help_text="username of who submitted it (null: submitted with manage.py)",
    )
    tags = StringListField(read_only=True)
    metadata = JSONObjectField(read_only=True)

    class Meta:
        model = Workflow
        fields = (
            "workflow_id",
            "name",
            "description",
            "workflow_type",
            "status",
            "priority",
            "owner",
            "initiator",
            "idempotency_key",
            "total_steps",
            "completed_steps",
            "failed_steps",
            "cancelled_steps",
            "error",
            "error_count",
            "tags",
            "metadata",
            "total_tokens_used",
            "total_cost_usd",
            "wasted_cost_usd",
            "deadline",
            "created_at",
            "started_at",
            "completed_at",
            "duration_ms",
            "updated_at",
        )
        read_only_fields = fields


class WorkflowDetailSerializer(WorkflowSerializer):
    """A workflow with its spec and its tasks."""

    spec = JSONObjectField(read_only=True)
    state_data = JSONObjectField(read_only=True)
    step_results = JSONObjectField(
        read_only=True,
        help_text="outputs by task name, recorded when the workflow ends; past WORKFLOW_STEP_RESULTS_MAX_BYTES "
        'in all, an output is {"output_omitted": {"task_name", "execution_id", "bytes"}}: read it from its task',
    )
    assigned_agents = StringListField(read_only=True)
    checkpoints = JSONListField(read_only=True)
    tasks = TaskSerializer(many=True, read_only=True)

    class Meta(WorkflowSerializer.Meta):
        fields = (
            *WorkflowSerializer.Meta.fields,
            "continue_on_failure",
            "current_step",
            "spec",
            "state_data",
            "step_results",
            "assigned_agents",
            "checkpoints",
            "tasks",
        )
        read_only_fields = fields


class TaskSpecSerializer(serializers.Serializer):
    """One task of a workflow spec (documentation of the shape; the spec validator decides)."""

    name = serializers.RegexField(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,254}$", help_text="unique within the workflow")
    agent = serializers.CharField(max_length=50, help_text="id of an active agent")
    input = JSONObjectField(required=False)
    depends_on = serializers.ListField(child=serializers.CharField(), required=False)
    max_retries = serializers.IntegerField(
        min_value=0,
        max_value=settings.TASK_MAX_RETRIES_LIMIT,
        required=False,
        default=3,
        help_text="tries after the first, for a retryable error",
    )
    timeout_seconds = serializers.IntegerField(
        min_value=1,
        max_value=settings.TASK_MAX_TIMEOUT_SECONDS,
        required=False,
        default=settings.TASK_DEFAULT_TIMEOUT_SECONDS,
        help_text="each try's soft time limit, in seconds (default: TASK_DEFAULT_TIMEOUT_SECONDS)",
    )
    priority = serializers.ChoiceField(
        choices=Priority.choices, required=False, help_text="its Celery queue (default: the workflow's priority)"
    )
    description = serializers.CharField(max_length=10_000, required=False, allow_blank=True)
    task_type = serializers.CharField(
        max_length=100, required=False, allow_blank=True, help_text="free-form; `conversation` is reserved"
    )


class WorkflowSpecSerializer(serializers.Serializer):
    """A workflow spec: a DAG of tasks (`depends_on` by task name)."""

    name = serializers.CharField(max_length=255)
    tasks = TaskSpecSerializer(many=True, min_length=1, max_length=settings.WORKFLOW_MAX_TASKS)
    workflow_type = serializers.CharField(max_length=100, required=False, allow_blank=True)
    description = serializers.CharField(max_length=10_000, required=False, allow_blank=True)
    tags = serializers.ListField(child=serializers.CharField(), required=False)
    metadata = JSONObjectField(required=False)
    state = JSONObjectField(required=False)
    deadline = serializers.DateTimeField(required=False, allow_null=True, help_text="with a time zone, in the future")
    priority = serializers.ChoiceField(
        choices=Priority.choices, required=False, default=Priority.NORMAL, help_text="its tasks' Celery queue"
    )
    idempotency_key = serializers.CharField(
        max_length=255, required=False, help_text="same as the Idempotency-Key header; use one of the two"
    )
    continue_on_failure = serializers.BooleanField(
        required=False,
        default=False,
        help_text="true: a failed (or cancelled) task cancels only what depends on it; false: it fails the workflow",
    )


# --- Events -----------------------------------------------------------------------------


class EventSerializer(FastReadMixin, serializers.ModelSerializer):
    """An entry of the append-only audit log."""

    payload = NullableJSONField(
        read_only=True,
        help_text="null on a conversation's tool_executed and agent_interaction events to a caller who may not "
        "read conversations (agent:execute)",
    )

    class Meta:
        model = Event
        fields = (
            "sequence",
            "event_id",
            "event_type",
            "entity_type",
            "entity_id",
            "workflow_id",
            "agent_id",
            "session_id",
            "source",
            "severity",
            "payload",
            "created_at",
        )
        read_only_fields = fields


# --- Agents -----------------------------------------------------------------------------

AGENT_WRITABLE = (
    "name",
    "role",
    "description",
    "category",
    "version",
    "executor",
    "entrypoint",
    "model",
    "provider",
    "url",
    "api_key_env",
    "system_prompt",
    "temperature",
    "max_tokens",
    "max_concurrency",
    "capabilities",
    "specialties",
    "backstory",
    "personality_emoji",
    "config",
    "metadata",
)
AGENT_STATS = ("total_tasks_completed", "total_tokens_used", "average_latency_ms", "success_rate")


class AgentSerializer(FastReadMixin, serializers.ModelSerializer):
    """An agent: its executor, model, limits and summary statistics."""

    url = serializers.CharField(read_only=True)
    capabilities = StringListField(read_only=True)
    specialties = StringListField(read_only=True)
    config = JSONObjectField(read_only=True)
    metadata = JSONObjectField(read_only=True)

    class Meta:
        model = Agent
        fields = ("id", *AGENT_WRITABLE, "status", *AGENT_STATS, "created_at", "updated_at")
        read_only_fields = fields


class AgentWriteSerializer(StrictFieldsMixin, serializers.ModelSerializer):
    """Admins create and change agents; status and the stats columns are not writable
    (deactivate is its own action; the stats come from the rollup)."""

    capabilities = serializers.ListField(child=serializers.CharField(max_length=200), required=False)
    specialties = serializers.ListField(child=serializers.CharField(max_length=200), required=False)
    temperature = serializers.FloatField(min_value=0, max_value=2, allow_null=True, required=False)
    url = serializers.CharField(
        max_length=500, required=False, allow_blank=True, validators=[URLValidator()], help_text="http executor"
    )
    config = JSONObjectField(required=False)
    metadata = JSONObjectField(required=False)

    class Meta:
        model = Agent
        fields = ("id", *AGENT_WRITABLE)
        extra_kwargs = {"id": {"validators": []}}

    def validate_config(self, value: Any) -> dict:
        if not isinstance(value, dict):
            raise serializers.ValidationError("must be an object")
        return value

    validate_metadata = validate_config


class AgentCreateSerializer(AgentWriteSerializer):
    """A new agent."""

    id = serializers.RegexField(
        r"^[a-z0-9][a-z0-9_.\-]{0,49}$",
        help_text="e.g. akira-001",
        error_messages={
            "invalid": "use 1-50 lowercase letters, digits, '.', '_' or '-', beginning with a letter or digit"
        },
    )


class AgentUpdateSerializer(AgentWriteSerializer):
    """Changes to an agent's settings."""

    class Meta(AgentWriteSerializer.Meta):
        fields = AGENT_WRITABLE


class AgentStatsSerializer(serializers.Serializer):
    """An agent's tasks, latency, tokens, cost and success rate over a window."""

    agent_id = serializers.CharField()
    since = serializers.DateTimeField()
    until = serializers.DateTimeField(allow_null=True)
    total_tasks = serializers.IntegerField(help_text="completed tasks")
    avg_latency_ms = serializers.FloatField(allow_null=True)
    total_tokens = serializers.IntegerField()
    total_cost_usd = serializers.DecimalField(max_digits=20, decimal_places=6)
    wasted_cost_usd = serializers.DecimalField(
        max_digits=20, decimal_places=6, help_text="cost of the failed, timed-out and lost tries of its tasks"
    )
    failed = serializers.IntegerField()
    timed_out = serializers.IntegerField()
    success_rate = serializers.FloatField(allow_null=True, help_text="completed / finished * 100")


class StrictQuerySerializer(serializers.Serializer):
    """Query parameters read by a serializer, as strictly as the lists' filters: a parameter
    given with no value is an error (DRF reads `?since=` as absent, so `?user=` would answer
    for the caller instead of refusing), and so is a parameter it does not read (`?username=`
    would be ignored the same way). DRF's `format` is allowed."""

    def to_internal_value(self, data: Any) -> dict[str, Any]:
        problems = {
            name: ["must not be empty"] for name in self.fields if name in data and not str(data.get(name)).strip()
        }
        problems.update(unknown_parameters(data, {*self.fields, "format"}))
        if problems:
            raise serializers.ValidationError(problems)
        return super().to_internal_value(data)


class QueryDateTimeField(serializers.DateTimeField):
    """A date-time of a query string: one refused for a space where its offset's '+' was (a
    query string decodes an unencoded '+' into a space) says so. One without an offset is UTC
    (README), as the filters read it, not TIME_ZONE's (DRF's default)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("default_timezone", dt.UTC)
        super().__init__(**kwargs)

    def to_internal_value(self, value: Any) -> Any:
        try:
            if isinstance(value, str) and not is_iso_datetime_form(value):
                raise serializers.ValidationError(f"Datetime has wrong format: use {DATETIME_FORM}.")
            return super().to_internal_value(iso_datetime_canonical(value) if isinstance(value, str) else value)
        except serializers.ValidationError:
            if plus_read_as_space(value):
                raise serializers.ValidationError(f"Datetime has wrong format: {PLUS_AS_SPACE}.") from None
            raise


class AgentStatsQuerySerializer(StrictQuerySerializer):
    """The window of an agent's statistics."""

    since = QueryDateTimeField(required=False, help_text="start of the window (default: 24 hours ago)")
    until = QueryDateTimeField(required=False, help_text="end of the window (default: now)")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        # The default since is fixed here, once, so that it is the one `until` is checked against.
        since = attrs.get("since") or timezone.now() - DEFAULT_STATS_WINDOW
        until = attrs.get("until")
        if until and until <= since:
            default = "" if "since" in attrs else " (default: 24 hours ago)"
            raise serializers.ValidationError({"until": f"must be after since{default}"})
        return {**attrs, "since": since}


class SpendPartSerializer(serializers.Serializer):
    count = serializers.IntegerField()
    tokens = serializers.IntegerField()
    cost_usd = serializers.DecimalField(max_digits=20, decimal_places=6, help_text="every try's cost")
    wasted_cost_usd = serializers.DecimalField(
        max_digits=20, decimal_places=6, help_text="the cost of the failed, timed-out and lost tries"
    )


class UserSpendSerializer(serializers.Serializer):
    """What a user's workflows and conversation replies cost over a window, and how much of
    it went on tries that failed, timed out or were lost."""

    user_id = serializers.IntegerField()
    username = serializers.CharField()
    since = serializers.DateTimeField()
    until = serializers.DateTimeField(allow_null=True)
    workflows = SpendPartSerializer(help_text="the user's workflows created in the window")
    conversation_replies = SpendPartSerializer(help_text="replies to the user's messages, created in the window")
    total_tokens = serializers.IntegerField()
    total_cost_usd = serializers.DecimalField(max_digits=20, decimal_places=6)
    wasted_cost_usd = serializers.DecimalField(max_digits=20, decimal_places=6)


class UserSpendQuerySerializer(AgentStatsQuerySerializer):
    """The window of a user's spend, and (admins only) whose."""

    user = serializers.CharField(
        required=False, max_length=150, help_text="the username to report on (admins; default: the caller)"
    )


# --- Conversations ----------------------------------------------------------------------


class MessageSerializer(FastReadMixin, serializers.ModelSerializer):
    """A message of a conversation."""

    agent_id = serializers.CharField(read_only=True, allow_null=True)
    execution_id = serializers.CharField(
        read_only=True, allow_null=True, help_text="the reply task (a user message's, or the one that wrote this reply)"
    )
    tool_calls = serializers.JSONField(read_only=True, allow_null=True)
    metadata = JSONObjectField(read_only=True)

    class Meta:
        model = AgentPlaygroundMessage
        fields = (
            "message_id",
            "instance_id",
            "agent_id",
            "role",
            "content",
            "tool_calls",
            "tool_call_id",
            "is_error",
            "execution_id",
            "input_tokens",
            "output_tokens",
            "tokens_used",
            "metadata",
            "created_at",
        )
        read_only_fields = fields


class MessagePostSerializer(StrictFieldsMixin, serializers.Serializer):
    """A user message for an agent."""

    agent = serializers.CharField(max_length=50, help_text="id of the agent to talk to")
    # As written: not trimmed (an indented first line, trailing newlines are what was said);
    # its size is CONVERSATION_MAX_MESSAGE_CHARS', checked by the service, naming the limit.
    content = serializers.CharField(trim_whitespace=False, help_text="the user's message")


class MessageAcceptedSerializer(serializers.Serializer):
    """A message accepted: the reply arrives as a new message of the thread."""

    message_id = serializers.CharField()
    instance_id = serializers.CharField()
    execution_id = serializers.CharField(
        help_text="the task that replies (`GET /tasks/{execution_id}/` follows or cancels it; also `Location`)"
    )
    status = serializers.CharField(help_text="'accepted': the agent's reply arrives as a new message")


# --- Commands and me --------------------------------------------------------------------


class CancelSerializer(StrictFieldsMixin, serializers.Serializer):
    """Why the work is cancelled."""

    reason = serializers.CharField(max_length=1000, required=False, default="cancelled by user")


NO_BODY = "this operation takes no request body: send none, or an empty JSON object"
_JSON_KINDS = {
    type(None): "null",
    list: "an array",
    str: "a string",
    bool: "a boolean",
    int: "a number",
    float: "a number",
}


class NoBodySerializer(StrictFieldsMixin, serializers.Serializer):
    """The body of a command that takes none (retry, deactivate): nothing, or `{}`. Anything
    else is refused, naming what was sent, rather than ignored: a client that sent a `reason`
    learns that it was not recorded."""

    def run_validation(self, data: Any = serializers.empty) -> Any:
        if data is not serializers.empty and not isinstance(data, dict):
            kind = _JSON_KINDS.get(type(data), "such a value")
            raise serializers.ValidationError({api_settings.NON_FIELD_ERRORS_KEY: [f"{NO_BODY}, not {kind}"]})
        return super().run_validation(data)


class RateLimitSerializer(serializers.Serializer):
    """The caller's rate-limit window."""

    limit = serializers.IntegerField(help_text="requests allowed per 60-second window")
    remaining = serializers.IntegerField()
    reset = serializers.IntegerField(help_text="seconds until the window ends")


class ApiKeyInfoSerializer(serializers.ModelSerializer):
    """The API key a request authenticated with."""

    permissions = StringListField(read_only=True)

    class Meta:
        model = ApiKey
        fields = ("prefix", "name", "permissions", "expires_at", "last_used_at", "created_at")
        read_only_fields = fields


class MeSerializer(serializers.Serializer):
    """The caller, their role and permissions."""

    id = serializers.IntegerField()
    username = serializers.CharField()
    email = serializers.CharField(allow_blank=True)
    role = serializers.CharField(allow_null=True)
    permissions = serializers.ListField(child=serializers.CharField())
    authentication = serializers.ChoiceField(choices=["api_key", "session"])
    api_key = ApiKeyInfoSerializer(allow_null=True)
    rate_limit = RateLimitSerializer(allow_null=True)


class ProblemErrorSerializer(serializers.Serializer):
    """One problem of a 400."""

    field = serializers.CharField(
        allow_blank=True,
        help_text="the path of the field or parameter (`tasks[0].depends_on`), or empty for the request as a "
        "whole (a body that is not JSON)",
    )
    detail = serializers.CharField(help_text="the problem (its field is `field`, not repeated here)")


class ProblemSerializer(serializers.Serializer):
    """RFC 9457 problem details."""

    type = serializers.CharField(help_text="urn:agentledger:problem:<kind>")
    title = serializers.CharField()
    status = serializers.IntegerField()
    detail = serializers.CharField()
    instance = serializers.CharField()
    errors = ProblemErrorSerializer(
        many=True,
        required=False,
        help_text="on every 400 (and only there): each problem found, a workflow spec's and a serializer's alike; "
        "`detail` joins them",
    )
