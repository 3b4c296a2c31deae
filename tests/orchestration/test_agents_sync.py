"""load_agents: definition files synced into the agents table, with errors that name the
file and the field and change nothing."""

from __future__ import annotations

import io
import json
import socket
import time

import pytest
from django.core.management import CommandError, call_command

from orchestration.errors import PermanentError
from orchestration.models import Agent, Event
from orchestration.runtime.urlpolicy import url_check

ECHO = {"id": "echo-x", "name": "Echo", "executor": "python", "entrypoint": "orchestration.runtime.builtin.echo"}
LLM = {
    "id": "llm-x",
    "name": "LLM",
    "executor": "llm",
    "provider": "openai",
    "model": "gpt-4o-mini",
    "api_key_env": "OPENAI_API_KEY",
}


def sync(path) -> str:
    out = io.StringIO()
    call_command("load_agents", str(path), stdout=out)
    return out.getvalue()


def test_creates_updates_deactivates_and_reports_unchanged(db, tmp_path):
    (tmp_path / "echo.json").write_text(json.dumps(ECHO))
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "sleep.yaml").write_text(
        "id: sleep-x\nname: Sleep\nexecutor: python\nentrypoint: orchestration.runtime.builtin.sleep\n"
    )
    assert "2 created, 0 updated, 0 deactivated, 0 unchanged" in sync(tmp_path)
    assert Agent.objects.get(pk="sleep-x").definition_path == "nested/sleep.yaml"
    assert "0 created, 0 updated, 0 deactivated, 2 unchanged" in sync(tmp_path)

    (tmp_path / "echo.json").write_text(json.dumps({**ECHO, "description": "now described"}))
    (tmp_path / "nested" / "sleep.yaml").unlink()
    out = sync(tmp_path)
    assert "0 created, 1 updated, 1 deactivated, 0 unchanged" in out
    assert Agent.objects.get(pk="echo-x").description == "now described"
    assert Agent.objects.get(pk="sleep-x").status == Agent.Status.INACTIVE
    assert Event.objects.filter(event_type="agent_registered", entity_id="echo-x").count() == 2


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"a.json": json.dumps({**ECHO, "temperature": "hot"})}, "a.json: temperature: wrong type str"),
        ({"a.json": json.dumps({**ECHO, "colour": "red"})}, "a.json: colour: unknown field"),
        ({"a.json": json.dumps({**ECHO, "entrypoint": ""})}, "a.json: entrypoint: required for the python executor"),
        ({"a.json": json.dumps({**ECHO, "executor": "magic"})}, "a.json: executor: must be one of python, http, llm"),
        ({"a.yaml": "id: [unclosed"}, "a.yaml: cannot be read as YAML"),
        (
            {"a.yaml": "id: a\nname: A\nname: B\nexecutor: python\nentrypoint: orchestration.runtime.builtin.echo\n"},
            "found duplicate key 'name'",
        ),
        (
            {"a.json": '{"id": "a", "name": "A", "executor": "python", "executor": "http"}'},
            "a.json: cannot be read as JSON: found duplicate key 'executor'",
        ),
        ({"a.yaml": "id: a\nname: A\nmetadata: {since: 0000-01-01}\n"}, "a.yaml: cannot be read as YAML: year 0"),
        ({"a.json": json.dumps(ECHO), "b.json": json.dumps(ECHO)}, "b.json: id: 'echo-x' is also defined in"),
        (
            {"a.json": json.dumps({**ECHO, "entrypoint": "orchestration.runtime.builtin.nope"})},
            "a.json: entrypoint: 'orchestration.runtime.builtin.nope' cannot be imported",
        ),
        ({"a.json": json.dumps({**ECHO, "entrypoint": "orchestration.runtime.builtin.time"})}, "is not callable"),
        ({"a.json": json.dumps({**ECHO, "executor": "http"})}, "a.json: url: required for the http executor"),
        (
            {"a.json": json.dumps({**ECHO, "executor": "http", "url": "ftp://svc/"})},
            "a.json: url: agent URL 'ftp://svc/' refused: only http and https are allowed",
        ),
        (
            {"a.json": json.dumps({**ECHO, "executor": "http", "url": "https:///run"})},
            "a.json: url: agent URL 'https:///run' refused: it has no host",
        ),
        (
            {"a.json": json.dumps({**ECHO, "executor": "http", "url": "https://u:p@svc/"})},
            "a.json: url: agent URL refused: credentials in a URL are not allowed",
        ),
        (
            {"a.json": json.dumps({**ECHO, "executor": "http", "url": "http://[::1/run"})},
            "a.json: url: agent URL 'http://[::1/run' is not a valid URL",
        ),
        (
            {"a.json": json.dumps({**ECHO, "executor": "http", "url": "http://svc\u0000/run"})},
            "a.json: url: agent URL 'http://svc\\x00/run' is not a valid URL",
        ),
        ({"a.json": json.dumps({**LLM, "model": ""})}, "a.json: model: required for the llm executor"),
        ({"a.json": json.dumps({**LLM, "provider": "skynet"})}, "a.json: provider: 'skynet' is not supported"),
        ({"a.json": json.dumps({**LLM, "api_key_env": "sk-abc123"})}, "a.json: api_key_env: must be an environment"),
        ({"a.json": json.dumps({**LLM, "api_key_env": ""})}, "a.json: api_key_env: required for this provider"),
        ({"a.json": json.dumps({**LLM, "temperature": 3})}, "a.json: temperature: must be between 0 and 2"),
        ({"a.json": json.dumps({**ECHO, "config": {"tools": ["calculator", "teleport"]}})}, "no tool named 'teleport'"),
        ({"a.json": json.dumps({**ECHO, "config": {"tools": "calculator"}})}, "config.tools: must be a list"),
    ],
)
def test_invalid_definitions_are_named_and_nothing_is_written(db, tmp_path, files, message):
    (tmp_path / "good.json").write_text(json.dumps({**ECHO, "id": "good"}))
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(CommandError, match="invalid agent definitions") as info:
        sync(tmp_path)
    assert message in str(info.value)
    assert not Agent.objects.filter(pk__in=["good", "echo-x"]).exists(), "a valid file beside a bad one is not synced"


LAUGHS = "".join(
    f"  l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * 10)}]\n" for level in range(1, 10)
)  # nine nested lists of ten aliases each: 10**9 values


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("metadata: &m {self: *m}\n", "a.yaml: metadata.self contains itself (a YAML alias inside the node it names)"),
        (
            "metadata:\n  l0: &l0 [lol]\n" + LAUGHS,
            "a.yaml: definition expands to more than 1,000,000 values (at metadata.",
        ),
    ],
    ids=["contains-itself", "billion-laughs"],
)
def test_a_definition_whose_yaml_aliases_no_json_can_hold_is_named_within_bounds(db, tmp_path, document, message):
    """A definition file is read as a spec is: an alias inside the node it names was told as
    "infinity and NaN are not allowed", and a few hundred bytes of aliases were expanded whole
    (gigabytes, minutes, then a MemoryError's traceback)."""
    (tmp_path / "a.yaml").write_text(
        "id: a\nname: A\nexecutor: python\nentrypoint: orchestration.runtime.builtin.echo\n" + document
    )
    started = time.monotonic()
    with pytest.raises(CommandError, match="invalid agent definitions") as info:
        sync(tmp_path)
    assert message in str(info.value)
    assert time.monotonic() - started < 30, "stopped at the limit, not after expanding every alias"
    assert not Agent.objects.filter(pk="a").exists()


@pytest.mark.parametrize("url", ["ftp://svc/", "https://u:p@svc/", "https:///run", "http://[::1/run"])
def test_a_definition_url_is_refused_with_the_request_time_policys_own_words(db, tmp_path, url):
    (tmp_path / "a.json").write_text(json.dumps({**ECHO, "executor": "http", "url": url}))
    with pytest.raises(PermanentError) as runtime:
        url_check(url)
    with pytest.raises(CommandError) as loading:
        sync(tmp_path)
    assert f"a.json: url: {runtime.value}" in str(loading.value)


def test_definition_urls_are_checked_offline(db, tmp_path, monkeypatch, settings):
    settings.AGENT_HTTP_ALLOWED_HOSTS = ["elsewhere.example.com"]  # the deployment's rule, applied per request
    settings.AGENT_HTTP_ALLOW_PRIVATE = True  # (else 127.0.0.1 is refused, below)

    def no_dns(*args, **kwargs):
        raise AssertionError("load_agents looked a host up")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    remote = {**ECHO, "id": "remote", "executor": "http", "url": "https://agents.invalid/run"}
    local = {**ECHO, "id": "local-svc", "executor": "http", "url": "http://127.0.0.1:9/run"}
    (tmp_path / "remote.json").write_text(json.dumps(remote))
    (tmp_path / "local.json").write_text(json.dumps(local))
    assert "2 created" in sync(tmp_path)
    assert url_check(remote["url"], resolve=False).addresses == ()


def test_a_missing_directory_is_named(db, tmp_path):
    with pytest.raises(CommandError, match="no such directory"):
        sync(tmp_path / "nope")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/run",
        "http://localhost:11434/v1",
        "http://agent.localhost:8080/run",  # every name under localhost (RFC 6761)
        "http://[fd00::1]/",
        # 127.0.0.1 in the forms the resolver reads without asking DNS (inet_aton's)
        "http://2130706433:9/run",
        "http://127.1:9/run",
        "http://0x7f.1/",
        "http://017700000001/",
    ],
)
def test_a_definition_url_at_an_address_every_request_would_refuse_is_refused(db, tmp_path, settings, url):
    """As through the API and the console: the agent would fail every task, saying this."""
    settings.AGENT_HTTP_ALLOW_PRIVATE = False
    (tmp_path / "a.json").write_text(json.dumps({**ECHO, "executor": "http", "url": url}))
    refusal = r"a\.json: url: agent URL .* refused: .* \(set AGENT_HTTP_ALLOW_PRIVATE=true"
    with pytest.raises(CommandError, match=refusal):
        sync(tmp_path)
    settings.AGENT_HTTP_ALLOW_PRIVATE = True
    assert "1 created" in sync(tmp_path)


def test_a_local_openai_compatible_server_needs_no_key_but_anthropic_does(db, tmp_path, settings):
    settings.AGENT_HTTP_ALLOW_PRIVATE = True  # (the server is on 127.0.0.1)
    local = {**LLM, "id": "local", "provider": "ollama", "url": "http://127.0.0.1:11434/v1", "api_key_env": ""}
    del local["api_key_env"]
    (tmp_path / "local.json").write_text(json.dumps(local))
    sync(tmp_path)
    assert Agent.objects.get(pk="local").provider == "ollama"
    claude = {**LLM, "id": "claude", "provider": "anthropic", "model": "claude-3-5-haiku-latest"}
    del claude["api_key_env"]
    (tmp_path / "claude.json").write_text(json.dumps(claude))
    with pytest.raises(CommandError, match=r"claude\.json: api_key_env: required for this provider"):
        sync(tmp_path)


SEED_004_YAML = """\
name: Dynamic Pricing Engine
description: Optimises room and service pricing based on demand signals
version: 1.0.0
model: claude-3-5-sonnet-20241022
temperature: 0.7
max_tokens: 4096
system_prompt: |
  You are an expert in dynamic pricing for the hospitality industry...
capabilities:
  - demand_forecasting
  - price_optimization
executor: llm
provider: anthropic
api_key_env: ANTHROPIC_API_KEY
"""


def test_a_seed_004_yaml_definition_takes_its_id_and_category_from_its_path(db, tmp_path):
    (tmp_path / "hospitality_tourism").mkdir()
    (tmp_path / "hospitality_tourism" / "dynamic-pricing.yaml").write_text(SEED_004_YAML)
    sync(tmp_path)
    agent = Agent.objects.get(pk="dynamic-pricing")
    assert (agent.name, agent.category, agent.model, agent.max_tokens) == (
        "Dynamic Pricing Engine",
        "hospitality_tourism",
        "claude-3-5-sonnet-20241022",
        4096,
    )
    assert agent.definition_path == "hospitality_tourism/dynamic-pricing.yaml"


def test_an_id_that_cannot_be_an_agent_id_is_named(db, tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({**ECHO, "id": "has spaces"}))
    with pytest.raises(CommandError, match=r"a\.json: id: 'has spaces': use 1-50 letters"):
        sync(tmp_path)


def test_a_sync_deactivates_only_the_agents_of_the_directory_it_reads(db, tmp_path):
    """Loading one more directory leaves the built-in agents alone, and the built-in sync leaves
    that directory's agents alone; each directory deactivates only what it defined."""
    call_command("load_agents", stdout=io.StringIO())
    builtins = set(Agent.objects.filter(status=Agent.Status.ACTIVE).values_list("pk", flat=True))
    assert "echo" in builtins
    (tmp_path / "echo.json").write_text(json.dumps(ECHO))
    assert "1 created, 0 updated, 0 deactivated" in sync(tmp_path)
    again = io.StringIO()
    call_command("load_agents", stdout=again)  # the built-in directory again
    assert "0 deactivated" in again.getvalue()
    active = set(Agent.objects.filter(status=Agent.Status.ACTIVE).values_list("pk", flat=True))
    assert active == builtins | {"echo-x"}
    (tmp_path / "echo.json").unlink()
    (tmp_path / "other.json").write_text(json.dumps({**ECHO, "id": "other-x"}))
    assert "1 created, 0 updated, 1 deactivated" in sync(tmp_path)
    assert Agent.objects.get(pk="echo-x").status == Agent.Status.INACTIVE
    assert (
        set(Agent.objects.filter(pk__in=builtins, status=Agent.Status.ACTIVE).values_list("pk", flat=True)) == builtins
    )
    # The root is recorded, and is empty for the default directory (where the project lives may change).
    assert Agent.objects.get(pk="other-x").definition_root == str(tmp_path.resolve())
    assert Agent.objects.get(pk="echo").definition_root == ""


def test_the_default_sync_deactivates_an_agent_last_loaded_from_its_subdirectory(db, tmp_path, settings):
    """The default directory is read recursively: an agent last loaded from one of its
    subdirectories is one of its agents, and is deactivated when its file is gone."""
    settings.BASE_DIR = tmp_path / "base"
    sub = tmp_path / "base" / "agents" / "definitions" / "team"
    sub.mkdir(parents=True)
    (sub / "echo.json").write_text(json.dumps(ECHO))
    assert "1 created" in sync(sub)  # operator loads only the team's directory
    (sub / "echo.json").unlink()
    out = io.StringIO()
    call_command("load_agents", stdout=out)  # the default directory, which contains team/
    assert Agent.objects.get(pk="echo-x").status == Agent.Status.INACTIVE, out.getvalue()


def test_a_subdirectory_sync_deactivates_a_default_agent_whose_file_it_reads(db, tmp_path, settings):
    settings.BASE_DIR = tmp_path / "base"
    default = tmp_path / "base" / "agents" / "definitions"
    (default / "team").mkdir(parents=True)
    (default / "team" / "echo.json").write_text(json.dumps(ECHO))
    (default / "other.json").write_text(json.dumps({**ECHO, "id": "other-x"}))
    call_command("load_agents", stdout=io.StringIO())
    (default / "team" / "echo.json").unlink()
    assert "1 deactivated" in sync(default / "team")
    assert Agent.objects.get(pk="other-x").status == Agent.Status.ACTIVE


def test_every_definition_a_sync_loads_or_retires_is_on_record_with_its_content(db, tmp_path):
    """What an attempt ran with can only be told from the record if each version of its agent's
    definition is there: a sync's events carry the definition, an edit undone has its first
    hash again, and an agent whose file was removed (or renamed) is recorded as deactivated."""
    (tmp_path / "llm.json").write_text(json.dumps({**LLM, "temperature": 1, "system_prompt": "Be brief."}))
    sync(tmp_path)
    (tmp_path / "llm.json").write_text(json.dumps({**LLM, "temperature": 0.2, "system_prompt": "Be thorough."}))
    sync(tmp_path)
    (tmp_path / "llm.json").write_text(json.dumps({**LLM, "temperature": 1, "system_prompt": "Be brief."}))
    sync(tmp_path)
    (tmp_path / "llm.json").unlink()
    assert "1 deactivated" in sync(tmp_path)

    events = list(Event.objects.filter(event_type="agent_registered", entity_id="llm-x").order_by("sequence"))
    payloads = [e.payload for e in events]
    assert len(payloads) == 4, payloads
    first, edited, undone, retired = payloads
    assert first["fields"]["system_prompt"] == "Be brief." and first["fields"]["temperature"] == 1.0
    assert edited["fields"]["system_prompt"] == "Be thorough." and edited["fields"]["temperature"] == 0.2
    assert edited["definition_sha256"] != first["definition_sha256"]
    assert undone["definition_sha256"] == first["definition_sha256"]
    assert retired["change"] == "deactivated" and retired["definition"] == "llm.json"
    assert retired["definition_sha256"] == undone["definition_sha256"]
    assert retired["fields"]["model"] == "gpt-4o-mini"
    assert Agent.objects.get(pk="llm-x").definition_hash == first["definition_sha256"]


def test_a_sync_keeps_the_status_and_max_concurrency_an_operator_set(db, tmp_path):
    """A built-in agent an operator took out of service (or limited) stays so through every
    load_agents (each deploy runs one); what the definition owns is still updated from its file,
    and a file's change of a field the operator did not touch still applies."""
    path = tmp_path / "echo.json"
    path.write_text(json.dumps({**ECHO, "max_concurrency": 4}))
    sync(tmp_path)
    Agent.objects.filter(pk="echo-x").update(status=Agent.Status.INACTIVE, max_concurrency=1)  # the operator's

    out = sync(tmp_path)
    agent = Agent.objects.get(pk="echo-x")
    assert (agent.status, agent.max_concurrency) == (Agent.Status.INACTIVE, 1), out
    assert "kept        echo-x: status inactive (the definition: active)" in out
    assert "kept        echo-x: max_concurrency 1 (the definition: 4)" in out

    path.write_text(json.dumps({**ECHO, "max_concurrency": 8, "description": "now described"}))
    out = sync(tmp_path)
    agent = Agent.objects.get(pk="echo-x")
    assert (agent.status, agent.max_concurrency, agent.description) == (Agent.Status.INACTIVE, 1, "now described")
    assert "updated     echo-x: description" in out
    assert "max_concurrency 1 (the definition: 8)" in out

    # Set back to what the definition says, a field is the definition's again.
    Agent.objects.filter(pk="echo-x").update(status=Agent.Status.ACTIVE)
    path.write_text(json.dumps({**ECHO, "max_concurrency": 8, "status": "maintenance"}))
    out = sync(tmp_path)
    assert Agent.objects.get(pk="echo-x").status == Agent.Status.MAINTENANCE, out
    assert "updated     echo-x: description, status" in out

    # A file removed retires its agent; the file back brings it back.
    path.write_text(json.dumps(ECHO))
    sync(tmp_path)
    assert Agent.objects.get(pk="echo-x").status == Agent.Status.ACTIVE
    path.unlink()
    assert "1 deactivated" in sync(tmp_path)
    path.write_text(json.dumps(ECHO))
    out = sync(tmp_path)
    assert Agent.objects.get(pk="echo-x").status == Agent.Status.ACTIVE, out
