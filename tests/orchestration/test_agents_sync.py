"""load_agents: definition files synced into the agents table, with errors that name the
file and the field and change nothing."""

from __future__ import annotations

import io
import json

import pytest
from django.core.management import CommandError, call_command

from orchestration.models import Agent, Event

ECHO = {"id": "echo-x", "name": "Echo", "executor": "python", "entrypoint": "orchestration.runtime.builtin.echo"}


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
        ({"a.json": json.dumps(ECHO), "b.json": json.dumps(ECHO)}, "b.json: id: 'echo-x' is also defined in"),
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


def test_a_missing_directory_is_named(db, tmp_path):
    with pytest.raises(CommandError, match="no such directory"):
        sync(tmp_path / "nope")
