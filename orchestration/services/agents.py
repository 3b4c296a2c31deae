"""Agent definitions (agents/definitions/*.json|*.yaml) synced into the agents table.

Definitions are code; the table is their queryable copy. A sync creates new agents,
updates changed ones, marks agents whose file disappeared inactive, and says what changed.
The operator's fields (OPERATOR_FIELDS: status, max_concurrency) are the exception: a value an
operator set is kept, and the sync says so.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from django.conf import settings
from django.db import transaction

from orchestration.errors import PermanentError, SpecError
from orchestration.event_types import EntityType, EventType
from orchestration.models import Agent
from orchestration.runtime.executors import ENTRYPOINT_ERROR_PREFIX, entrypoint_load
from orchestration.runtime.llm import ENV_NAME, OPENAI_COMPATIBLE, api_key_env_problem, key_host_problem
from orchestration.runtime.tools import jsonb_problem, registry
from orchestration.runtime.urlpolicy import url_check
from orchestration.services.events import event_record
from orchestration.services.specs import ValueWalk, document_load, unstorable_values

DEFINITION_FIELDS = {
    "id": str,
    "name": str,
    "role": str,
    "description": str,
    "category": str,
    "version": str,
    "executor": str,
    "entrypoint": str,
    "model": str,
    "provider": str,
    "url": str,
    "api_key_env": str,
    "system_prompt": str,
    "temperature": (int, float),
    "max_tokens": int,
    "max_concurrency": int,
    "capabilities": list,
    "specialties": list,
    "backstory": str,
    "personality_emoji": str,
    "config": dict,
    "status": str,
    "metadata": dict,
}


# An operator's to set on a running deployment (the console): taking an agent out of service,
# holding it to what its provider's quota allows. A definition file gives their first value; a
# sync changes one only while the row holds what the file last said (`definition_values`): a
# value an operator set is kept until they set it back, and the sync says so.
OPERATOR_FIELDS = ("status", "max_concurrency")


# What an agent runs as, of its definition: every field but its id (the same definition under
# another id is the same definition) and its status (deactivating it changes nothing it runs).
SNAPSHOT_FIELDS = tuple(name for name in DEFINITION_FIELDS if name not in ("id", "status"))


def definition_snapshot(agent: Agent) -> dict[str, Any]:
    """The agent's definition as its row holds it, for the agent_registered event of each of
    its changes: `fields`, every definition field but the id and status, and
    `definition_sha256`, the sha256 of their canonical JSON (kept in the row's
    `definition_hash`, which each attempt's `task_started` event records). Each version of a
    definition, however it was changed (API, console, load_agents), is thus on record with its
    content, and a change undone later has its earlier hash again."""
    # As the column reads it back (a definition's temperature of 1 is 1.0), so that the same
    # definition hashes the same whether the row was just written or read.
    fields = {name: Agent._meta.get_field(name).to_python(getattr(agent, name)) for name in SNAPSHOT_FIELDS}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return {"definition_sha256": hashlib.sha256(canonical.encode("utf-8")).hexdigest(), "fields": fields}


@dataclass
class SyncResult:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    deactivated: list[str] = field(default_factory=list)
    # agent id -> the fields an update changed; and -> operator values kept, as "field value
    # (the definition: value)"
    changed: dict[str, list[str]] = field(default_factory=dict)
    kept: dict[str, list[str]] = field(default_factory=dict)


def _shown(value: Any) -> str:
    return "none" if value is None else str(value)


def default_definitions_dir() -> Path:
    return Path(settings.BASE_DIR) / "agents" / "definitions"


AGENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,49}$")


def definition_load(path: Path, *, root: Path | None = None) -> dict[str, Any]:
    """Read and validate one definition file; errors name the file and the field.

    As in seed 004's YAML layout (agents/definitions/<category>/<agent>.yaml), a file
    without `id` takes its name (without the extension), and without `category` the name of
    its directory below `root`."""
    try:
        text = path.read_text(encoding="utf-8")
        data = document_load(text, fmt="json" if path.suffix == ".json" else "yaml")
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise SpecError([f"{path}: cannot be read as {path.suffix[1:].upper()}: {exc}"]) from None
    except RecursionError:  # the parsers recurse once per level of nesting
        raise SpecError([f"{path}: nested too deeply to read as {path.suffix[1:].upper()}"]) from None
    if not isinstance(data, dict):
        raise SpecError([f"{path}: must contain a mapping"])
    data.setdefault("id", path.stem)
    if root is not None and path.parent != root and "category" not in data:
        data["category"] = path.parent.name
    problems = []
    if isinstance(data["id"], str) and not AGENT_ID.match(data["id"]):
        problems.append(f"{path}: id: {data['id']!r}: use 1-50 letters, digits, '.', '_' or '-'")
    for key, value in data.items():
        expected = DEFINITION_FIELDS.get(key)
        if expected is None:
            problems.append(f"{path}: {key}: unknown field")
        elif isinstance(value, bool) or not isinstance(value, expected):
            problems.append(f"{path}: {key}: wrong type {type(value).__name__}")
        elif isinstance(value, str) and len(value) > (limit := _max_length(key)):
            problems.append(f"{path}: {key}: {len(value)} characters; at most {limit}")
    for key in ("id", "name", "executor"):
        if not data.get(key):
            problems.append(f"{path}: {key}: required")
    if data.get("executor") and data["executor"] not in Agent.Executor.values:
        problems.append(f"{path}: executor: must be one of {', '.join(Agent.Executor.values)}")
    if data.get("status") and data["status"] not in Agent.Status.values:
        problems.append(f"{path}: status: must be one of {', '.join(Agent.Status.values)}")
    if not problems:
        problems.extend(f"{path}: {problem}" for problem in executor_problems(data))
    # What the agents table cannot store, checked last so that a more specific problem of the
    # same field (an invalid URL, a temperature out of range) is named first.
    walk = ValueWalk(document="definition")
    for key, value in data.items():
        if key in DEFINITION_FIELDS:
            problems.extend(f"{path}: {problem}" for problem in _storable_problems(key, value, walk))
    if problems:
        raise SpecError(problems)
    return data


MAX_INTEGER = 2**31 - 1  # the columns of max_tokens and max_concurrency are integer


def _storable_problems(key: str, value: Any, walk: ValueWalk) -> list[str]:
    """What the agents table cannot store of a field's value (naming the field and the path
    in it): YAML values JSON has no type for (dates, sets, binary), infinities and NaN, NUL
    characters and unpaired surrogates, integers beyond the column's range. Walked as a
    spec's values are, within what one file may expand to (`walk`): a YAML alias inside the
    node it names was told as "infinity and NaN", and nine nested lists of ten aliases each, a
    few hundred bytes, were expanded whole by json.dumps (gigabytes, then a MemoryError)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INTEGER:
        return [f"{key}: {value} is out of range (at most {MAX_INTEGER})"]
    if problems := unstorable_values(value, key, walk):
        return problems
    problem = jsonb_problem(value, key)  # (keys that JSON writes alike: 1 and "1")
    return [problem] if problem else []


def _max_length(key: str) -> float:
    """The column's length limit for a text field of a definition (infinite for text)."""
    return Agent._meta.get_field(key).max_length or float("inf")


def executor_problems(data: dict[str, Any]) -> list[str]:
    """What the definition lacks for its executor to run, each as 'field: problem'."""
    problems = []
    executor = data["executor"]
    if executor == Agent.Executor.PYTHON:
        entrypoint = data.get("entrypoint")
        if not entrypoint:
            problems.append("entrypoint: required for the python executor")
        else:
            try:
                entrypoint_load(entrypoint)  # what the worker will check before each call
            except PermanentError as exc:
                problems.append(f"entrypoint: {str(exc).removeprefix(ENTRYPOINT_ERROR_PREFIX)}")
    if executor == Agent.Executor.HTTP and not data.get("url"):
        problems.append("url: required for the http executor")
    if data.get("url"):
        try:
            url_check(data["url"], resolve=False)  # offline: the deployment's rules apply at request time
        except PermanentError as exc:
            problems.append(f"url: {exc}")
    if executor == Agent.Executor.LLM:
        provider = (data.get("provider") or "").lower()
        if not data.get("model"):
            problems.append("model: required for the llm executor")
        if provider not in OPENAI_COMPATIBLE and provider != "anthropic":
            problems.append(
                f"provider: {data.get('provider')!r} is not supported (openai, an OpenAI-compatible server "
                "such as ollama, vllm or lmstudio, or anthropic)"
            )
        elif not data.get("api_key_env") and (provider == "anthropic" or not data.get("url")):
            problems.append("api_key_env: required for this provider (the name of the variable holding the key)")
    if data.get("api_key_env"):
        if not ENV_NAME.match(data["api_key_env"]):
            problems.append("api_key_env: must be an environment variable name such as OPENAI_API_KEY, not the key")
        elif (problem := api_key_env_problem(data["api_key_env"])) is not None:
            problems.append(f"api_key_env: {problem.removeprefix('api_key_env ')}")
        elif (
            executor == Agent.Executor.LLM
            and data.get("url")
            and (problem := key_host_problem(data["url"], data.get("provider"))) is not None
        ):
            problems.append(f"url: {problem}")
    if "temperature" in data and not 0 <= data["temperature"] <= 2:
        problems.append("temperature: must be between 0 and 2")
    for key in ("max_tokens", "max_concurrency"):
        if key in data and data[key] < 1:
            problems.append(f"{key}: must be at least 1")
    tools = (data.get("config") or {}).get("tools", [])
    if not isinstance(tools, list) or not all(isinstance(t, str) for t in tools):
        problems.append("config.tools: must be a list of tool names")
    else:
        known = registry()
        problems.extend(
            f"config.tools: no tool named {name!r} (known: {', '.join(sorted(known))})"
            for name in tools
            if name not in known
        )
    return problems


def _read_by(agent: Agent, directory: Path) -> bool:
    """Whether a sync of `directory` (resolved) reads where `agent` was last loaded from: its
    definition file, under its `definition_root` ("": the default directory), is in `directory`
    or a directory under it."""
    root = Path(agent.definition_root) if agent.definition_root else default_definitions_dir().resolve()
    return directory in (root / agent.definition_path).parents


def agents_sync(*, directory: Path | None = None) -> SyncResult:
    """Sync every definition under `directory` (recursively) into the agents table. An agent
    that was defined under this directory and no longer is becomes inactive; agents defined
    under another directory (`definition_root`) are left alone."""
    directory = directory or default_definitions_dir()
    # The default directory is "" (rows from before the column, too): its agents keep their
    # root wherever the project is checked out.
    root = "" if directory.resolve() == default_definitions_dir().resolve() else str(directory.resolve())
    if not directory.is_dir():
        raise SpecError([f"{directory}: {'not a directory' if directory.exists() else 'no such directory'}"])
    files = sorted(p for p in directory.rglob("*") if p.suffix in (".json", ".yaml", ".yml"))
    definitions: dict[str, tuple[Path, dict[str, Any]]] = {}
    problems: list[str] = []
    for path in files:
        try:
            str(path).encode("utf-8")
        except UnicodeEncodeError:
            # Bytes that are not UTF-8 in a file's name (or its directory's) reach Python as lone
            # surrogates, which the agents table, where the file is recorded, cannot store.
            problems.append(f"{path}: the file's path is not UTF-8 text")
            continue
        try:
            data = definition_load(path, root=directory)
        except SpecError as exc:
            problems.extend(exc.problems)
            continue
        if data["id"] in definitions:
            problems.append(f"{path}: id: {data['id']!r} is also defined in {definitions[data['id']][0]}")
        definitions[data["id"]] = (path, data)
    if problems:
        raise SpecError(problems)

    result = SyncResult()
    with transaction.atomic():
        existing = {a.id: a for a in Agent.objects.select_for_update()}
        for agent_id, (path, data) in definitions.items():
            digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
            fields = {k: v for k, v in data.items() if k != "id"}
            fields.setdefault("status", Agent.Status.ACTIVE)
            fields.update(definition_path=str(path.relative_to(directory)), definition_root=root)
            agent = existing.get(agent_id)
            created = agent is None
            if agent is None:
                agent = Agent(id=agent_id)
            loaded = (agent.definition_hash, agent.status, agent.definition_root, agent.definition_path)
            before = {key: getattr(agent, key) for key in (*SNAPSHOT_FIELDS, "status", "definition_path")}
            definition = {
                key: fields[key] if key in fields else Agent._meta.get_field(key).get_default()
                for key in OPERATOR_FIELDS
            }
            # The operator's values: where the row no longer holds what the file last said (a row
            # from before definition_values: what the file says now).
            kept = {
                key: before[key]
                for key in OPERATOR_FIELDS
                if not created
                and before[key] != agent.definition_values.get(key, definition[key])
                and before[key] != definition[key]
            }
            # A field the definition no longer sets goes back to its default (the table is
            # the definition's copy, not a merge of every version of it).
            for key in DEFINITION_FIELDS.keys() - fields.keys() - {"id"}:
                setattr(agent, key, Agent._meta.get_field(key).get_default())
            for key, value in {**fields, **kept}.items():
                setattr(agent, key, value)
            if kept:
                result.kept[agent_id] = [
                    f"{key} {_shown(value)} (the definition: {_shown(definition[key])})" for key, value in kept.items()
                ]
            values_changed = agent.definition_values != definition
            agent.definition_values = definition
            # The hash of the definition as the row holds it (each attempt records its agent's):
            # a file whose definition is the row's already leaves the row alone.
            snapshot = definition_snapshot(agent)
            agent.definition_hash = snapshot["definition_sha256"]
            if created:
                agent.save(force_insert=True)
                result.created.append(agent_id)
            elif loaded == (agent.definition_hash, agent.status, agent.definition_root, agent.definition_path):
                if values_changed:  # the file changed an operator's value it keeps: nothing the agent runs as
                    agent.save(update_fields=["definition_values"])
                result.unchanged.append(agent_id)
                continue
            else:
                agent.save()
                result.updated.append(agent_id)
                result.changed[agent_id] = [key for key, value in before.items() if getattr(agent, key) != value]
            event_record(
                event_type=EventType.AGENT_REGISTERED,
                entity_type=EntityType.AGENT,
                entity_id=agent_id,
                agent_id=agent_id,
                payload={"definition": str(path.relative_to(directory)), "hash": digest, **snapshot},
            )
        read = directory.resolve()
        for agent_id, agent in existing.items():
            if (
                agent_id not in definitions
                and agent.definition_path
                and _read_by(agent, read)
                and agent.status == Agent.Status.ACTIVE
            ):
                agent.status = Agent.Status.INACTIVE
                # The definition's doing, not an operator's: its file back, the agent is active again.
                agent.definition_values = {**agent.definition_values, "status": Agent.Status.INACTIVE}
                agent.save(update_fields=["status", "definition_values", "updated_at"])
                result.deactivated.append(agent_id)
                # Its file is gone (deleted, or renamed: a file without an `id` names a new agent):
                # recorded as the API and the console record a deactivation.
                event_record(
                    event_type=EventType.AGENT_REGISTERED,
                    entity_type=EntityType.AGENT,
                    entity_id=agent_id,
                    agent_id=agent_id,
                    payload={
                        "change": "deactivated",
                        "definition": agent.definition_path,
                        **definition_snapshot(agent),
                    },
                )
    return result
