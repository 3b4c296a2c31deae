"""Submitting a workflow spec: validation reports every problem at once and stores nothing;
a valid spec is stored with its tasks and events in one transaction."""

from __future__ import annotations

import datetime as dt
import io
import json
import signal
import time

import pytest
import redis
from django.conf import settings
from django.core.management import CommandError, call_command
from django.utils import timezone

from orchestration.errors import SpecError
from orchestration.models import Event, TaskExecution, Workflow
from orchestration.services.specs import spec_parse
from orchestration.services.workflows import workflow_submit
from tests.engine import flush_redis
from tests.factories import UserFactory

pytestmark = pytest.mark.usefixtures("builtin_agents")


def problems_of(spec: dict) -> list[str]:
    with pytest.raises(SpecError) as info:
        workflow_submit(spec=spec)
    assert (
        Workflow.objects.count() == 0
        and TaskExecution.objects.count() == 0
        and Event.objects.filter(event_type="workflow_created").count() == 0
    ), "nothing is stored for an invalid spec"
    return info.value.problems


def test_every_problem_is_reported_at_once_naming_the_field(db):
    problems = problems_of(
        {
            "name": "",
            "priority": "urgent",
            "colour": "blue",
            "tasks": [
                {"name": "a", "agent": "nobody"},
                {"name": "a", "agent": "echo", "max_retries": 500},
                {"name": "b", "agent": "echo", "timeout_seconds": 0, "depends_on": ["zzz"]},
                {"agent": "echo", "input": "not a mapping"},
            ],
        }
    )
    expected = [
        "colour: unknown field",
        "name must not be empty",
        "priority must be one of critical, high, normal, low, got 'urgent'",
        "tasks[0] (a).agent: unknown agent 'nobody'",
        "tasks[1] (a).name is a duplicate task name",
        f"tasks[1] (a).max_retries must be between 0 and {settings.TASK_MAX_RETRIES_LIMIT}, got 500",
        f"tasks[2] (b).timeout_seconds must be between 1 and {settings.TASK_MAX_TIMEOUT_SECONDS}, got 0",
        "tasks[3].name is required",
        "tasks[3].input must be a mapping",
        "tasks[2] (b).depends_on: unknown task 'zzz'",
    ]
    for text in expected:
        assert any(text in p for p in problems), (text, problems)


def test_a_cycle_is_named(db):
    problems = problems_of(
        {
            "name": "loop",
            "tasks": [
                {"name": "a", "agent": "echo", "depends_on": ["c"]},
                {"name": "b", "agent": "echo", "depends_on": ["a"]},
                {"name": "c", "agent": "echo", "depends_on": ["b"]},
                {"name": "free", "agent": "echo"},
            ],
        }
    )
    assert problems == ["tasks: dependency cycle a -> c -> b -> a (each task depends on the next)"]


def test_a_cycle_is_reported_beside_the_other_problems(db):
    problems = problems_of(
        {
            "name": "loop",
            "colour": "blue",
            "tasks": [
                {"name": "a", "agent": "echo", "depends_on": ["b", "zzz"]},
                {"name": "b", "agent": "echo", "depends_on": ["a"], "max_retries": 500},
            ],
        }
    )
    assert "tasks: dependency cycle a -> b -> a (each task depends on the next)" in problems, problems
    assert any("colour: unknown field" in p for p in problems), problems
    assert any("tasks[0] (a).depends_on: unknown task 'zzz'" in p for p in problems), problems


def test_past_or_naive_deadline_and_inactive_agent_are_refused(db):
    from orchestration.models import Agent

    Agent.objects.filter(pk="fail").update(status="maintenance")
    problems = problems_of(
        {
            "name": "x",
            "deadline": (timezone.now() - dt.timedelta(minutes=1)).isoformat(),
            "tasks": [{"name": "a", "agent": "fail"}],
        }
    )
    assert any("is in the past" in p for p in problems)
    assert any("agent 'fail' is maintenance, not active" in p for p in problems)
    assert any(
        "include a time zone" in p
        for p in problems_of(
            {"name": "x", "deadline": "2030-01-01T00:00:00", "tasks": [{"name": "a", "agent": "echo"}]}
        )
    )


def test_valid_spec_is_stored_with_tasks_and_events_and_roots_are_sent_after_commit(
    db, django_capture_on_commit_callbacks
):
    flush_redis()
    owner = UserFactory()
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        workflow, created = workflow_submit(
            spec={
                "name": "review",
                "workflow_type": "code_review",
                "tags": ["t"],
                "state": {"repo": "x"},
                "priority": "high",
                "tasks": [
                    {"name": "a", "agent": "echo", "input": {"k": 1}},
                    {"name": "b", "agent": "flaky", "depends_on": "a", "priority": "low", "max_retries": 5},
                ],
            },
            owner=owner,
        )
    assert created and len(callbacks) == 1
    assert (workflow.status, workflow.total_steps, workflow.owner, workflow.initiator) == (
        "running",
        2,
        owner,
        owner.username,
    )
    assert workflow.assigned_agents == ["echo", "flaky"] and workflow.state_data == {"repo": "x"}
    assert workflow.spec["tasks"][1]["depends_on"] == "a"
    a, b = TaskExecution.objects.get(task_name="a"), TaskExecution.objects.get(task_name="b")
    assert (a.status, a.priority, a.input_data) == ("queued", "high", {"k": 1})
    assert a.celery_task_id and a.queued_at
    assert (b.status, b.priority, b.depends_on, b.max_retries, b.celery_task_id) == ("pending", "low", ["a"], 5, None)
    assert list(
        Event.objects.exclude(event_type="agent_registered").order_by("sequence").values_list("event_type", "entity_id")
    ) == [
        ("workflow_created", workflow.workflow_id),
        ("workflow_started", workflow.workflow_id),
        ("task_queued", a.execution_id),
    ]
    # the message went to the queue named by the task's priority, with the stored id
    queued = redis.Redis.from_url(settings.CELERY_BROKER_URL).lrange("high", 0, -1)
    assert [json.loads(m)["headers"]["id"] for m in queued] == [a.celery_task_id]
    flush_redis()


def test_same_idempotency_key_from_same_owner_returns_the_first_workflow(db):
    owner, other = UserFactory(), UserFactory()
    spec = {"name": "once", "idempotency_key": "k-1", "tasks": [{"name": "a", "agent": "echo"}]}
    first, created = workflow_submit(spec=spec, owner=owner)
    again, created_again = workflow_submit(spec=spec, owner=owner)
    theirs, created_theirs = workflow_submit(spec=spec, owner=other)
    assert (created, created_again, created_theirs) == (True, False, True)
    assert again.pk == first.pk and theirs.pk != first.pk
    assert Workflow.objects.count() == 2


def test_the_same_idempotency_key_with_another_spec_is_refused_naming_the_first_workflow(db, tmp_path):
    """As the API answers 422: a spec changed under a reused key would otherwise not run, and
    submit_workflow --wait would follow (and exit by) the first workflow instead."""
    owner = UserFactory()
    spec = {"name": "once", "idempotency_key": "k-1", "tasks": [{"name": "a", "agent": "echo"}]}
    first, _ = workflow_submit(spec=spec, owner=owner)
    changed = {**spec, "tasks": [{"name": "a", "agent": "echo", "input": {"n": 2}}]}
    with pytest.raises(
        SpecError, match=f"idempotency_key 'k-1' was already used for a different spec \\(workflow {first.pk}\\)"
    ):
        workflow_submit(spec=changed, owner=owner)
    assert workflow_submit(spec=json.loads(json.dumps(spec)), owner=owner) == (first, False)

    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one.write_text("name: first\nidempotency_key: pr-42\ntasks:\n  - {name: a, agent: echo}\n")
    two.write_text("name: second\nidempotency_key: pr-42\ntasks:\n  - {name: a, agent: fail}\n")
    out = io.StringIO()
    call_command("submit_workflow", str(one), stdout=out)
    stored = out.getvalue().strip()
    call_command("submit_workflow", str(one), stdout=(again := io.StringIO()))
    assert again.getvalue().strip() == f"{stored} (existing, same idempotency key)"
    with pytest.raises(CommandError, match=f"'pr-42' was already used for a different spec \\(workflow {stored}\\)"):
        call_command("submit_workflow", str(two), stdout=io.StringIO())
    assert Workflow.objects.filter(owner=None).count() == 1
    flush_redis()


def test_a_spec_sent_again_under_its_key_returns_its_workflow_once_its_deadline_passed_or_its_agent_left(db, tmp_path):
    """The workflow stored under the key was valid when it was stored: the same spec sent again
    (a CI job retried an hour later) returns it, as the API does, rather than being refused for
    what changed since. Before, submit_workflow said "deadline ... is in the past" (or named the
    agent taken out of service) and stored nothing, exit 1, for a workflow that was there."""
    from orchestration.db import database_now
    from orchestration.models import Agent

    deadline = (database_now() + dt.timedelta(seconds=1)).isoformat()
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(
        f"name: nightly\nidempotency_key: run-7\ndeadline: '{deadline}'\ntasks:\n  - {{name: a, agent: fail}}\n"
    )
    call_command("submit_workflow", str(spec_file), stdout=(first := io.StringIO()))
    stored = first.getvalue().strip()
    time.sleep(1.2)
    Agent.objects.filter(pk="fail").update(status="maintenance")
    call_command("submit_workflow", str(spec_file), stdout=(again := io.StringIO()))
    assert again.getvalue().strip() == f"{stored} (existing, same idempotency key)"
    # Another spec under the key is refused as before, for its problems.
    other = {**spec_parse(spec_file.read_text(), fmt="yaml"), "name": "other"}
    with pytest.raises(SpecError, match="is in the past"):
        workflow_submit(spec=other)
    # A spec no column can hold is never compared with the stored one: its problems are named.
    with pytest.raises(SpecError, match="NUL"):
        workflow_submit(spec={**other, "description": "a\x00b"})
    assert Workflow.objects.count() == 1
    flush_redis()


@pytest.mark.parametrize(
    ("document", "fmt", "problem"),
    [
        (
            "name: x\ntasks:\n  - {name: a, agent: echo, input: {since: 2026-01-01}}\n",
            "yaml",
            "tasks[0].input.since is a date (2026-01-01), which JSON has not: quote it",
        ),
        (
            "name: x\nstate: {at: 2026-01-01T10:00:00Z}\ntasks: [{name: a, agent: echo}]\n",
            "yaml",
            "state.at is a datetime",
        ),
        (
            "name: x\nmetadata: {raw: !!binary aGk=}\ntasks: [{name: a, agent: echo}]\n",
            "yaml",
            "metadata.raw is a bytes",
        ),
        ("name: x\ntasks: [{name: a, agent: echo, input: {s: !!set {p, q}}}]\n", "yaml", "tasks[0].input.s is a set"),
        ("name: x\ntasks: [{name: a, agent: echo, input: {n: .nan}}]\n", "yaml", "tasks[0].input.n is nan"),
        (
            '{"name": "x", "tasks": [{"name": "a", "agent": "echo", "input": {"n": [1, Infinity]}}]}',
            "json",
            "tasks[0].input.n[1] is inf",
        ),
        ('{"name": "x\\u0000", "tasks": [{"name": "a", "agent": "echo"}]}', "json", "name contains a NUL character"),
        (
            '{"name": "x", "tasks": [{"name": "a", "agent": "echo", "description": "\\ud800"}]}',
            "json",
            "tasks[0].description contains an unpaired",
        ),
        (
            '{"name": "x", "tasks": [{"name": "a", "agent": "\\ud800"}]}',
            "json",
            "tasks[0] (a).agent: unknown agent '\\ud800'",
        ),
        ('{"name": "x", "tasks": [{"name": "a", "agent": "e\\u0000"}]}', "json", "tasks[0].agent contains a NUL"),
        (
            'name: x\ntasks: [{name: a, agent: echo, depends_on: ["b\\0"]}]\n',
            "yaml",
            "tasks[0].depends_on[0] contains a NUL",
        ),
        ('{"name": "x", "x\\u0000": 1, "tasks": [{"name": "a", "agent": "echo"}]}', "json", "(a key) contains a NUL"),
    ],
    ids=[
        "date",
        "datetime",
        "binary",
        "set",
        "nan",
        "infinity",
        "nul",
        "surrogate",
        "surrogate-agent",
        "nul-agent",
        "nul-yaml-dependency",
        "nul-field-name",
    ],
)
def test_values_no_json_column_can_hold_are_named_and_nothing_is_stored(db, tmp_path, document, fmt, problem):
    """A YAML spec may hold a date, binary data or a set, a JSON or YAML one NaN or an infinity:
    each is a problem named by its path (before, a TypeError or a DataError of the database
    escaped validation, and submit_workflow ended in a traceback)."""
    problems = problems_of(spec_parse(document, fmt=fmt))
    assert any(p.startswith(problem) for p in problems), problems
    path = tmp_path / f"spec.{fmt}"
    path.write_text(document)
    with pytest.raises(CommandError, match="invalid workflow spec"):
        call_command("submit_workflow", str(path), stdout=io.StringIO())
    assert Workflow.objects.count() == 0


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ("name: x\ntasks:\n  - {name: a, agent: echo, input: &x {self: *x}}\n", "tasks[0].input.self contains itself"),
        (
            "name: x\nmetadata: {log: &l [1, [*l]]}\ntasks: [{name: a, agent: echo}]\n",
            "metadata.log[1][0] contains itself",
        ),
    ],
    ids=["mapping", "list"],
)
def test_a_yaml_value_that_contains_itself_is_named_not_walked_for_ever(db, tmp_path, document, problem):
    """A YAML alias inside the node it names makes a value that contains itself: before, the walk
    for unstorable values never ended (its stack and paths growing without bound) and
    submit_workflow hung. An alias used twice, not inside itself, is still a plain value."""

    def stuck(signum, frame):
        raise AssertionError("validation still walking the spec after 10 s")

    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(10)
    try:
        problems = problems_of(spec_parse(document, fmt="yaml"))
        path = tmp_path / "spec.yaml"
        path.write_text(document)
        with pytest.raises(CommandError, match="contains itself"):
            call_command("submit_workflow", str(path), stdout=io.StringIO())
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert any(p.startswith(problem) for p in problems), problems
    assert Workflow.objects.count() == 0

    shared = "name: x\ntasks:\n  - {name: a, agent: echo, input: {one: &s {k: [1]}, two: *s}}\n"
    workflow, _ = workflow_submit(spec=spec_parse(shared, fmt="yaml"))
    assert TaskExecution.objects.get(workflow=workflow).input_data == {"one": {"k": [1]}, "two": {"k": [1]}}
    flush_redis()


def test_yaml_and_json_documents_parse_and_bad_ones_are_named():
    assert spec_parse("name: x\ntasks: []\n", fmt="yaml") == {"name": "x", "tasks": []}
    with pytest.raises(SpecError, match="spec is not valid JSON"):
        spec_parse("{", fmt="json")
    with pytest.raises(SpecError, match="mapping"):
        spec_parse("- 1\n", fmt="yaml")


def test_submit_command_reports_problems_and_stores_nothing(db, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ntasks:\n  - {name: a, agent: ghost}\n")
    with pytest.raises(CommandError, match="unknown agent 'ghost'"):
        call_command("submit_workflow", str(path))
    assert Workflow.objects.count() == 0
    (tmp_path / "x.txt").write_text("name: x")
    with pytest.raises(CommandError, match=r"use a \.json, \.yaml or \.yml file"):
        call_command("submit_workflow", str(tmp_path / "x.txt"))
    with pytest.raises(CommandError, match="no such file"):
        call_command("submit_workflow", str(tmp_path / "missing.json"))


def test_a_workflow_larger_than_the_configured_limit_is_refused(db, settings):
    settings.WORKFLOW_MAX_TASKS = 3
    problems = problems_of({"name": "big", "tasks": [{"name": f"t{i}", "agent": "echo"} for i in range(4)]})
    assert problems == ["tasks has 4 entries; at most 3 are allowed"]


def test_a_yaml_spec_whose_aliases_expand_it_past_the_limit_is_refused(db, tmp_path):
    """Nine nested lists of ten aliases each ("billion laughs") are a few hundred bytes of YAML
    and 10**9 values: the walk for unstorable values (and storing the spec, which expands it)
    would run for hours. It stops at SPEC_MAX_VALUES with a problem naming it."""
    from orchestration.services.specs import SPEC_MAX_VALUES

    lines = ["name: x", "metadata:", "  l0: &l0 [lol]"]
    for level in range(1, 10):
        lines.append(f"  l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * 10)}]")
    lines.append("tasks: [{name: a, agent: echo}]")
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(lines) + "\n")
    started = time.monotonic()
    with pytest.raises(CommandError, match=f"spec expands to more than {SPEC_MAX_VALUES:,} values"):
        call_command("submit_workflow", str(path), stdout=io.StringIO())
    assert time.monotonic() - started < 60, "stopped at the limit, not after walking 10**9 values"
    assert Workflow.objects.count() == 0


def test_a_yaml_spec_whose_aliases_repeat_a_long_text_past_the_limit_is_refused(db, tmp_path):
    """Few values, much text: a thousand aliases of one string of 100 000 characters are a
    100 kB file and 10**8 characters of JSON (ten thousand aliases of 200 000, 200 kB of YAML:
    2 GB, and a MemoryError). The count of values stops far below its limit; the text's stops
    at SPEC_MAX_TEXT_CHARS, naming it, before anything is encoded or stored."""
    from orchestration.services.specs import SPEC_MAX_TEXT_CHARS

    lines = ["name: x", "metadata:", f"  l0: &l0 {'x' * 100_000}"]
    for level in range(1, 4):
        lines.append(f"  l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * 10)}]")
    lines.append("tasks: [{name: a, agent: echo}]")
    path = tmp_path / "long.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CommandError, match=f"spec expands to more than {SPEC_MAX_TEXT_CHARS:,} characters of text"):
        call_command("submit_workflow", str(path), stdout=io.StringIO())
    assert Workflow.objects.count() == 0


def test_a_yaml_key_that_is_not_text_is_an_unknown_field_not_a_traceback(db):
    """A YAML mapping may have numbers as keys: sorting the unknown fields, named and numbered,
    raised a TypeError."""
    document = "name: x\n1: one\nextra: two\ntasks: [{name: a, agent: echo, 2: two, other: three}]\n"
    problems = problems_of(spec_parse(document, fmt="yaml"))
    assert any(p.startswith("1: unknown field") for p in problems), problems
    assert any(p.startswith("extra: unknown field") for p in problems), problems
    assert any(p.startswith("tasks[0].2: unknown field") for p in problems), problems


NAME_AND_TASK = "name: x\ntasks: [{name: a, agent: echo}]\n"


@pytest.mark.parametrize(
    ("name", "document", "problem"),
    [
        ("year0.yaml", f"{NAME_AND_TASK}deadline: 0000-01-01T00:00:00Z\n", "year 0 is out of range"),
        ("day.yaml", f"{NAME_AND_TASK}metadata: {{since: 2026-02-30}}\n", "day is out of range"),
        (
            "digits.json",
            '{"name": "x", "metadata": {"n": 1' + "0" * 5000 + '}, "tasks": [{"name": "a", "agent": "echo"}]}',
            "Exceeds the limit (4300 digits)",
        ),
    ],
)
def test_a_document_its_parser_refuses_with_a_value_error_is_named(db, tmp_path, name, document, problem):
    """PyYAML raises ValueError, not a YAMLError, for a date no Python date can hold, and json
    one for an integer of more than 4,300 digits: the command ended in a traceback."""
    path = tmp_path / name
    path.write_text(document)
    with pytest.raises(CommandError, match="spec is not valid") as info:
        call_command("submit_workflow", str(path), stdout=io.StringIO())
    assert problem in str(info.value)
    assert Workflow.objects.count() == 0


def test_a_yaml_key_given_twice_is_refused_not_read_as_the_last(db, tmp_path):
    """YAML forbids a key twice in one mapping; PyYAML kept the last value, so the first line
    was silently ignored (here: a workflow named "second" submitted)."""
    path = tmp_path / "twice.yaml"
    path.write_text("name: first\nname: second\ntasks: [{name: a, agent: echo}]\n")
    with pytest.raises(CommandError, match="found duplicate key 'name'"):
        call_command("submit_workflow", str(path), stdout=io.StringIO())
    assert Workflow.objects.count() == 0
    # A merge may still be overridden key by key, as YAML's merge key says.
    merged = "name: x\ntasks:\n  - &base {name: a, agent: echo}\n  - {<<: *base, name: b}\n"
    assert [t["name"] for t in spec_parse(merged, fmt="yaml")["tasks"]] == ["a", "b"]


def test_a_json_key_given_twice_is_refused_not_read_as_the_last(db, tmp_path):
    """json kept the last of a name given twice in one object, as PyYAML did: a task's
    second `agent` silently replaced its first."""
    path = tmp_path / "twice.json"
    path.write_text('{"name": "x", "tasks": [{"name": "a", "agent": "fail", "agent": "echo"}]}')
    with pytest.raises(CommandError, match="spec is not valid JSON: found duplicate key 'agent'"):
        call_command("submit_workflow", str(path), stdout=io.StringIO())
    assert Workflow.objects.count() == 0
    # The same name in two objects is no duplicate.
    assert spec_parse('{"name": "x", "tasks": [{"name": "a"}, {"name": "b"}]}', fmt="json")["name"] == "x"


def test_a_long_value_or_key_is_quoted_cut_in_its_problem_not_sent_back_whole(db):
    """Every problem quoted its value whole: a 100 000-character priority, agent id, dependency
    or unknown key came back in full in the problem (and the API's answer), a 4 000-digit
    max_retries as 4 000 digits."""
    long = "p" * 100_000
    problems = problems_of(
        {
            "name": "x",
            "priority": long,
            long: 1,
            "metadata": {"k" * 100_000: "\x00"},
            "tasks": [
                {"name": "a", "agent": "a" * 100_000, "max_retries": 10**4000, "depends_on": ["d" * 100_000]},
                {"name": "b" * 100_000 + "!", "agent": "echo", "priority": long},
            ],
        }
    )
    assert len(problems) == 10, [p[:120] for p in problems]
    assert all(len(problem) < 400 for problem in problems), [len(p) for p in problems]
    expected = [
        "priority must be one of critical, high, normal, low, got 'ppppp",
        "['ppppp",  # the unknown key, quoted
        "metadata['kkkkk",
        "tasks[0] (a).agent: unknown agent 'aaaaa",
        f"tasks[0] (a).max_retries must be between 0 and {settings.TASK_MAX_RETRIES_LIMIT}, got 1000",
        "tasks[0] (a).depends_on: unknown task 'ddddd",
        "tasks[1].name 'bbbbb",
        "tasks[1].priority must be one of critical, high, normal, low, got 'ppppp",
    ]
    for text in expected:
        assert any(p.startswith(text) and "..." in p for p in problems), (text, [p[:120] for p in problems])


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_a_long_key_given_twice_is_quoted_cut_in_its_problem(db, fmt):
    """The duplicate key's problem (the parser's, JSON request bodies' too) quoted it whole: a
    100 000-character key given twice came back as 100 000 characters, twice in the API's answer."""
    key = "k" * 100_000
    # (YAML: explicit keys, a plain one ends at 1 024 characters)
    text = f'{{"name": "x", "{key}": 1, "{key}": 2}}' if fmt == "json" else f"name: x\n? {key}\n: 1\n? {key}\n: 2\n"
    with pytest.raises(SpecError) as info:
        spec_parse(text, fmt=fmt)
    (problem,) = info.value.problems
    assert "duplicate key 'kkkkk" in problem and "..." in problem
    assert len(problem) < 400, len(problem)
