"""README.md against the code it describes: what a user copies from it must be what the
platform does."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from django.core.management import call_command

from orchestration.models import TaskAttempt
from orchestration.services.specs import TASK_FIELDS, WORKFLOW_FIELDS, spec_validate

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _section(heading: str) -> str:
    """The text under `heading`, up to the next heading, its lines joined."""
    return " ".join(README.split(f"\n{heading}\n", 1)[1].split("\n#", 1)[0].split())


@pytest.mark.django_db
def test_the_spec_section_names_every_field_and_the_defaults_a_task_gets():
    """A task's spec fields beyond name, agent, input and the example's limits were not
    documented, nor what a task left without them gets (three retries among them)."""
    call_command("load_agents", stdout=io.StringIO())
    section = _section("### Workflow specs")
    named = set(re.findall(r"\b([a-z_]+)\b", section))
    assert not (WORKFLOW_FIELDS | TASK_FIELDS) - named, (WORKFLOW_FIELDS | TASK_FIELDS) - named
    spec = spec_validate({"name": "w", "tasks": [{"name": "a", "agent": "echo"}]})
    task = spec.tasks[0]
    assert f"`max_retries` (default {task.max_retries}" in section
    assert "`timeout_seconds` (default `TASK_DEFAULT_TIMEOUT_SECONDS`" in section
    assert f"`priority` (default the workflow's, `{spec.priority}` unless it says" in section


def test_the_attempts_metric_names_every_cause_an_attempt_is_counted_with():
    """agentledger_task_attempts_total is labelled with the attempt's cause; the table listed
    five of them, and a user alerting on queue timeouts or lost connections found no word of
    their labels."""
    row = next(line for line in README.splitlines() if line.startswith("| `agentledger_task_attempts_total`"))
    missing = [cause for cause in ("success", *TaskAttempt.Cause.values) if f"`{cause}`" not in row]
    assert not missing, f"the attempts metric's row does not name the causes {missing}"


def _metrics_rows() -> dict[str, tuple[str, ...]]:
    """Each metric of the Prometheus table with the labels its row names (a label's values, in
    parentheses, left out)."""
    rows = {}
    for line in README.splitlines():
        if not line.startswith("| `agentledger_"):
            continue
        names, _, labels = (cell.strip() for cell in line.strip("|").split("|")[:3])
        labels = tuple(word.strip() for word in re.sub(r"\([^)]*\)", "", labels).split(",") if word.strip())
        for name in re.findall(r"`(agentledger_[a-z_]+)`", names):
            rows[name] = labels
    return rows


def test_the_metrics_table_names_each_counter_and_histogram_with_its_labels():
    """The table gave the InfluxDB writer's two counters one row labelled `reason`: only the
    dropped points have it, and a query on the written points by reason finds nothing."""
    from prometheus_client.metrics import MetricWrapperBase

    from observability import collectors, influx, metrics

    rows = _metrics_rows()
    defined = [
        metric
        for module in (metrics, influx, collectors)
        for metric in vars(module).values()
        if isinstance(metric, MetricWrapperBase)
    ]
    assert defined
    for metric in defined:
        name = f"{metric._name}_total" if metric._type == "counter" else metric._name
        assert name in rows, f"{name} is not in the README's metrics table"
        assert rows[name] == tuple(metric._labelnames), (name, rows[name], metric._labelnames)


def test_the_visibility_timeout_row_states_the_shortest_countdown_the_settings_count():
    """The row said a hold counts at least 30 s of countdown (the retry after a lost database
    connection); the settings count 38 s (a task deferred for its agent's max_concurrency), and
    a visibility timeout sized by the README was refused at start."""
    from config.settings.base import longest_message_hold_seconds

    shortest = longest_message_hold_seconds(0, 0, 1)
    row = next(line for line in README.splitlines() if line.startswith("| `BROKER_VISIBILITY_TIMEOUT_SECONDS`"))
    assert f"at least {shortest} s" in row, f"the row does not say a message is held at least {shortest} s"


def test_the_commands_table_names_every_option_of_each_command():
    """consume_events' --group, --consumer, --block-ms and --claim-idle-ms and
    export_training_data's --no-progress were in no row: an operator found them only in --help."""
    from django.core.management import BaseCommand, get_commands, load_command_class

    common = {
        option for action in BaseCommand().create_parser("manage.py", "x")._actions for option in action.option_strings
    }
    table = README.split("\nCommands:\n\n", 1)[1].split("\n\n", 1)[0]
    rows = {re.match(r"\| `([a-z_]+)", line)[1]: line for line in table.splitlines()[2:]}
    assert len(rows) >= 12, sorted(rows)
    missing = {}
    for command, row in rows.items():
        parser = load_command_class(get_commands()[command], command).create_parser("manage.py", command)
        options = {option for action in parser._actions for option in action.option_strings if option.startswith("--")}
        unnamed = sorted(option for option in options - common if option not in row)
        if unnamed:
            missing[command] = unnamed
    assert not missing, f"the commands table does not name these options: {missing}"


def test_the_api_section_names_the_endpoints_where_format_is_a_filter():
    """The README said `?format=` names a format on any endpoint (`json`, `api`); on the exports
    it filters the runs by their format, and `?format=json` there is a 400."""
    from drf_spectacular.generators import SchemaGenerator

    schema = SchemaGenerator().get_schema(request=None, public=True)
    section = _section("## REST API")
    filters = {
        path.split("/")[3]: parameter["schema"]["enum"]
        for path, operations in schema["paths"].items()
        for operation in operations.values()
        for parameter in operation.get("parameters", [])
        if parameter["in"] == "query" and parameter["name"] == "format"
    }
    assert filters
    for resource, values in filters.items():
        said = re.search(rf"on `{resource}`, `format` filters [^)]*\)", section)
        assert said, f"the REST API section does not say that `format` is a filter on {resource}"
        assert all(f"`{value}`" in said[0] for value in values), (said[0], values)


def test_the_concurrency_bullet_states_the_longest_deferral():
    """The bullet said a deferred task's message comes back within 30 s; with its jitter it
    comes back up to 37.5 s later (96 of 200 deferrals behind a line of 40 were over 30 s)."""
    from django.conf import settings

    bullet = _section("### What the engine guarantees").split("**Per-agent concurrency**", 1)[1].split("- **", 1)[0]
    assert f"{settings.TASK_DEFERRAL_MAX_COUNTDOWN_SECONDS} s at most" in bullet, bullet
