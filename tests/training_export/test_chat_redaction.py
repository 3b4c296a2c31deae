"""Nothing the chat export writes bypasses redaction: the tool schemas (recorded with a prompt
version, or read from the registry for a legacy thread), the system prompt, and the manifest's
skip reasons, which quote what the validator refused."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from orchestration.models import AgentPromptVersion
from orchestration.runtime import tools as tools_module
from orchestration.services.conversations import prompt_version_record
from tests.factories import AgentFactory, MessageFactory
from tests.training_export.test_chat_prompt_versions import (  # noqa: F401
    DAY,
    T0,
    examples,
    llm,
    llm_agent,
    move_to_window,
    reply,
)
from training_export.services.chat import chat_example_validate
from training_export.services.export import export_run
from training_export.services.redaction import MASK

# Shaped like no default pattern: only the schema's structure (a parameter named api_key) can
# tell that they are keys.
PLAIN_KEY = "plainkey7c1f0e9a4b"
OTHER_KEY = "plainkey2d8e6b3c5a"
CANARY = "c4n4ry5e8d2f"


def billing_parameters() -> dict:
    return {
        "type": "object",
        "properties": {
            "api_key": {
                "type": "string",
                "description": "the billing key",
                "default": PLAIN_KEY,
                "enum": [PLAIN_KEY, OTHER_KEY],
            },
            "account": {"type": "string", "examples": [f"{CANARY}@example.org"]},
            "headers": {"type": "object", "default": {"Cookie": f"session={CANARY}"}},
        },
        "required": ["api_key", "account"],
    }


REDACTED_BILLING_PARAMETERS = {
    "type": "object",
    "properties": {
        # The parameter keeps its schema; the values it may take are masked.
        "api_key": {"type": "string", "description": "the billing key", "default": MASK, "enum": [MASK, MASK]},
        "account": {"type": "string", "examples": [MASK]},
        "headers": {"type": "object", "default": {"Cookie": MASK}},
    },
    "required": ["api_key", "account"],
}


@pytest.fixture
def billing_tool(monkeypatch) -> str:
    """A tool of the deployment's own (AGENT_TOOL_MODULES) whose schema holds keys."""
    calculator = tools_module.registry()["calculator"]
    parameters = billing_parameters()
    billing = dataclasses.replace(
        calculator,
        name="billing_lookup",
        description=f"Looks an invoice up. Sends Authorization: Token {CANARY}",
        parameters=parameters,
        validator=Draft202012Validator(parameters),
    )
    monkeypatch.setitem(tools_module._REGISTRY, "billing_lookup", billing)
    return "billing_lookup"


def assert_no_secret(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            text = path.read_text("utf-8")
            for secret in (PLAIN_KEY, OTHER_KEY, CANARY):
                assert secret not in text, f"{path.name} leaks {secret}"


@pytest.mark.django_db
def test_a_recorded_tool_schema_holding_keys_is_written_redacted_with_its_shape(llm, out, billing_tool):  # noqa: F811
    agent = llm_agent(llm.base_url)
    agent.config = {"tools": ["calculator", billing_tool]}
    agent.save(update_fields=["config"])
    reply(agent, "t-1", "What is 6 * 7?")
    sent = llm.requests[0].body["tools"]
    assert PLAIN_KEY in json.dumps(sent), "the runtime sent the schema as the registry has it"
    assert AgentPromptVersion.objects.get().tools == sent

    move_to_window("t-1")
    run = export_run(data_type="conversations", start_date=DAY, end_date=DAY)

    assert_no_secret(Path(run.path).parent)
    [example] = examples(run)
    chat_example_validate(example)
    tools = {tool["function"]["name"]: tool["function"] for tool in example["tools"]}
    assert tools["billing_lookup"] == {
        "name": "billing_lookup",
        "description": f"Looks an invoice up. Sends {MASK}",
        "parameters": REDACTED_BILLING_PARAMETERS,
    }
    assert example["tools"][0] == sent[0], "the calculator's schema holds nothing to mask"


@pytest.mark.django_db
def test_a_legacy_threads_tool_schemas_from_the_registry_are_written_redacted(out, billing_tool):
    agent = AgentFactory(system_prompt="Be brief.", config={"tools": [billing_tool]})
    for i, (role, content) in enumerate([("user", "invoice 7?"), ("assistant", "Paid.")]):
        MessageFactory(
            instance_id="old", agent=agent, role=role, content=content, created_at=T0 + dt.timedelta(seconds=i)
        )

    run = export_run(data_type="conversations", start_date=DAY, end_date=DAY)

    assert_no_secret(Path(run.path).parent)
    [example] = examples(run)
    chat_example_validate(example)
    [tool] = example["tools"]
    assert tool["function"]["parameters"] == REDACTED_BILLING_PARAMETERS
    assert json.loads((Path(run.path).parent / "manifest.json").read_text())["legacy_prompt"] == 1


@pytest.mark.django_db
def test_a_recorded_tool_that_is_no_function_tool_skips_its_thread_with_a_reason(out):
    """input.tools takes a bare `{"name": ...}`; such a tool, recorded, is not OpenAI's shape:
    the thread is skipped and counted, and the export goes on."""
    agent = AgentFactory()
    bare = {"name": "lookup", "description": f"uses {PLAIN_KEY}", "parameters": {"type": "object"}}
    good = prompt_version_record({"system_prompt": "Be brief.", "tools": []})
    broken = prompt_version_record({"system_prompt": "Be brief.", "tools": [bare]})
    for thread, version in (("good", good), ("broken", broken)):
        MessageFactory(instance_id=thread, agent=agent, role="user", content="hi", created_at=T0)
        MessageFactory(
            instance_id=thread,
            agent=agent,
            role="assistant",
            content="Hello!",
            metadata={"prompt_version": version},
            created_at=T0 + dt.timedelta(seconds=1),
        )

    run = export_run(data_type="conversations", start_date=DAY, end_date=DAY)

    assert run.rows == 1
    manifest = json.loads((Path(run.path).parent / "manifest.json").read_text())
    assert manifest["skipped"] == {"each tool must be {'type': 'function', 'function': {...}}": 1}
    assert_no_secret(Path(run.path).parent)


@pytest.mark.django_db
def test_a_tool_call_type_the_manifest_quotes_is_redacted(out):
    """The validator names a wrong tool call type in its skip reason, which the manifest holds."""
    agent = AgentFactory()
    call = {"id": "c1", "type": f"token={CANARY}", "function": {"name": "calculator", "arguments": "{}"}}
    for i, fields in enumerate(
        [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "4", "tool_call_id": "c1"},
            {"role": "assistant", "content": "4"},
        ]
    ):
        MessageFactory(instance_id="t-1", agent=agent, created_at=T0 + dt.timedelta(seconds=i), **fields)

    run = export_run(data_type="conversations", start_date=DAY, end_date=DAY)

    assert run.rows == 0
    manifest = json.loads((Path(run.path).parent / "manifest.json").read_text())
    assert manifest["skipped"] == {f"tool call type must be 'function', not '{MASK}'": 1}
    assert_no_secret(Path(run.path).parent)


@pytest.mark.django_db
def test_a_system_prompt_that_is_json_is_redacted_as_a_message_holding_it_is(out):
    """A JSON content gets the JSON rules (values under REDACT_KEYS masked): the agent's system
    prompt too, not only the text patterns."""
    prompt = json.dumps({"role": "support bot", "cookie": f"sessionid={CANARY}"})
    agent = AgentFactory(system_prompt=prompt)
    for i, (role, content) in enumerate([("user", prompt), ("assistant", "Hello!")]):
        MessageFactory(
            instance_id="t-1", agent=agent, role=role, content=content, created_at=T0 + dt.timedelta(seconds=i)
        )

    run = export_run(data_type="conversations", start_date=DAY, end_date=DAY)

    assert_no_secret(Path(run.path).parent)
    [example] = examples(run)
    system, user = example["messages"][:2]
    assert system["role"] == "system" and system["content"] == user["content"]
    assert json.loads(system["content"]) == {"role": "support bot", "cookie": MASK}


def threads_with_tool(parameters: dict, threads: tuple[str, ...] = ("t-1",)) -> None:
    """Record one short thread per name under a prompt version with one tool of these parameters."""
    agent = AgentFactory()
    tool = {"type": "function", "function": {"name": "notify", "parameters": parameters}}
    version = prompt_version_record({"system_prompt": "Be brief.", "tools": [tool]})
    for thread in threads:
        for i, (role, content) in enumerate([("user", "hi"), ("assistant", "Hello!")]):
            MessageFactory(
                instance_id=thread,
                agent=agent,
                role=role,
                content=content,
                metadata={"prompt_version": version},
                created_at=T0 + dt.timedelta(seconds=i),
            )


def exported_parameters(out_parameters: dict) -> tuple[dict, Path]:
    """Export a thread whose recorded prompt version has one tool with these parameters: the
    written example's parameters, and the export's directory."""
    threads_with_tool(out_parameters)
    run = export_run(data_type="conversations", start_date=DAY, end_date=DAY)
    [example] = examples(run)
    chat_example_validate(example)
    [written] = example["tools"]
    return written["function"]["parameters"], Path(run.path).parent


@pytest.mark.django_db
def test_required_names_the_parameters_as_written_when_two_names_are_masked_alike(out):
    """Two parameter names masked alike are told apart (`[REDACTED]#2`); `required` names them
    as written, so the schema stays valid (unique items, each a property)."""
    parameters = {
        "type": "object",
        "properties": {f"{CANARY}@example.org": {"type": "boolean"}, f"ops.{CANARY}@example.org": {"type": "boolean"}},
        "required": [f"{CANARY}@example.org", f"ops.{CANARY}@example.org"],
    }

    written, directory = exported_parameters(parameters)

    assert_no_secret(directory)
    Draft202012Validator.check_schema(written)
    assert list(written["properties"]) == [MASK, f"{MASK}#2"]
    assert written["required"] == [MASK, f"{MASK}#2"]


@pytest.mark.django_db
def test_the_values_a_secret_parameter_takes_through_a_ref_are_masked(out):
    """A secret parameter whose schema is a `$ref` (pydantic writes an enum so) has the values
    of the definition it refers to masked, and of what that one refers to."""
    parameters = {
        "type": "object",
        "$defs": {
            "Choice": {"anyOf": [{"$ref": "#/$defs/Plain"}, {"const": OTHER_KEY}], "title": "Choice"},
            "Plain": {"type": "string", "enum": [PLAIN_KEY]},
            "Region": {"type": "string", "enum": ["eu", "us"]},
        },
        "properties": {
            "api_key": {"$ref": "#/$defs/Choice"},
            "region": {"$ref": "#/$defs/Region"},
            "password": "hunter2-not-a-schema",
        },
        "required": ["api_key"],
    }

    written, directory = exported_parameters(parameters)

    assert_no_secret(directory)
    assert "hunter2" not in json.dumps(written)
    assert written["$defs"] == {
        "Choice": {"anyOf": [{"$ref": "#/$defs/Plain"}, {"const": MASK}], "title": "Choice"},
        "Plain": {"type": "string", "enum": [MASK]},
        "Region": {"type": "string", "enum": ["eu", "us"]},
    }
    assert written["properties"]["api_key"] == {"$ref": "#/$defs/Choice"}


@pytest.mark.django_db
def test_a_versions_tools_are_redacted_once_per_export_and_the_lines_are_the_same(out, monkeypatch):
    """Threads under one prompt version share its tools: redacted once for the export (a
    version's schemas cost more to redact than a thread's messages), each line the same bytes."""
    from training_export.services import chat

    calls = []
    tool_redacted = chat._tool
    monkeypatch.setattr(chat, "_tool", lambda tool, redactor: calls.append(tool) or tool_redacted(tool, redactor))
    threads_with_tool(billing_parameters(), ("t-1", "t-2", "t-3"))

    run = export_run(data_type="conversations", start_date=DAY, end_date=DAY)

    assert run.rows == 3
    assert len(calls) == 1
    written = [example["tools"] for example in examples(run)]
    assert written[0][0]["function"]["parameters"] == REDACTED_BILLING_PARAMETERS
    assert written == [written[0]] * 3
    assert_no_secret(Path(run.path).parent)


@pytest.mark.django_db
def test_a_secret_parameters_unknown_keywords_are_masked_and_dependent_required_names_it_as_written(out):
    """Vendor keywords (`x-default`, `x-example`) of a secret parameter hold the values it may
    take as default/examples do: masked whatever they look like (another parameter's are kept).
    `dependentRequired` names parameters as `required` does: kept a valid schema, naming them as
    the properties are written."""
    parameters = {
        "type": "object",
        "properties": {
            "api_key": {"type": "string", "description": "the key", "x-default": PLAIN_KEY, "x-example": [OTHER_KEY]},
            "credentials": {
                "type": "object",
                "properties": {"user": {"type": "string"}, "secret": {"type": "string"}},
                "dependentRequired": {"user": ["secret"]},
                "x-examples": {"live": {"user": "bob", "secret": CANARY}},
            },
            "account": {"type": "string", "x-example": "acme"},
            f"{CANARY}@example.org": {"type": "boolean"},
            f"ops.{CANARY}@example.org": {"type": "boolean"},
        },
        "dependentRequired": {"api_key": ["account"], f"{CANARY}@example.org": [f"ops.{CANARY}@example.org"]},
    }

    written, directory = exported_parameters(parameters)

    assert_no_secret(directory)
    Draft202012Validator.check_schema(written)
    assert written["properties"]["api_key"] == {
        "type": "string",
        "description": "the key",
        "x-default": MASK,
        "x-example": [MASK],
    }
    assert written["properties"]["credentials"] == {
        "type": "object",
        "properties": {"user": {"type": "string"}, "secret": {"type": "string"}},
        "dependentRequired": {"user": ["secret"]},
        "x-examples": MASK,
    }
    assert written["properties"]["account"] == {"type": "string", "x-example": "acme"}
    assert written["dependentRequired"] == {"api_key": ["account"], MASK: [f"{MASK}#2"]}


@pytest.mark.django_db
def test_a_secret_parameters_content_schema_and_dependencies_stay_schemas(out):
    """Of a secret parameter, `contentSchema` (a schema: a JWT's header and claims) and
    `dependencies` (names or schemas, still in 2020-12's meta-schema) are no values it takes:
    masked into a string, they made a schema the fine-tuning API rejects. The values the
    schemas inside allow are masked all the same."""
    parameters = {
        "type": "object",
        "properties": {
            "token": {
                "type": "string",
                "contentMediaType": "application/jwt",
                "contentSchema": {"type": "array", "prefixItems": [{"const": {"kid": CANARY}}, {"type": "object"}]},
            },
            "credentials": {
                "type": "object",
                "dependencies": {"user": ["secret"], "secret": {"properties": {"user": {"default": PLAIN_KEY}}}},
            },
        },
    }

    written, directory = exported_parameters(parameters)

    assert_no_secret(directory)
    Draft202012Validator.check_schema(written)
    assert written["properties"]["token"]["contentSchema"] == {
        "type": "array",
        "prefixItems": [{"const": MASK}, {"type": "object"}],
    }
    assert written["properties"]["credentials"]["dependencies"] == {
        "user": ["secret"],
        "secret": {"properties": {"user": {"default": MASK}}},
    }
