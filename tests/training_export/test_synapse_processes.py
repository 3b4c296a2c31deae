"""Several consumer processes on the same entries (`consume_events --processes`, and consumers of
different groups sharing the files): every event written once, nothing lost, nothing pending."""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from django.conf import settings

from tests.engine import ROOT, output_of

T0 = dt.datetime(2024, 3, 5, 22, 0, tzinfo=dt.UTC)
EVENTS = 3000
REPEATED = 300  # entries carrying the event_id of an earlier entry (a republished event)


@pytest.fixture
def stream(settings) -> Iterator[str]:
    name = f"synapse-test-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(settings.REDIS_URL)
    pipe = client.pipeline(transaction=False)
    for number in range(EVENTS + REPEATED):
        index = number if number < EVENTS else (number - EVENTS) * 7
        event_type = "tool_executed" if index % 3 == 0 else "agent_started"
        payload = {
            "tool_name": "calculator",
            "n": index,
            "note": f'step {index}, "quoted"',
            "usage": {"tokens_used": 3},
        }
        pipe.xadd(
            name,
            {
                "event_id": f"ev-{index}",
                "sequence": str(number + 1),
                "event_type": event_type,
                "entity_type": "task",
                "entity_id": f"task-{index}",
                "agent_id": "agent-1",
                "source": "platform",
                "severity": "info",
                # Four hours: the events straddle two UTC days.
                "created_at": (T0 + dt.timedelta(seconds=index * 4)).isoformat(),
                "payload": json.dumps(payload, sort_keys=True, separators=(",", ":")),
            },
            id=f"{number + 1}-1",
        )
    pipe.execute()
    yield name
    client.delete(name, f"{name}:dead")
    client.close()


def consume_events(
    stream: str, data_dir: Path, *args: str, once: bool = True, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "REDIS_URL": settings.REDIS_URL,
        **(env or {}),
    }
    env.update(SYNAPSE_STREAM=stream, TRAINING_DATA_DIR=str(data_dir))
    return subprocess.Popen(
        [sys.executable, "manage.py", "consume_events", *(["--once"] if once else []), "--batch", "50", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen[str]) -> str:
    output = output_of(process, timeout=180)
    assert process.returncode == 0, output
    return output


def written_ids(data_dir: Path, data_type: str) -> Counter[str]:
    """event_id -> rows, over every file of the type; each file checked to have one header."""
    found: Counter[str] = Counter()
    for path in sorted((data_dir / data_type).glob("*.csv")):
        with path.open(newline="") as fh:
            rows = list(csv.reader(fh))
        assert rows[0][0] in {"event_id", "execution_id"}
        header = rows[0]
        assert header not in rows[1:], f"{path} holds its header twice"
        found.update(row[header.index("event_id")] for row in rows[1:])
    return found


def assert_each_event_written_once(data_dir: Path) -> None:
    events = written_ids(data_dir, "events")
    assert set(events) == {f"ev-{index}" for index in range(EVENTS)}
    assert set(events.values()) == {1}
    tools = written_ids(data_dir, "tool_executions")
    assert set(tools) == {f"ev-{index}" for index in range(0, EVENTS, 3)}
    assert set(tools.values()) == {1}
    assert len(list((data_dir / "events").glob("*.csv"))) == 2


def test_two_processes_of_one_group_write_every_entry_once_and_leave_nothing_pending(settings, stream, tmp_path):
    data_dir = tmp_path / "training"

    output = finish(consume_events(stream, data_dir, "--processes", "2", "--consumer", "worker"))

    done = dict(re.findall(r"consumer (worker-\d) done: (\d+) entries", output))
    assert set(done) == {"worker-1", "worker-2"}, output
    assert sum(map(int, done.values())) == EVENTS + REPEATED  # every entry delivered to one of them
    assert_each_event_written_once(data_dir)
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        assert client.xpending(stream, "training")["pending"] == 0
        assert client.xlen(f"{stream}:dead") == 0
        assert client.xinfo_consumers(stream, "training") == []
    finally:
        client.close()


def test_consumers_of_two_groups_writing_the_same_files_at_once_write_each_event_once(settings, stream, tmp_path):
    # Each group delivers every entry, so both processes try to write every event into the
    # same files at the same time: the file lock and the dedupe must hold across processes.
    data_dir = tmp_path / "training"

    first = consume_events(stream, data_dir, "--group", "one")
    second = consume_events(stream, data_dir, "--group", "two")
    outputs = [finish(first), finish(second)]

    written = [int(re.search(r"rows written: events=(\d+)", output)[1]) for output in outputs]
    assert sum(written) == EVENTS, outputs
    assert_each_event_written_once(data_dir)


def test_processes_must_be_a_sensible_number(settings, tmp_path):
    output = consume_events("synapse-unused", tmp_path, "--processes", "0").communicate(timeout=60)[0]
    assert "--processes must be between 1 and 64" in output


def processes_of(stream: str) -> set[int]:
    """The running processes started for `stream` (its name is in their environment; Linux
    /proc). An orphan re-parented to init is found too, and a zombie nobody reaps is not
    counted (init in a container may never reap it)."""
    marker = f"SYNAPSE_STREAM={stream}".encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone meanwhile, or not ours
            continue
        if marker in environ and state not in {"Z", "X"}:
            found.add(int(entry.name))
    return found


@pytest.fixture
def no_stray_processes(stream) -> Iterator[None]:
    """Whatever a failed test leaves running on its stream is killed (they are its own)."""
    yield
    for pid in processes_of(stream):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_until(condition: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def group_names(stream: str) -> list[str]:
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        return [group["name"].decode() for group in client.xinfo_groups(stream)]
    finally:
        client.close()


def group_consumers(stream: str) -> list[str]:
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        return [consumer["name"].decode() for consumer in client.xinfo_consumers(stream, "training")]
    except redis.ResponseError:  # no group yet
        return []
    finally:
        client.close()


def assert_group_left_clean(stream: str) -> None:
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        assert client.xpending(stream, "training")["pending"] == 0
        assert client.xinfo_consumers(stream, "training") == []
    finally:
        client.close()


def stop_parent(parent: subprocess.Popen[str], how: signal.Signals) -> str:
    parent.send_signal(how)
    if how == signal.SIGKILL:
        parent.wait(timeout=30)
        return ""
    return finish(parent)


def test_the_consumers_stop_and_leave_the_group_when_the_parent_is_killed(
    settings, stream, no_stray_processes, tmp_path
):
    # A SIGKILLed parent runs no handler: without their own check the children would go on
    # consuming under init, next to the consumers of a restarted command.
    data_dir = tmp_path / "training"
    parent = consume_events(
        stream, data_dir, "--processes", "2", "--consumer", "worker", "--block-ms", "200", once=False
    )
    wait_until(lambda: len(group_consumers(stream)) == 2, "both consumers in the group")
    assert len(processes_of(stream)) == 3

    stop_parent(parent, signal.SIGKILL)
    wait_until(lambda: not processes_of(stream), "the orphaned consumers to exit")

    assert_group_left_clean(stream)  # each finished its batch and left
    finish(consume_events(stream, data_dir))  # what they left on the stream
    assert_each_event_written_once(data_dir)


def test_sigterm_in_once_mode_lets_each_consumer_finish_its_batch_and_leave(
    settings, stream, no_stray_processes, tmp_path
):
    data_dir = tmp_path / "training"
    parent = consume_events(stream, data_dir, "--processes", "2", "--consumer", "worker", "--batch", "10")
    wait_until(lambda: group_consumers(stream), "a consumer in the group")

    output = stop_parent(parent, signal.SIGTERM)  # exit code 0

    done = dict(re.findall(r"consumer (worker-\d) done: (\d+) entries", output))
    assert set(done) == {"worker-1", "worker-2"}, output
    assert sum(map(int, done.values())) < EVENTS + REPEATED, output  # stopped, not drained
    assert_group_left_clean(stream)
    finish(consume_events(stream, data_dir))  # the rest, by a later run
    assert_each_event_written_once(data_dir)


def test_sigterm_while_the_consumers_are_being_started_stops_them_all(settings, stream, no_stray_processes, tmp_path):
    # The parent blocks the stop signals while it forks, the children until their handlers
    # are in place: a signal in that window must neither leave a consumer running without
    # its parent nor kill one mid-batch.
    data_dir = tmp_path / "training"
    parent = consume_events(
        stream, data_dir, "--processes", "2", "--consumer", "worker", "--block-ms", "200", once=False
    )
    wait_until(lambda: len(processes_of(stream)) > 1, "the first consumer process")

    stop_parent(parent, signal.SIGTERM)  # exit code 0

    assert not processes_of(stream)
    assert_group_left_clean(stream)


def test_the_alive_check_passes_while_a_consumer_reads_and_fails_once_it_stops_reading(
    settings, stream, no_stray_processes, tmp_path
):
    """compose's synapse healthcheck (`synapse_groups --alive HOSTNAME-`) on a real consumer: a
    hung one (SIGSTOP: its process exists, it reads nothing) is reported, by name and idle time."""
    import io

    from django.core.management import CommandError, call_command

    settings.SYNAPSE_STREAM = stream
    parent = consume_events(stream, tmp_path / "training", "--consumer", "host-a", "--block-ms", "100", once=False)
    try:
        wait_until(lambda: "host-a" in group_consumers(stream), "the consumer to join the group")
        out = io.StringIO()
        call_command("synapse_groups", "--alive", "host-", "--max-idle", "5", stdout=out)
        assert out.getvalue().startswith(f"host-a read from '{stream}' ")
        with pytest.raises(CommandError, match="no consumer of the group 'training' is named other-…"):
            call_command("synapse_groups", "--alive", "other-")
        with pytest.raises(CommandError, match="no consumer group 'elsewhere'"):
            call_command("synapse_groups", "--alive", "host-", "--group", "elsewhere")
        with pytest.raises(CommandError, match="--group and --max-idle go with --alive"):
            call_command("synapse_groups", "--max-idle", "5")
        with pytest.raises(CommandError, match="--alive and --destroy are separate uses"):
            call_command("synapse_groups", "--alive", "host-", "--destroy", "training")
        assert "training" in group_names(stream), "nothing was destroyed"

        parent.send_signal(signal.SIGSTOP)
        time.sleep(1.5)
        with pytest.raises(
            CommandError, match=r"no consumer named host-… has read for (\d+\.\d) s \(the latest: host-a\)"
        ) as hung:
            call_command("synapse_groups", "--alive", "host-", "--max-idle", "1")
        # over the 1 s allowed: it has been stopped for 1.5 s (longer on a loaded machine)
        assert float(re.search(r"has read for (\d+\.\d) s", str(hung.value)).group(1)) > 1.0
        parent.send_signal(signal.SIGCONT)

        def alive() -> bool:
            try:
                call_command("synapse_groups", "--alive", "host-", "--max-idle", "1", stdout=io.StringIO())
            except CommandError:
                return False
            return True

        wait_until(alive, "the continued consumer to read again")
    finally:
        parent.send_signal(signal.SIGCONT)
        stop_parent(parent, signal.SIGTERM)


def test_a_consumer_process_whose_database_is_away_says_so_in_one_line(settings, tmp_path):
    """A finished task's row is read from PostgreSQL: with the database down (a restart, a
    failover), the forked consumer that meets one fails as the command does, in one line naming
    the database (then the command, for its supervisor), not with multiprocessing's traceback."""
    name = f"synapse-test-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(settings.REDIS_URL)
    fields = {"event_id": "ev-1", "sequence": "1", "event_type": "task_completed", "entity_type": "task"}
    fields |= {"entity_id": "task-1", "source": "platform", "severity": "info", "created_at": T0.isoformat()}
    client.xadd(name, {**fields, "payload": "{}"}, id="1-1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    away = {"DATABASE_URL": f"postgres://postgres@127.0.0.1:{port}/agentledger_away"}
    process = consume_events(name, tmp_path / "training", "--processes", "2", env=away)
    try:
        output = output_of(process, timeout=120)
    finally:
        client.delete(name, f"{name}:dead")
        client.close()
    assert process.returncode == 1, output
    assert "Traceback" not in output, output
    assert f"CommandError: cannot connect to the database agentledger_away on 127.0.0.1:{port}: " in output
    assert re.search(r"CommandError: consume_events-\d exited with 1", output), output


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_consumer_whose_output_reader_left_says_nothing_of_the_training_files(
    settings, stream, no_stray_processes, tmp_path, processes
):
    """Its stdout a pipe whose reader left (a log collector restarted): the broken pipe was
    named "cannot write the training data: [Errno 32] Broken pipe", sending an operator to the
    disk. It ends as manage.py ends any command whose reader left: status 1, no traceback; the
    parent of forked consumers names their exits, for its supervisor."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "REDIS_URL": settings.REDIS_URL,
        "SYNAPSE_STREAM": stream,
        "TRAINING_DATA_DIR": str(tmp_path / "training"),
        "PYTHONUNBUFFERED": "1",  # as platform/Dockerfile runs it: the first line fails at once
    }
    process = subprocess.Popen(
        [sys.executable, "manage.py", "consume_events", "--processes", processes, "--block-ms", "200"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    process.stdout.close()  # before it has written its first line
    stderr = process.stderr.read()
    assert process.wait(120) == 1, stderr
    assert "training data" not in stderr and "Traceback" not in stderr, stderr
    if processes == "2":
        assert re.fullmatch(r"CommandError: consume_events-\d exited with 1; consume_events-\d exited with 1\n", stderr)
    else:
        assert stderr == "", stderr
