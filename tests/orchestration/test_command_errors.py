"""Operator mistakes and missing services give a one-line CommandError and exit 1, never a
traceback: the management commands as an operator runs them."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from tests.engine import ROOT, database_url, manage, sqlite_manage

DEPTH = 100_000


@pytest.mark.subprocess
@pytest.mark.parametrize("args", [["relay_events"], ["synapse_groups"], ["synapse_groups", "--alive", "host-"]])
def test_stream_commands_without_redis_say_so_in_one_line(tmp_path: Path, args: list[str]) -> None:
    sqlite_manage(tmp_path, "migrate", "--no-input")
    result = sqlite_manage(tmp_path, *args, check=False)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == "CommandError: the Synapse stream needs Redis: set REDIS_URL"


def test_a_workflow_spec_nested_too_deeply_is_refused_by_name(tmp_path: Path) -> None:
    spec = tmp_path / "deep.json"
    spec.write_text("[" * DEPTH + "]" * DEPTH)
    with pytest.raises(CommandError, match="spec is nested too deeply to read as JSON"):
        call_command("submit_workflow", str(spec))
    spec = tmp_path / "deep.yaml"
    spec.write_text("name: " + "[" * DEPTH + "]" * DEPTH)
    with pytest.raises(CommandError, match="spec is nested too deeply to read as YAML"):
        call_command("submit_workflow", str(spec))


@pytest.mark.django_db
def test_an_agent_definition_nested_too_deeply_is_refused_by_file(tmp_path: Path) -> None:
    definition = tmp_path / "deep.yaml"
    definition.write_text("executor: python\nconfig: " + "[" * DEPTH + "]" * DEPTH)
    with pytest.raises(CommandError, match=f"{definition}: nested too deeply to read as YAML"):
        call_command("load_agents", str(tmp_path))


@pytest.mark.django_db
def test_reap_stale_tasks_with_the_broker_down_reports_the_pass_and_names_the_broker(settings) -> None:
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/5"
    out = io.StringIO()
    with pytest.raises(CommandError, match="cannot reach the Celery broker to re-send lost messages"):
        call_command("reap_stale_tasks", stdout=out)
    assert out.getvalue().strip() == (
        "timed out: 0  lost: 0  workflows failed (deadline): 0  queue timeouts: 0  re-sent: -"
    )


@pytest.mark.django_db
def test_load_agents_given_a_file_says_it_is_not_a_directory(tmp_path: Path) -> None:
    definition = tmp_path / "echo.yaml"
    definition.write_text("executor: python\n")
    with pytest.raises(CommandError, match=f"{definition}: not a directory"):
        call_command("load_agents", str(definition))


@pytest.mark.django_db
def test_load_agents_names_a_definition_whose_path_is_not_utf8_and_stores_nothing(tmp_path: Path) -> None:
    """A file name (or a directory's) with bytes that are not UTF-8 reached the agents table as
    lone surrogates: a UnicodeEncodeError traceback. (`export_training_data --output` likewise
    wrote its files, then failed recording their path.)"""
    from orchestration.models import Agent

    (tmp_path / "good.yaml").write_text(
        "name: Good\nexecutor: python\nentrypoint: orchestration.runtime.builtin.echo\n"
    )
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9.yaml"))
    odd.write_text("id: cafe\nname: Cafe\nexecutor: python\nentrypoint: orchestration.runtime.builtin.echo\n")
    with pytest.raises(CommandError) as refused:
        call_command("load_agents", str(tmp_path), stdout=io.StringIO())
    assert (
        str(refused.value)
        == f"invalid agent definitions:\n  {tmp_path}/caf\\udce9.yaml: the file's path is not UTF-8 text"
    )
    assert not Agent.objects.filter(id__in=["good", "cafe"]).exists()


def test_export_training_data_names_the_option_for_the_last_day_there_is() -> None:
    with pytest.raises(CommandError, match=r"^--end 9999-12-31: the last day that can be exported is 9999-12-30$"):
        call_command("export_training_data", "--type", "events", "--start", "2026-01-01", "--end", "9999-12-31")


@pytest.mark.subprocess
@pytest.mark.parametrize(
    "args",
    [
        ["submit_workflow", "examples/demo.yaml"],
        ["workflow_status", "01a24b83-24ba-7091-b2a0-c871789ac701"],
        ["load_agents"],
        ["export_training_data", "--type", "events", "--start", "2026-01-01", "--end", "2026-01-01"],
    ],
)
def test_a_command_on_a_database_not_migrated_says_to_migrate(tmp_path: Path, args: list[str]) -> None:
    result = sqlite_manage(tmp_path, *args, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.rstrip().splitlines()[-1]  # (the export's progress bars come before it)
    database = f"{tmp_path}/db.sqlite3 (SQLite)"
    assert last.startswith(f"CommandError: the database {database} is not migrated (no such table: ")
    assert last.endswith("migration(s) not applied, the first contenttypes.0001_initial; run `manage.py migrate`")


@pytest.mark.subprocess
@pytest.mark.parametrize("args", [["reap_stale_tasks"], ["workflow_status", "01a24b83-24ba-7091-b2a0-c871789ac701"]])
def test_a_command_with_postgresql_unreachable_names_the_database(tmp_path: Path, args: list[str]) -> None:
    env = {key: value for key, value in os.environ.items() if key != "DJANGO_SETTINGS_MODULE"}
    env |= {
        "DATABASE_URL": "postgres://agentledger@127.0.0.1:1/agentledger_nowhere",
        "DJANGO_SETTINGS_MODULE": "config.settings.local",
        "VAR_DIR": str(tmp_path / "var"),
    }
    result = manage(*args, env=env, check=False, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("CommandError: cannot connect to the database agentledger_nowhere on 127.0.0.1:1: ")


@pytest.mark.django_db
def test_other_database_errors_of_a_command_are_raised_as_they_were() -> None:
    from django.db import ProgrammingError, connection, transaction

    from orchestration.management.arguments import database_problem

    with pytest.raises(ProgrammingError) as caught, transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELEC 1")
    assert database_problem(caught.value) is None
    with pytest.raises(ProgrammingError) as caught, transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT * FROM agentledger_no_such_table")
    assert database_problem(caught.value) is None  # a missing table, but nothing left to migrate


@pytest.mark.django_db
def test_a_postgresql_database_without_this_versions_migrations_is_told_to_migrate() -> None:
    """PostgreSQL, production's database, upgraded without `migrate`: the new code names a
    column the last migration adds. PostgreSQL says so by its SQLSTATE (not SQLite's
    message, the only one the commands' test above reads)."""
    from django.db import ProgrammingError, connection, transaction

    from orchestration.management.arguments import database_problem

    with connection.cursor() as cursor:  # the newest migration not applied (rolled back with the test)
        cursor.execute(
            "DELETE FROM django_migrations WHERE id = (SELECT max(id) FROM django_migrations WHERE app = "
            "'orchestration') RETURNING name"
        )
        (newest,) = cursor.fetchone()
    with pytest.raises(ProgrammingError) as caught, transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT agentledger_not_yet_added FROM task_attempts")
    where = connection.settings_dict
    database = f"{where['NAME']} on {where['HOST']}:{where['PORT']}"
    assert database_problem(caught.value) == (
        f'the database {database} is not migrated (column "agentledger_not_yet_added" does not exist): '
        f"1 migration(s) not applied, the first orchestration.{newest}; run `manage.py migrate`"
    )


@pytest.mark.parametrize(
    ("timeout", "error"),
    [
        ("0", "'0' is not a positive number of seconds, at most 60"),  # it said "between 0 and 60"
        ("61", "'61' is not a positive number of seconds, at most 60"),
    ],
)
def test_worker_health_names_the_timeouts_it_takes(timeout: str, error: str) -> None:
    with pytest.raises(CommandError) as info:
        call_command("worker_health", "--timeout", timeout, stdout=io.StringIO())
    assert str(info.value) == f"Error: argument --timeout: {error}"


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["workflow_status", "\udcff"], "argument workflow_id: b'\\xff' is not UTF-8 text"),
        (["create_api_key", "\udcffx", "--name", "k"], "argument user: b'\\xffx' is not UTF-8 text"),
        (["create_api_key", "someone", "--name", "k\udce9"], "argument --name: b'k\\xe9' is not UTF-8 text"),
        (["chat", "echo", "--instance", "a\x00b"], "argument --instance: 'a\\x00b' contains a NUL character"),
        (["load_agents", "/tmp/\udcff"], "argument path: b'/tmp/\\xff' is not UTF-8 text"),
        (["consume_events", "--once", "--group", "\udcff"], "argument --group: b'\\xff' is not UTF-8 text"),
        (["consume_events", "--once", "--consumer", "\udcff"], "argument --consumer: b'\\xff' is not UTF-8 text"),
        (
            ["export_training_data", "--type=events", "--start=2026-01-01", "--end=2026-01-01", "--output=/tmp/\udcff"],
            "argument --output: b'/tmp/\\xff' is not UTF-8 text",
        ),
    ],
)
def test_an_argument_that_is_not_text_is_named_not_a_traceback(args: list[str], error: str) -> None:
    """An argument whose bytes are not UTF-8 (a Latin-1 terminal, a pasted binary) reaches the
    command as unpaired surrogates (PEP 383), which the query it was put into could not encode:
    a UnicodeEncodeError traceback."""
    with pytest.raises(CommandError) as info:
        call_command(*args, stdout=io.StringIO())
    assert str(info.value) == f"Error: {error}"


@pytest.mark.subprocess
def test_a_following_command_whose_database_goes_away_names_it_in_one_line(transactional_db, tmp_path: Path) -> None:
    """PostgreSQL restarts or fails over under `relay_events --follow`: it exits 1 with a
    CommandError naming the database, for its supervisor to start it again, not a traceback."""
    from django.db import connection

    from tests.engine import ManageProcess, database_url, wait_for

    log = tmp_path / "relay.log"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.test", "DATABASE_URL": database_url()}
    relay = ManageProcess(["relay_events", "--follow", "--interval", "0.1"], env, log)
    try:
        wait_for(relay.database_connections_cut, timeout=30, what="the relay's database session to terminate")
        relay.process.wait(timeout=30)
    finally:
        relay.kill()
    output = log.read_text()
    assert relay.process.returncode == 1, output
    assert "Traceback" not in output, output
    database = connection.settings_dict
    where = f"{database['NAME']} on {database['HOST']}:{database['PORT']}"
    said = [line for line in output.splitlines() if not line.startswith("--- ")]  # ManageProcess's own notes
    assert said[0].startswith(f"CommandError: lost the connection to the database {where}: "), output


@pytest.mark.subprocess
@pytest.mark.parametrize("args", [["help"], ["submit_workflow", "--help"]])
def test_a_command_whose_reader_left_ends_without_a_traceback(args) -> None:
    """`manage.py … | head -1`: the reader is gone before the output is written. Python's flush
    at exit failed on the broken pipe with a message no handler could catch (exit status 120),
    and a command that wrote more meanwhile ended with a BrokenPipeError traceback. argparse's
    --help ends by SystemExit, as a CommandError does: its output was still flushed at exit."""
    process = subprocess.Popen(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        # Not unbuffered, as stdout is for an operator's pipe (the suite may run with PYTHONUNBUFFERED)
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.test", "PYTHONUNBUFFERED": ""},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stdout.close()  # long before Django has started and written its help
    stderr = process.stderr.read().decode()
    assert process.wait(60) == 1
    assert "BrokenPipeError" not in stderr and "Traceback" not in stderr, stderr


@pytest.mark.subprocess
def test_a_command_whose_output_socket_was_closed_ends_without_a_traceback() -> None:
    """stdout a socket (a log shipper's connection) whose peer left: poll reports a hang-up
    there, not the error a pipe's end reports, and the broken pipe was a traceback."""
    ours, theirs = socket.socketpair()
    theirs.close()
    with ours:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "help"],
            cwd=ROOT,
            env={**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.test"},
            stdout=ours,
            stderr=subprocess.PIPE,
        )
    stderr = process.stderr.read().decode()
    assert process.wait(60) == 1
    assert "BrokenPipeError" not in stderr and "Traceback" not in stderr, stderr


@pytest.mark.subprocess
@pytest.mark.django_db(transaction=True)
def test_a_command_error_after_output_whose_reader_left_keeps_its_line_and_status(builtin_agents, tmp_path) -> None:
    """`submit_workflow F --wait --timeout 1 | head -1` whose workflow did not end in time: the
    CommandError's line was on stderr, then the flush at exit failed on the broken pipe (its
    uncatchable message, exit status 120 instead of the error's 1)."""
    spec = tmp_path / "queued.json"
    spec.write_text('{"name": "queued", "tasks": [{"name": "a", "agent": "echo"}]}')  # no worker: it stays queued
    process = subprocess.Popen(
        [sys.executable, "manage.py", "submit_workflow", str(spec), "--wait", "--timeout", "1"],
        cwd=ROOT,
        env={
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "config.settings.test",
            "DATABASE_URL": database_url(),
            "PYTHONUNBUFFERED": "",
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(60) == 1
    assert stderr.startswith("CommandError: workflow ") and stderr.endswith(" still running after 1 s\n"), stderr
