"""Workflow specs: parsing (JSON or YAML) and validation.

A spec is validated as a whole and every problem is reported at once, each naming its field
(`tasks[2].depends_on`), so a client can fix them in one go. Nothing is stored unless the
spec is valid.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import reprlib
from dataclasses import dataclass, field
from typing import Any

import yaml
from django.conf import settings
from django.utils import timezone

from orchestration.db import database_now
from orchestration.errors import SpecError
from orchestration.isodates import parse_iso_datetime
from orchestration.models import Agent, Priority

WORKFLOW_FIELDS = {
    "name",
    "workflow_type",
    "description",
    "tags",
    "metadata",
    "state",
    "deadline",
    "priority",
    "idempotency_key",
    "continue_on_failure",
    "tasks",
}
TASK_FIELDS = {
    "name",
    "agent",
    "input",
    "depends_on",
    "max_retries",
    "timeout_seconds",
    "priority",
    "description",
    "task_type",
}
TASK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,254}$")


@dataclass
class TaskSpec:
    name: str
    agent_id: str
    input: dict[str, Any]
    depends_on: list[str]
    max_retries: int
    timeout_seconds: int
    priority: str
    description: str = ""
    task_type: str = ""


@dataclass
class WorkflowSpec:
    name: str
    tasks: list[TaskSpec]
    workflow_type: str = ""
    description: str = ""
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    deadline: dt.datetime | None = None
    priority: str = Priority.NORMAL
    idempotency_key: str | None = None
    continue_on_failure: bool = False
    raw: dict[str, Any] = field(default_factory=dict)


class StrictYamlLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: YAML forbids it, and
    PyYAML would keep the last value (`name: a` then `name: b` is a workflow named b, the
    first line silently ignored). A merge (`<<: *base`) may still be overridden key by key."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {_shown(key)}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def json_object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's `object_pairs_hook` refusing a name given twice in one object: RFC 8259 leaves
    what such an object means to the reader; json keeps the last, so the first is silently
    ignored (for spec and definition files, and request bodies)."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"found duplicate key {_shown(key)} in one object")
        seen[key] = value
    return seen


def document_load(text: str, *, fmt: str) -> Any:
    """A JSON or YAML document (fmt 'json' or 'yaml'), YAML with StrictYamlLoader, either
    refusing a key given twice in one mapping. Raises ValueError or yaml.YAMLError for a
    document that is not one: besides their syntax errors, PyYAML raises ValueError for a date
    it cannot represent (`2026-02-30`, year 0) and json one for an integer of more than 4,300
    digits."""
    if fmt == "json":
        return json.loads(text, object_pairs_hook=json_object_without_duplicates)
    return yaml.load(text, Loader=StrictYamlLoader)  # noqa: S506


def spec_parse(text: str, *, fmt: str) -> dict[str, Any]:
    """Parse a spec document; fmt is 'json' or 'yaml'."""
    try:
        data = document_load(text, fmt=fmt)
    except (ValueError, yaml.YAMLError) as exc:
        raise SpecError([f"spec is not valid {fmt.upper()}: {exc}"]) from None
    except RecursionError:  # the parsers recurse once per level of nesting
        raise SpecError([f"spec is nested too deeply to read as {fmt.upper()}"]) from None
    if not isinstance(data, dict):
        raise SpecError(["spec must be a mapping with at least 'name' and 'tasks'"])
    return data


# A value a problem quotes is cut in its middle past 80 characters (a number past 40 digits):
# the problem names the field, and a megabyte string sent back whole says nothing more.
_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 80
_SHOWN.maxlong = 40


def _shown(value: Any) -> str:
    """`value` as a problem quotes it: its repr, cut in the middle when long."""
    return _SHOWN.repr(value)


def _int_in_range(value: Any, where: str, low: int, high: int, problems: list[str]) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append(f"{where} must be an integer, got {_shown(value)}")
        return None
    if not low <= value <= high:
        problems.append(f"{where} must be between {low} and {high}, got {_shown(value)}")
        return None
    return value


def _str(value: Any, where: str, problems: list[str], *, max_length: int = 255, required: bool = False) -> str:
    if value is None:
        if required:
            problems.append(f"{where} is required")
        return ""
    if not isinstance(value, str):
        problems.append(f"{where} must be a string, got {type(value).__name__}")
        return ""
    if required and not value.strip():
        problems.append(f"{where} must not be empty")
    if len(value) > max_length:
        problems.append(f"{where} is longer than {max_length} characters")
    return value


RESERVED_TASK_TYPES = frozenset({"conversation"})


def _task_type(value: Any, where: str, problems: list[str]) -> str:
    """A task's free-form type; the types the platform gives its own tasks are refused."""
    task_type = _str(value, where, problems, max_length=100)
    if task_type in RESERVED_TASK_TYPES:
        problems.append(f"{where}: {_shown(task_type)} is reserved for the platform's own tasks")
    return task_type


def _cycle(tasks: list[TaskSpec]) -> list[str] | None:
    """Return the names on one dependency cycle, or None (Kahn's algorithm, then a walk)."""
    names = {t.name for t in tasks}
    deps = {t.name: [d for d in t.depends_on if d in names] for t in tasks}
    indegree = {name: len(d) for name, d in deps.items()}
    dependents: dict[str, list[str]] = {name: [] for name in names}
    for name, ds in deps.items():
        for d in ds:
            dependents[d].append(name)
    ready = [n for n, k in indegree.items() if k == 0]
    seen = 0
    while ready:
        node = ready.pop()
        seen += 1
        for child in dependents[node]:
            indegree[child] -= 1
            if indegree[child] == 0:
                ready.append(child)
    if seen == len(names):
        return None
    remaining = {n for n, k in indegree.items() if k > 0}
    node = sorted(remaining)[0]
    path: list[str] = []
    while node not in path:
        path.append(node)
        node = next(d for d in deps[node] if d in remaining)
    return [*path[path.index(node) :], node]


# What json.dumps turns into a JSON object key (the text of the key); any other key type fails.
_JSON_KEY_TYPES = (str, int, float, bool, type(None))
_LEAVE = object()  # _unstorable's marker: the walk has left the container under it
# The values a spec may expand to: YAML aliases repeat what they name, and nine nested lists of
# ten aliases each ("billion laughs") are a few hundred bytes of YAML and 10**9 values in JSON.
# An API request's body is at most MAX_REQUEST_BODY_BYTES (2.5 MB by default), fewer values.
SPEC_MAX_VALUES = 1_000_000
# The text (strings and keys, in characters) a spec may expand to: ten thousand aliases of one
# string of 200 000 characters are 200 kB of YAML, far fewer values than SPEC_MAX_VALUES, and
# 2 GB of JSON when the spec is stored. Several times what a spec through the API may hold
# (MAX_REQUEST_BODY_BYTES), a few hundred MB of memory at most to store.
SPEC_MAX_TEXT_CHARS = 16 * 1024 * 1024


def spec_max_text_chars() -> int:
    """The text a document's values may expand to: SPEC_MAX_TEXT_CHARS, or the largest request
    body where an operator raised MAX_REQUEST_BODY_BYTES past it. A document holds no more
    characters than it has bytes (JSON and YAML spend at least one on each) unless aliases
    repeat them: a JSON spec within the body limit, which the API reads, is never refused as
    expanding past this."""
    return max(SPEC_MAX_TEXT_CHARS, settings.DATA_UPLOAD_MAX_MEMORY_SIZE)


@dataclass
class ValueWalk:
    """What the walks of one document's values share: how many values and characters of text
    they may still visit, and what the document is called in a problem ("spec")."""

    left: int = SPEC_MAX_VALUES
    text_left: int = field(default_factory=spec_max_text_chars)
    document: str = "spec"
    exhausted: bool = False


def _at(base: str, kind: str, step: Any) -> str:
    """The path of a value from its container's path: `kind` "" for the container itself, "k"
    for a key of it, "." for a value under a key, "[" for an element (a path at the top has no
    leading dot, as a validation error names a field)."""
    if kind == "k":
        return f"{base} (a key)" if base else "(a key)"
    if kind == ".":
        return _keyed(base, step)
    if kind == "[":
        return f"{base}[{step}]"
    return base


def _keyed(base: str, key: Any) -> str:
    """The path of the value under `key` in the mapping at `base`. A key holding a space is
    quoted in brackets (`metadata['my note']`): a problem reads "<path> <what is wrong>", and
    spelled bare the path would end at the key's space (field "metadata.my", detail "note
    contains a NUL character"); a key past 80 characters is quoted too, cut in its middle."""
    if isinstance(key, str) and (" " in key or len(key) > _SHOWN.maxstring):
        return f"{base}[{_shown(key)}]"
    return f"{base}.{key}" if base else str(key)


def _unstorable(value: Any, where: str, problems: list[str], walk: ValueWalk, *, text_only: bool = False) -> None:
    """Name each value under `where` that the JSON columns cannot hold: a YAML spec may carry a
    date (`since: 2026-01-01`), binary data or a set, and a JSON or YAML one NaN or an
    infinity, none of which JSON (or jsonb) has; PostgreSQL takes no NUL character nor an
    unpaired surrogate in any text. Found here they are problems of the spec, named by path,
    not an error of the database after validation (the API's parser leaves a spec's body to
    this walk; the submit_workflow command reads files). With `text_only`, only text is
    checked: for fields whose other checks name a wrong type. A YAML alias inside the node it
    names (`input: &x {self: *x}`) makes a value that contains itself, which no JSON document
    is: it is named too, and not walked for ever; nor is a spec whose aliases expand it past
    SPEC_MAX_VALUES values or spec_max_text_chars() characters of text (the walk stops there:
    storing it would expand it whole). A value's path is spelled only when it is named or holds
    values: a path per value, each repeating its parents', took memory of the values times the
    depth."""
    # (value, its container's path, kind, step: see _at), or (_LEAVE, a container id, "", None)
    stack: list[tuple[Any, Any, str, Any]] = [(value, where, "", None)]
    enclosing: set[int] = set()  # ids of the containers being walked (the current node's ancestors)
    while stack:
        if walk.exhausted:
            return
        item, base, kind, step = stack.pop()
        if item is _LEAVE:
            enclosing.discard(base)
            continue
        walk.left -= 1
        if isinstance(item, str):
            walk.text_left -= len(item)
        if walk.left < 0 or walk.text_left < 0:
            walk.exhausted = True
            size = f"{SPEC_MAX_VALUES:,} values" if walk.left < 0 else f"{spec_max_text_chars():,} characters of text"
            problems.append(
                f"{walk.document} expands to more than {size} (at {_at(base, kind, step)}; YAML aliases repeat "
                "what they name)"
            )
            return
        children: list[tuple[Any, Any, str, Any]] = []
        if isinstance(item, dict | list | tuple):
            path = _at(base, kind, step)
            if id(item) in enclosing:
                problems.append(f"{path} contains itself (a YAML alias inside the node it names), which JSON has not")
                continue
            enclosing.add(id(item))
            stack.append((_LEAVE, id(item), "", None))  # popped once every child of it has been walked
        if isinstance(item, str):
            if "\x00" in item:
                problems.append(f"{_at(base, kind, step)} contains a NUL character (\\u0000)")
            elif not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    problems.append(f"{_at(base, kind, step)} contains an unpaired UTF-16 surrogate")
        elif isinstance(item, bool | int) or item is None:
            continue
        elif isinstance(item, float):
            if not math.isfinite(item) and not text_only:
                # (A JSON number too large for a float, 1e400, reads as an infinity.)
                large = " (a number out of range)" if math.isinf(item) else ""
                problems.append(f"{_at(base, kind, step)} is {item!r}{large}: JSON has no NaN or infinity")
        elif isinstance(item, dict):
            for key, child in item.items():
                if not text_only:
                    if not isinstance(key, _JSON_KEY_TYPES):
                        problems.append(f"{path}: a key must be a string, got {type(key).__name__} {_shown(key)}")
                        continue
                    if isinstance(key, float) and not math.isfinite(key):
                        problems.append(f"{path}: a key is {_shown(key)}: JSON has no NaN or infinity")
                        continue
                children.extend([(key, path, "k", None), (child, path, ".", key)])
        elif isinstance(item, list | tuple):
            children.extend((child, path, "[", i) for i, child in enumerate(item))
        elif text_only:
            continue
        elif isinstance(item, dt.date):  # datetime too
            problems.append(
                f"{_at(base, kind, step)} is a {type(item).__name__} ({item.isoformat()}), which JSON has not: quote "
                f"it to pass it as text ('{item.isoformat()}')"
            )
        else:
            problems.append(f"{_at(base, kind, step)} is a {type(item).__name__}, which JSON has not")
        stack.extend(reversed(children))  # each problem in the order of the document


def unstorable_values(value: Any, where: str, walk: ValueWalk) -> list[str]:
    """The problems _unstorable names in `value` (at `where`), within what `walk` has left:
    for other documents read as specs are (agent definition files)."""
    problems: list[str] = []
    _unstorable(value, where, problems, walk)
    return problems


def _sendable(text: str) -> bool:
    """Whether PostgreSQL can be sent this text (no NUL character, no unpaired surrogate)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# The fields whose every value _unstorable checks; the others are checked for text alone.
_WALKED_FIELDS = ("name", "workflow_type", "description", "tags", "metadata", "state", "idempotency_key")
_WALKED_TASK_FIELDS = ("input", "description", "task_type")


def spec_validate(data: dict[str, Any]) -> WorkflowSpec:
    """Validate a parsed spec against the agents table and the configured limits."""
    problems: list[str] = []
    walk = ValueWalk()
    for key in _WALKED_FIELDS:
        if key in data:
            _unstorable(data[key], key, problems, walk)
    if isinstance(data.get("tasks"), list):
        for i, raw in enumerate(data["tasks"]):
            if isinstance(raw, dict):
                # Names, agents, dependencies and priorities are checked against what exists.
                for key in _WALKED_TASK_FIELDS:
                    if key in raw:
                        _unstorable(raw[key], f"tasks[{i}].{key}", problems, walk)
    # Text PostgreSQL cannot take anywhere else (a NUL in an agent's id, in an unknown field's
    # name): named by path among the other problems, which say what else is wrong there.
    rest = {key: value for key, value in data.items() if key not in _WALKED_FIELDS and key != "tasks"}
    _unstorable(rest, "", problems, walk, text_only=True)
    if isinstance(data.get("tasks"), list):
        for i, raw in enumerate(data["tasks"]):
            if isinstance(raw, dict):
                raw = {key: value for key, value in raw.items() if key not in _WALKED_TASK_FIELDS}
            _unstorable(raw, f"tasks[{i}]", problems, walk, text_only=True)
    elif "tasks" in data:
        _unstorable(data["tasks"], "tasks", problems, walk, text_only=True)
    for key in sorted(set(data) - WORKFLOW_FIELDS, key=str):  # (a YAML key may be a number)
        problems.append(f"{_keyed('', key)}: unknown field (allowed: {', '.join(sorted(WORKFLOW_FIELDS))})")

    name = _str(data.get("name"), "name", problems, required=True)
    workflow_type = _str(data.get("workflow_type"), "workflow_type", problems, max_length=100)
    description = _str(data.get("description"), "description", problems, max_length=10_000)
    priority = data.get("priority", Priority.NORMAL)
    if priority not in Priority.values:
        problems.append(f"priority must be one of {', '.join(Priority.values)}, got {_shown(priority)}")
        priority = Priority.NORMAL
    tags = data.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        problems.append("tags must be a list of strings")
        tags = []
    metadata = data.get("metadata", {})
    if not isinstance(metadata, dict):
        problems.append("metadata must be a mapping")
        metadata = {}
    state = data.get("state", {})
    if not isinstance(state, dict):
        problems.append("state must be a mapping")
        state = {}
    continue_on_failure = data.get("continue_on_failure", False)
    if not isinstance(continue_on_failure, bool):
        problems.append("continue_on_failure must be true or false")
        continue_on_failure = False
    idempotency_key = data.get("idempotency_key")
    if idempotency_key is not None:
        idempotency_key = _str(idempotency_key, "idempotency_key", problems, required=True) or None

    deadline = None
    if data.get("deadline") is not None:
        raw_deadline = data["deadline"]
        try:
            parsed = parse_iso_datetime(raw_deadline) if isinstance(raw_deadline, str) else None
        except ValueError:  # ISO 8601 in form, not a date (month 13, day 45)
            parsed = None
        if isinstance(raw_deadline, dt.datetime):
            parsed = raw_deadline
        if parsed is None:
            problems.append(
                "deadline must be an ISO 8601 date-time, YYYY-MM-DDThh:mm[:ss] with a time zone, "
                f"got {_shown(raw_deadline)}"
            )
        elif timezone.is_naive(parsed):
            problems.append("deadline must include a time zone (e.g. 2026-01-01T12:00:00Z)")
        else:
            try:
                # In UTC, as stored: 9999-12-31T23:59-10:00 is in year 10000, which
                # PostgreSQL would store and Python could not read back.
                parsed = parsed.astimezone(dt.UTC)
            except OverflowError:
                problems.append(f"deadline {_shown(raw_deadline)} is out of range (outside the years 1 to 9999 in UTC)")
            else:
                # On the database's clock, which every claim checks the deadline on: a web host
                # whose clock ran ahead refused a deadline that had not passed.
                if parsed <= database_now():
                    problems.append(f"deadline {parsed.isoformat()} is in the past")
                else:
                    deadline = parsed

    tasks: list[TaskSpec] = []
    raw_tasks = data.get("tasks")
    if not isinstance(raw_tasks, list) or not raw_tasks:
        problems.append("tasks must be a non-empty list")
        raw_tasks = []
    elif len(raw_tasks) > settings.WORKFLOW_MAX_TASKS:
        problems.append(f"tasks has {len(raw_tasks)} entries; at most {settings.WORKFLOW_MAX_TASKS} are allowed")
        raw_tasks = []

    # A NUL or an unpaired surrogate cannot even be sent in a query: such an id is an unknown agent.
    agent_ids = {
        t["agent"]
        for t in raw_tasks
        if isinstance(t, dict) and isinstance(t.get("agent"), str) and _sendable(t["agent"])
    }
    agents = {a.id: a for a in Agent.objects.filter(id__in=agent_ids)}
    seen_names: set[str] = set()
    for i, raw in enumerate(raw_tasks):
        where = f"tasks[{i}]"
        if not isinstance(raw, dict):
            problems.append(f"{where} must be a mapping")
            continue
        for key in sorted(set(raw) - TASK_FIELDS, key=str):
            problems.append(f"{_keyed(where, key)}: unknown field (allowed: {', '.join(sorted(TASK_FIELDS))})")
        task_name = _str(raw.get("name"), f"{where}.name", problems, required=True)
        if task_name:
            if TASK_NAME_RE.match(task_name):
                where = f"tasks[{i}] ({task_name})"
            else:
                # Quoted in its own problem, not said in the path: a name holding ')' or ': '
                # ("x) y") was read as part of the path, each problem of its task then named
                # under another field ("tasks[0]", the detail "y).agent: ...").
                problems.append(f"{where}.name {_shown(task_name)} may contain only letters, digits, '_', '.' and '-'")
            if task_name in seen_names:
                problems.append(f"{where}.name is a duplicate task name")
            seen_names.add(task_name)
        agent_id = _str(raw.get("agent"), f"{where}.agent", problems, max_length=50, required=True)
        if agent_id:
            agent = agents.get(agent_id)
            if agent is None:
                problems.append(f"{where}.agent: unknown agent {_shown(agent_id)}")
            elif agent.status != Agent.Status.ACTIVE:
                problems.append(f"{where}.agent: agent {_shown(agent_id)} is {agent.status}, not active")
        task_input = raw.get("input", {})
        if not isinstance(task_input, dict):
            problems.append(f"{where}.input must be a mapping")
            task_input = {}
        depends_on = raw.get("depends_on", [])
        if isinstance(depends_on, str):
            depends_on = [depends_on]
        if not isinstance(depends_on, list) or not all(isinstance(d, str) for d in depends_on):
            problems.append(f"{where}.depends_on must be a list of task names")
            depends_on = []
        max_retries = _int_in_range(
            raw.get("max_retries", 3), f"{where}.max_retries", 0, settings.TASK_MAX_RETRIES_LIMIT, problems
        )
        timeout_seconds = _int_in_range(
            raw.get("timeout_seconds", settings.TASK_DEFAULT_TIMEOUT_SECONDS),
            f"{where}.timeout_seconds",
            1,
            settings.TASK_MAX_TIMEOUT_SECONDS,
            problems,
        )
        task_priority = raw.get("priority", priority)
        if task_priority not in Priority.values:
            choices = ", ".join(Priority.values)
            problems.append(f"{where}.priority must be one of {choices}, got {_shown(task_priority)}")
        tasks.append(
            TaskSpec(
                name=task_name,
                agent_id=agent_id,
                input=task_input,
                depends_on=list(dict.fromkeys(depends_on)),
                max_retries=max_retries if max_retries is not None else 0,
                timeout_seconds=timeout_seconds or 1,
                priority=task_priority,
                description=_str(raw.get("description"), f"{where}.description", problems, max_length=10_000),
                task_type=_task_type(raw.get("task_type"), f"{where}.task_type", problems),
            )
        )

    names = {t.name for t in tasks}
    self_dependent = False
    for i, task in enumerate(tasks):
        for dep in task.depends_on:
            if dep == task.name:
                self_dependent = True
                problems.append(f"tasks[{i}] ({task.name}).depends_on: a task cannot depend on itself")
            elif dep not in names:
                problems.append(f"tasks[{i}] ({task.name}).depends_on: unknown task {_shown(dep)}")
    # The graph is defined once every task has a name of its own (an unknown dependency is no
    # edge), so a cycle is reported beside the other problems; a self-dependency is named above.
    if len(names) == len(tasks) and "" not in names and not self_dependent:
        cycle = _cycle(tasks)
        if cycle:
            problems.append(f"tasks: dependency cycle {' -> '.join(cycle)} (each task depends on the next)")

    if problems:
        raise SpecError(problems)
    return WorkflowSpec(
        name=name,
        tasks=tasks,
        workflow_type=workflow_type,
        description=description,
        tags=tags,
        metadata=metadata,
        state=state,
        deadline=deadline,
        priority=priority,
        idempotency_key=idempotency_key,
        continue_on_failure=continue_on_failure,
        raw=json.loads(json.dumps(data, default=str)),
    )
