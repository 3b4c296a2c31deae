"""Agents: every role reads them and their statistics; only admins create, change and
deactivate them; server-owned fields are refused."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from django.utils import timezone

from orchestration.errors import TransitionError
from orchestration.models import Agent, Event, TaskExecution
from orchestration.services.agent_registry import agent_create, agent_deactivate, agent_update
from orchestration.services.agents import executor_problems
from tests.api.conftest import make_caller
from tests.factories import TaskExecutionFactory, WorkflowFactory

NEW = {
    "id": "summariser-001",
    "name": "Summariser",
    "executor": "python",
    "entrypoint": "orchestration.runtime.builtin.echo",
}


def test_admin_creates_changes_and_deactivates_an_agent(callers):
    admin = callers["admin"].client
    created = admin.post("/api/v1/agents/", NEW, format="json")
    assert created.status_code == 201, created.content
    assert created.json()["status"] == "active"
    changed = admin.patch("/api/v1/agents/summariser-001/", {"description": "three sentences"}, format="json")
    assert changed.json()["description"] == "three sentences"
    deactivated = admin.post("/api/v1/agents/summariser-001/deactivate/")
    assert deactivated.status_code == 200 and deactivated.json()["status"] == "inactive"
    assert admin.post("/api/v1/agents/summariser-001/deactivate/").status_code == 409
    changes = Event.objects.filter(event_type="agent_registered", entity_id="summariser-001")
    assert [e.payload["change"] for e in changes.order_by("sequence")] == ["created", "updated", "deactivated"]


def test_a_created_agent_is_named_by_its_location(callers):
    admin = callers["admin"].client
    created = admin.post("/api/v1/agents/", NEW, format="json")
    assert created["Location"] == "http://testserver/api/v1/agents/summariser-001/"
    assert admin.get(created["Location"]).json()["id"] == "summariser-001"


@pytest.mark.parametrize("body", ['{"reason": 5}', "[1]", "not json"], ids=["field", "array", "not-json"])
def test_deactivate_refuses_a_body_and_leaves_the_agent_active(callers, body):
    """Deactivate ignored its body (a `reason` it never recorded, a body that was not JSON)."""
    admin = callers["admin"].client
    assert admin.post("/api/v1/agents/", NEW, format="json").status_code == 201
    refused = admin.post("/api/v1/agents/summariser-001/deactivate/", body, content_type="application/json")
    assert refused.status_code == 400, refused.content
    assert len(refused.json()["errors"]) == 1
    assert Agent.objects.get(pk="summariser-001").status == "active"
    accepted = admin.post("/api/v1/agents/summariser-001/deactivate/", "{}", content_type="application/json")
    assert accepted.status_code == 200 and accepted.json()["status"] == "inactive"


def test_agent_input_problems_are_named_and_server_owned_fields_refused(callers):
    admin = callers["admin"].client
    response = admin.post(
        "/api/v1/agents/", {**NEW, "entrypoint": "", "status": "maintenance", "success_rate": 1}, format="json"
    )
    assert response.status_code == 400
    fields = {e["field"] for e in response.json()["errors"]}
    assert {"status", "success_rate"} <= fields
    no_entrypoint = admin.post("/api/v1/agents/", {**NEW, "entrypoint": ""}, format="json")
    assert no_entrypoint.status_code == 400
    assert no_entrypoint.json()["errors"][0]["field"] == "entrypoint"
    # The id's rule is told, not only that "this value does not match the required pattern".
    bad_id = admin.post("/api/v1/agents/", {**NEW, "id": "my agent!"}, format="json")
    rule = "use 1-50 lowercase letters, digits, '.', '_' or '-', beginning with a letter or digit"
    assert bad_id.status_code == 400 and bad_id.json()["errors"] == [{"field": "id", "detail": rule}]
    duplicate = admin.post("/api/v1/agents/", {**NEW, "id": "echo"}, format="json")
    assert duplicate.status_code == 400 and "already exists" in duplicate.json()["detail"]
    agent_create(fields={**NEW, "id": "tempered-001"})
    hot = admin.patch("/api/v1/agents/tempered-001/", {"temperature": 5}, format="json")
    assert hot.status_code == 400 and hot.json()["errors"][0]["field"] == "temperature"
    assert not Agent.objects.filter(pk="summariser-001").exists()


def test_agents_created_through_the_api_get_the_checks_of_load_agents(callers):
    admin = callers["admin"].client
    llm = {"id": "writer-9", "name": "Writer", "executor": "llm", "provider": "openai"}
    cases = {
        "model": {**llm, "api_key_env": "OPENAI_API_KEY"},
        "api_key_env": {**llm, "model": "gpt-4o-mini", "api_key_env": "sk-live-0123456789abcdef"},
        "provider": {**llm, "model": "m", "provider": "skynet", "api_key_env": "K"},
        "config.tools": {**NEW, "config": {"tools": ["teleport"]}},
    }
    for field, body in cases.items():
        response = admin.post("/api/v1/agents/", body, format="json")
        assert response.status_code == 400, (field, response.json())
        assert field in response.json()["detail"], (field, response.json()["detail"])
    assert not Agent.objects.filter(pk__in=["writer-9", NEW["id"]]).exists()
    assert "sk-live-0123456789abcdef" not in str(list(Agent.objects.values_list("api_key_env", flat=True)))


def test_an_agent_may_not_name_a_variable_agents_may_not_read(callers, settings):
    """An admin chooses an agent's URL and the variable whose value is sent there as its key:
    the platform's own settings and names outside AGENT_API_KEY_ENV_ALLOWED are refused, on
    creation and on update, and nothing is stored."""
    settings.AGENT_API_KEY_HOSTS = ["llm.example"]
    admin = callers["admin"].client
    llm = {"id": "courier-1", "name": "Courier", "executor": "llm", "model": "m", "url": "https://llm.example/v1"}
    for name, problem in [
        ("DATABASE_URL", "one of the platform's own settings"),
        ("SECRET_KEY", "one of the platform's own settings"),
        ("AWS_SECRET_ACCESS_KEY", "AGENT_API_KEY_ENV_ALLOWED admits *_API_KEY"),
    ]:
        response = admin.post("/api/v1/agents/", {**llm, "api_key_env": name}, format="json")
        assert response.status_code == 400, response.json()
        assert "api_key_env: names" in response.json()["detail"] and problem in response.json()["detail"]
    assert not Agent.objects.filter(pk="courier-1").exists()
    assert admin.post("/api/v1/agents/", {**llm, "api_key_env": "COURIER_API_KEY"}, format="json").status_code == 201
    moved = admin.patch("/api/v1/agents/courier-1/", {"api_key_env": "REDIS_URL"}, format="json")
    assert moved.status_code == 400 and "one of the platform's own settings" in moved.json()["detail"]
    assert Agent.objects.get(pk="courier-1").api_key_env == "COURIER_API_KEY"
    # "$" would have matched before the newline (a definition file can hold one; the API strips it).
    assert any("not the key" in p for p in executor_problems({**llm, "api_key_env": "COURIER_API_KEY\n"}))


def test_an_agent_with_a_key_may_use_only_its_providers_host_or_one_the_operator_listed(callers, settings):
    """The deployment's OPENAI_API_KEY is an allowed name; sent to a URL an admin chose, it
    would be theirs. A key goes to the provider's own host or to AGENT_API_KEY_HOSTS, which is
    not the list of hosts agents may reach (AGENT_HTTP_ALLOWED_HOSTS)."""
    admin = callers["admin"].client
    llm = {"id": "courier-2", "name": "Courier", "executor": "llm", "model": "m", "api_key_env": "OPENAI_API_KEY"}
    refused = admin.post("/api/v1/agents/", {**llm, "url": "https://collector.example/v1"}, format="json")
    assert refused.status_code == 400
    assert "url: its API key is sent only to the provider's own host (api.openai.com)" in refused.json()["detail"]
    assert "collector.example is neither" in refused.json()["detail"]
    assert not Agent.objects.filter(pk="courier-2").exists()
    assert admin.post("/api/v1/agents/", {**llm, "url": "https://api.openai.com/v1"}, format="json").status_code == 201
    moved = admin.patch("/api/v1/agents/courier-2/", {"url": "https://collector.example/v1"}, format="json")
    assert moved.status_code == 400 and Agent.objects.get(pk="courier-2").url == "https://api.openai.com/v1"
    keyless = {**llm, "id": "local-1", "provider": "ollama", "api_key_env": "", "url": "https://ollama.example/v1"}
    assert admin.post("/api/v1/agents/", keyless, format="json").status_code == 201  # no key to hand over
    settings.AGENT_HTTP_ALLOWED_HOSTS = ["collector.example"]  # may be reached: not trusted with keys
    assert (
        admin.patch("/api/v1/agents/courier-2/", {"url": "https://collector.example/v1"}, format="json").status_code
        == 400
    )
    settings.AGENT_API_KEY_HOSTS = ["collector.example"]
    assert (
        admin.patch("/api/v1/agents/courier-2/", {"url": "https://collector.example/v1"}, format="json").status_code
        == 200
    )


def test_a_python_agent_runs_only_functions_of_the_modules_the_operator_names(callers, settings):
    """An admin making a python agent through the API names a dotted path that a worker would
    import and call: outside AGENT_ENTRYPOINT_MODULES it is refused before anything is
    imported (a module that does not exist says so, not "cannot be imported")."""
    admin = callers["admin"].client
    for entrypoint in ("subprocess.call", "evil_package.run", "orchestration.runtime.builtinX.echo"):
        response = admin.post("/api/v1/agents/", {**NEW, "entrypoint": entrypoint}, format="json")
        assert response.status_code == 400, response.json()
        assert "is outside AGENT_ENTRYPOINT_MODULES" in response.json()["detail"], response.json()["detail"]
    assert not Agent.objects.filter(pk=NEW["id"]).exists()
    created = admin.post("/api/v1/agents/", {**NEW, "entrypoint": "orchestration.runtime.builtin.echo"}, format="json")
    assert created.status_code == 201
    moved = admin.patch(f"/api/v1/agents/{NEW['id']}/", {"entrypoint": "os.system"}, format="json")
    assert moved.status_code == 400 and Agent.objects.get(pk=NEW["id"]).entrypoint.endswith(".echo")


def test_a_python_agent_runs_only_functions_defined_in_the_modules_the_operator_names(callers, settings):
    """The path's module being allowed is not enough: what the module imports is one of its
    attributes (classes, a function it took from subprocess), and so are its own dunders and
    private helpers. Refused on creation and on update."""
    settings.AGENT_ENTRYPOINT_MODULES = ["orchestration.runtime.builtin", "orchestration.runtime.analysts"]
    admin = callers["admin"].client
    for entrypoint in (
        "orchestration.runtime.builtin.TaskContext",  # orchestration.runtime.context's class
        "orchestration.runtime.builtin.SoftTimeLimitExceeded",  # billiard's
        "orchestration.runtime.builtin.__class__",  # the module type
        "orchestration.runtime.builtin.__init__",
        "orchestration.runtime.analysts._tools",
        "orchestration.runtime.builtin.",
    ):
        response = admin.post("/api/v1/agents/", {**NEW, "entrypoint": entrypoint}, format="json")
        assert response.status_code == 400, (entrypoint, response.json())
        assert "AGENT_ENTRYPOINT_MODULES" in response.json()["detail"], response.json()["detail"]
        if entrypoint.endswith(("._tools", ".")):
            assert "names no public function" in response.json()["detail"], response.json()["detail"]
    assert not Agent.objects.filter(pk=NEW["id"]).exists()
    assert admin.post("/api/v1/agents/", NEW, format="json").status_code == 201
    moved = admin.patch(
        f"/api/v1/agents/{NEW['id']}/", {"entrypoint": "orchestration.runtime.builtin.PermanentError"}, format="json"
    )
    assert moved.status_code == 400 and Agent.objects.get(pk=NEW["id"]).entrypoint == NEW["entrypoint"]


def test_a_key_host_is_read_as_the_request_is_sent(settings):
    """The provider's own host however the URL spells it (the anthropic base without a path,
    upper case, the default port), never over http, on another port or behind userinfo; a
    listed host as httpx reads it (urlsplit takes the host after a backslash's '@')."""
    settings.AGENT_API_KEY_HOSTS = ["llm.example"]
    llm = {"id": "k", "name": "K", "executor": "llm", "model": "m", "api_key_env": "OPENAI_API_KEY"}

    def url_problems(url: str, provider: str = "openai") -> list[str]:
        return [p for p in executor_problems({**llm, "url": url, "provider": provider}) if p.startswith("url:")]

    for url, provider in [
        ("https://api.anthropic.com", "anthropic"),
        ("https://api.openai.com", "openai"),
        ("https://API.OpenAI.com/v1", "openai"),
        ("https://api.openai.com:443/v1", "openai"),
        ("https://llm.example/v1", "openai"),
        ("https://LLM.example./v1", "anthropic"),
    ]:
        assert url_problems(url, provider) == [], url
    for url, provider in [
        ("http://api.openai.com/v1", "openai"),
        ("https://api.openai.com:8443/v1", "openai"),
        ("https://api.openai.com.evil.example/v1", "openai"),
        ("https://api.openai.com@evil.example/v1", "openai"),
        ("https://evil.example\\@llm.example/v1", "openai"),
        ("https://api.openai.com/v1", "anthropic"),
    ]:
        assert any("is neither" in p for p in url_problems(url, provider)), url


def test_stats_aggregate_the_agents_tasks_over_the_window(callers):
    now = timezone.now()
    for status, ms, tokens, cost in [
        ("completed", 100, 10, "0.01"),
        ("completed", 300, 30, "0.03"),
        ("failed", 0, 5, "0"),
    ]:
        TaskExecutionFactory(
            workflow=WorkflowFactory(owner=callers["viewer"].user),
            agent=Agent.objects.get(pk="echo"),
            status=status,
            execution_time_ms=ms,
            tokens_used=tokens,
            cost_usd=Decimal(cost),
        )
    stats = callers["viewer"].client.get("/api/v1/agents/echo/stats/").json()
    assert stats["total_tasks"] == 2
    assert stats["avg_latency_ms"] == 200
    assert stats["total_tokens"] == 40
    assert Decimal(stats["total_cost_usd"]) == Decimal("0.04")
    assert stats["failed"] == 1
    assert round(stats["success_rate"], 2) == 66.67
    later = (now + dt.timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    empty = callers["viewer"].client.get(f"/api/v1/agents/echo/stats/?since={later}").json()
    assert empty["total_tasks"] == 0 and empty["success_rate"] is None
    backwards = callers["viewer"].client.get(f"/api/v1/agents/echo/stats/?since={later}&until=2000-01-01T00:00:00Z")
    assert backwards.status_code == 400 and backwards.json()["errors"][0]["field"] == "until"
    assert TaskExecution.objects.count() == 3


def test_stats_tell_a_non_admin_nothing_of_another_users_tasks(callers):
    """Over every user's tasks, a window around one task's created_at would be that task alone:
    its latency, tokens and cost. A non-admin's statistics are of their own tasks."""
    echo = Agent.objects.get(pk="echo")
    theirs = TaskExecutionFactory(
        workflow=WorkflowFactory(owner=callers["other"].user),
        agent=echo,
        status="completed",
        execution_time_ms=4321,
        tokens_used=1234,
        cost_usd=Decimal("0.5678"),
    )
    TaskExecutionFactory(workflow=WorkflowFactory(owner=callers["developer"].user), agent=echo, status="failed")

    def window(delta: dt.timedelta) -> str:
        since, until = ((theirs.created_at + d).isoformat().replace("+00:00", "Z") for d in (-delta, delta))
        return f"/api/v1/agents/echo/stats/?since={since}&until={until}"

    narrow = callers["viewer"].client.get(window(dt.timedelta(microseconds=1))).json()
    assert (narrow["total_tasks"], narrow["total_tokens"], narrow["avg_latency_ms"]) == (0, 0, None)
    own = callers["developer"].client.get(window(dt.timedelta(hours=1))).json()
    assert (own["total_tasks"], own["failed"], own["total_tokens"]) == (0, 1, 0)
    every = callers["admin"].client.get(window(dt.timedelta(hours=1))).json()
    assert (every["total_tasks"], every["failed"], every["total_tokens"]) == (1, 1, 1234)


def test_stats_need_workflow_read_as_spend_does_a_key_narrowed_to_agent_list_reads_no_cost(callers):
    """An agent's statistics are its tasks' tokens and cost, an admin's over every user's tasks:
    a key narrowed to agent:list (an admin's, say) reads the agents, not what anyone's work
    cost, as me/spend refuses it; with workflow:read too it reads them."""
    TaskExecutionFactory(
        workflow=WorkflowFactory(owner=callers["other"].user),
        agent=Agent.objects.get(pk="echo"),
        status="completed",
        tokens_used=1234,
        cost_usd=Decimal("0.5678"),
    )
    listing = make_caller("lister", "admin", permissions=["agent:list"])
    assert listing.client.get("/api/v1/agents/echo/").status_code == 200
    assert listing.client.get("/api/v1/me/spend/").status_code == 403
    refused = listing.client.get("/api/v1/agents/echo/stats/")
    assert refused.status_code == 403
    assert refused.json()["detail"] == "This API key does not grant workflow:read, which this operation needs."
    reading = make_caller("reader", "admin", permissions=["agent:list", "workflow:read"])
    assert reading.client.get("/api/v1/agents/echo/stats/").json()["total_tokens"] == 1234


def test_agents_list_filters_by_status(callers):
    Agent.objects.filter(pk="fail").update(status="inactive")
    inactive = callers["developer"].client.get("/api/v1/agents/?status=inactive").json()["results"]
    assert [a["id"] for a in inactive] == ["fail"]
    assert callers["developer"].client.get("/api/v1/agents/nobody/").status_code == 404


def test_agents_from_definition_files_are_refused_with_a_conflict_naming_the_file(callers):
    """load_agents would undo an API edit of a file-defined agent: PUT, PATCH and deactivate
    are 409s that name the file, and change nothing."""
    admin = callers["admin"].client
    echo = Agent.objects.get(pk="echo")
    assert echo.definition_path
    before = (echo.description, echo.status, echo.updated_at)
    events_before = Event.objects.filter(entity_id="echo").count()
    body = {k: v for k, v in NEW.items() if k != "id"}
    for method, path, data in [
        ("patch", "/api/v1/agents/echo/", {"description": "changed"}),
        ("put", "/api/v1/agents/echo/", body),
        ("post", "/api/v1/agents/echo/deactivate/", None),
    ]:
        response = getattr(admin, method)(path, data, format="json")
        assert response.status_code == 409, (method, response.content)
        problem = response.json()
        assert response["Content-Type"] == "application/problem+json"
        assert echo.definition_path in problem["detail"] and "load_agents" in problem["detail"]
        assert not echo.definition_path.startswith("/")
    echo.refresh_from_db()
    assert (echo.description, echo.status, echo.updated_at) == before
    assert Event.objects.filter(entity_id="echo").count() == events_before
    # An invalid body is refused the same way: the file is where the agent is changed.
    assert admin.patch("/api/v1/agents/echo/", {"temperature": 5}, format="json").status_code == 409


def test_agents_created_through_the_api_stay_editable(callers):
    admin = callers["admin"].client
    assert admin.post("/api/v1/agents/", NEW, format="json").status_code == 201
    assert Agent.objects.get(pk=NEW["id"]).definition_path == ""
    put = admin.put(
        f"/api/v1/agents/{NEW['id']}/", {**{k: v for k, v in NEW.items() if k != "id"}, "name": "S2"}, format="json"
    )
    assert put.status_code == 200 and put.json()["name"] == "S2"
    assert admin.post(f"/api/v1/agents/{NEW['id']}/deactivate/").status_code == 200


def test_the_services_themselves_refuse_to_change_a_file_defined_agent(callers):
    """The rule lives in the services, so every caller (not only the API view) gets it."""
    before = Agent.objects.get(pk="echo")
    with pytest.raises(TransitionError, match=before.definition_path):
        agent_update(agent_id="echo", fields={"description": "changed"})
    with pytest.raises(TransitionError, match="load_agents"):
        agent_deactivate(agent_id="echo")
    after = Agent.objects.get(pk="echo")
    assert (after.description, after.status) == (before.description, before.status)


def test_put_replaces_the_settings_and_patch_changes_only_those_sent(callers):
    """PUT is a replacement: a setting left out goes back to its default, as for a new agent,
    instead of keeping the old value (which made PUT a PATCH)."""
    admin = callers["admin"].client
    url = f"/api/v1/agents/{NEW['id']}/"
    created = admin.post(
        "/api/v1/agents/",
        {**NEW, "description": "old", "max_concurrency": 3, "capabilities": ["a"], "config": {"k": 1}},
        format="json",
    )
    assert created.status_code == 201, created.content
    patched = admin.patch(url, {"name": "S2"}, format="json").json()
    assert (patched["name"], patched["description"], patched["max_concurrency"]) == ("S2", "old", 3)
    body = {k: v for k, v in NEW.items() if k != "id"}
    put = admin.put(url, body, format="json")
    assert put.status_code == 200, put.content
    replaced = put.json()
    assert replaced["name"] == NEW["name"]
    assert (replaced["description"], replaced["max_concurrency"]) == ("", None)
    assert (replaced["capabilities"], replaced["config"]) == ([], {})
    fresh = admin.post("/api/v1/agents/", {**NEW, "id": "fresh-001"}, format="json").json()
    ignore = {"id", "created_at", "updated_at"}
    assert {k: v for k, v in replaced.items() if k not in ignore} == {k: v for k, v in fresh.items() if k not in ignore}
    missing = admin.put(url, {"name": "no entrypoint"}, format="json")  # the default executor needs one
    assert missing.status_code == 400
    assert [e["field"] for e in missing.json()["errors"]] == ["entrypoint"]
    assert admin.get(url).json()["name"] == NEW["name"]  # nothing half-written


def test_a_listed_key_host_means_what_the_operator_wrote(callers, settings):
    """A bare host admits https on port 443 only, as the providers' hosts; an origin
    (scheme://host[:port]) admits that scheme and port, IPv6 literals included, whatever the
    case, a trailing dot or the spelling of the address. A refused URL is told what to list,
    without its path or userinfo; through the API nothing is stored until it is listed."""
    settings.AGENT_HTTP_ALLOW_PRIVATE = True  # (a server on [::1])
    settings.AGENT_API_KEY_HOSTS = [
        "gateway.example.com",
        "https://gateway.example.com:8443",
        "http://vllm.internal:8000",
        "http://[::1]:8000",
    ]
    llm = {"id": "k", "name": "K", "executor": "llm", "model": "m", "api_key_env": "OPENAI_API_KEY"}

    def url_problems(url: str) -> list[str]:
        return [p for p in executor_problems({**llm, "url": url}) if p.startswith("url:")]

    for url in (
        "https://gateway.example.com/v1",
        "https://GATEWAY.example.com.:443/v1",
        "https://gateway.example.com:8443/v1",
        "http://vllm.internal:8000/v1",
        "http://VLLM.internal.:8000",
        "http://[::1]:8000/v1",
        "http://[0:0::1]:8000/v1",
    ):
        assert url_problems(url) == [], url
    for url, origin, why in (
        ("http://gateway.example.com/v1", "http://gateway.example.com:80", "over http"),
        ("https://gateway.example.com:9443/v1", "https://gateway.example.com:9443", "to port 9443"),
        ("https://vllm.internal:8000/v1", "https://vllm.internal:8000", "to port 8000"),
        ("http://vllm.internal/v1", "http://vllm.internal:80", "over http"),
        ("http://[::1]:8001/v1", "http://[::1]:8001", "over http to port 8001"),
        ("https://[::1]:8000/v1", "https://[::1]:8000", "to port 8000"),
        ("https://llm.example/v1", "llm.example", "to it"),
    ):
        problems = url_problems(url)
        hint = f"is neither: list {origin} in AGENT_API_KEY_HOSTS to send the key {why}"
        assert len(problems) == 1 and problems[0].endswith(hint), (url, problems)
        assert "/v1" not in problems[0]
    assert any("userinfo" in p for p in url_problems("http://sk-live-0123456789abcdef@vllm.internal:8000/v1"))
    assert "sk-live" not in str(url_problems("http://sk-live-0123456789abcdef@vllm.internal:8000/v1"))

    admin = callers["admin"].client
    agent = {**llm, "id": "vllm-1", "url": "http://vllm.internal:8001/v1"}
    refused = admin.post("/api/v1/agents/", agent, format="json")
    assert refused.status_code == 400
    assert (
        "list http://vllm.internal:8001 in AGENT_API_KEY_HOSTS to send the key over http to port 8001"
        in refused.json()["detail"]
    )
    assert not Agent.objects.filter(pk="vllm-1").exists()
    settings.AGENT_API_KEY_HOSTS = ["vllm.internal", "http://vllm.internal:8001"]
    assert admin.post("/api/v1/agents/", agent, format="json").status_code == 201


@pytest.mark.parametrize(
    "url, address",
    [
        ("http://127.0.0.1:9000/", "'127.0.0.1' is a loopback address"),
        ("http://localhost/", "'localhost' is a loopback address"),
        ("http://[::1]/", "'::1' is a loopback address"),
        ("http://10.0.0.5/", "'10.0.0.5' is a private address"),
    ],
)
def test_an_http_agent_at_an_address_every_request_would_refuse_is_refused_when_made(callers, settings, url, address):
    """Accepted (201), such an agent failed every task with this explanation: a literal
    address (or localhost) is checked when the agent is made or changed. A name is not looked
    up then: what it resolves to is checked per request."""
    settings.AGENT_HTTP_ALLOW_PRIVATE = False
    admin = callers["admin"].client
    http = {"id": "svc", "name": "Svc", "executor": "http"}
    why = f"agent URL {url!r} refused: {address} (set AGENT_HTTP_ALLOW_PRIVATE=true to allow)"
    refused = admin.post("/api/v1/agents/", {**http, "url": url}, format="json")
    assert refused.status_code == 400, refused.content
    assert refused.json()["errors"] == [{"field": "url", "detail": why}]
    assert not Agent.objects.filter(pk="svc").exists()
    assert admin.post("/api/v1/agents/", {**http, "url": "http://svc.internal:9000/"}, format="json").status_code == 201
    changed = admin.patch("/api/v1/agents/svc/", {"url": url}, format="json")
    assert changed.status_code == 400 and changed.json()["errors"][0]["detail"] == why
    assert Agent.objects.get(pk="svc").url == "http://svc.internal:9000/"
    settings.AGENT_HTTP_ALLOW_PRIVATE = True
    assert admin.patch("/api/v1/agents/svc/", {"url": url}, format="json").status_code == 200


def test_each_change_records_the_definition_it_leaves(callers):
    """The API's and the console's agent_registered events said only who changed the agent:
    the definition an attempt ran with was nowhere once the agent was changed again."""
    admin = callers["admin"].client
    body = {**NEW, "executor": "llm", "provider": "ollama", "model": "llama3", "url": "https://llm.example/v1"}
    body.pop("entrypoint")
    assert admin.post("/api/v1/agents/", {**body, "temperature": 1}, format="json").status_code == 201
    url = "/api/v1/agents/summariser-001/"
    changed = admin.patch(url, {"model": "llama3.1", "system_prompt": "Summarise."}, format="json")
    assert changed.status_code == 200, changed.content
    assert admin.patch(url, {"model": "llama3", "system_prompt": ""}, format="json").status_code == 200
    assert admin.post(f"{url}deactivate/").status_code == 200

    events = Event.objects.filter(event_type="agent_registered", entity_id="summariser-001").order_by("sequence")
    created, edited, undone, deactivated = [e.payload for e in events]
    assert created["fields"]["model"] == "llama3" and created["fields"]["temperature"] == 1.0
    assert edited["fields"]["model"] == "llama3.1" and edited["fields"]["system_prompt"] == "Summarise."
    assert edited["definition_sha256"] != created["definition_sha256"]
    assert undone["definition_sha256"] == created["definition_sha256"] == deactivated["definition_sha256"]
    assert set(created["fields"]) == set(edited["fields"]) and "status" not in created["fields"]
    assert Agent.objects.get(pk="summariser-001").definition_hash == created["definition_sha256"]
