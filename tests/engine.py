"""Helpers for execution tests: real Celery worker processes against the test database
and Redis, and polling for the outcome."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parents[1]


def wait_for(predicate: Callable[[], Any], *, timeout: float = 30.0, interval: float = 0.1, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


# For a test of what follows a lost database connection (the message sent again, the attempt
# closed `connection_lost`, the agent run again): a try's success whose write lost the
# connection is not written again on a new one, as when the database stays away longer than
# TASK_RESULT_WRITE_RETRY_SECONDS. Cutting the worker's sessions while its agent runs then
# stands for that.
RESULT_WRITE_NOT_RETRIED = {"TASK_RESULT_WRITE_RETRY_SECONDS": "0"}


@contextlib.contextmanager
def database_connections_refused() -> Iterator[None]:
    """Inside, the test database refuses new connections, as PostgreSQL restarting (or a
    failover under way) refuses them; the sessions already open, this process's among them, go
    on. With Worker.database_connections_cut, the database is away for the worker for as long
    as the test stays inside."""
    import psycopg

    s = connection.settings_dict
    name = connection.ops.quote_name(s["NAME"])
    # From a session on another database: PostgreSQL refuses it from one on this database.
    admin = {"host": s["HOST"] or "127.0.0.1", "port": s["PORT"] or 5432, "user": s["USER"], "dbname": "postgres"}
    with psycopg.connect(**admin, autocommit=True) as other:
        other.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
    try:
        yield
    finally:
        with psycopg.connect(**admin, autocommit=True) as other:
            other.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")


def longer_hard_grace(settings: Any, seconds: int = 10) -> dict[str, str]:
    """Give the hard time limit `seconds` of grace past a task's soft one, in this process (which
    dispatches the test's tasks, and sets the limit on their messages) and, through the
    environment returned, in the workers the test starts: for a test whose soft time-out has work
    to record before the hard limit, which one second (the suite's grace) does not always leave
    on a loaded machine. `settings`: pytest-django's fixture."""
    settings.TASK_HARD_TIMEOUT_GRACE_SECONDS = seconds
    return {"TASK_HARD_TIMEOUT_GRACE_SECONDS": str(seconds)}


def output_of(process: subprocess.Popen[str], *, timeout: float) -> str:
    """A subprocess's output once it exits; one still running after `timeout` is killed (and
    the test fails on its TimeoutExpired)."""
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return output


def database_url() -> str:
    s = connection.settings_dict
    user = s.get("USER") or ""
    auth = f"{user}@" if user else ""
    return f"postgres://{auth}{s.get('HOST') or '127.0.0.1'}:{s.get('PORT') or 5432}/{s['NAME']}"


class Worker:
    """A `celery worker` subprocess (prefork pool, unless `pool` says another) on the test database."""

    def __init__(
        self,
        *,
        concurrency: int = 2,
        log_dir: Path,
        queues: str = "system,critical,high,normal,low",
        env: dict[str, str] | None = None,
        name: str | None = None,
        wait: bool = True,
        pool: str = "prefork",
        app: str = "config",
    ) -> None:
        """`name`: the node name (default a new one); a worker restarted as systemd or Kubernetes
        would restart it takes the name of the one it replaces. `wait`: until it answers pings
        (else the caller calls wait_ready). `app`: the module of its Celery app (another release's
        tasks, in a rolling deploy's tests)."""
        self.name = name or f"test-{uuid.uuid4().hex[:8]}@localhost"
        self.env = env or {}  # what it was started with besides the test's settings (a restart takes it again)
        stem = self.name.split("@")[0]
        self.log_path = log_dir / f"{stem}.log"
        if self.log_path.exists():  # a restart under the same name keeps its predecessor's log
            self.log_path = log_dir / f"{stem}-{uuid.uuid4().hex[:4]}.log"
        process_env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "config.settings.test",
            "DATABASE_URL": database_url(),
            "REDIS_URL": settings.REDIS_URL,
            "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
            **(env or {}),
        }
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                app,
                "worker",
                "-P",
                pool,
                "-c",
                str(concurrency),
                "-Q",
                queues,
                "-n",
                self.name,
                "--without-mingle",
                "--without-gossip",
                "-l",
                "info",
            ],
            cwd=ROOT,
            env=process_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        from config.celery import app

        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited with {self.process.returncode}:\n{self.log()}")
            return bool(app.control.ping(destination=[self.name], timeout=0.5))

        wait_for(ready, timeout=timeout, what=f"worker {self.name} to answer pings")

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]

    def kill_children(self) -> list[int]:
        """SIGKILL the pool processes; those that ended meanwhile (between pgrep and the kill: the
        pool replacing one, the worker shutting down) are not counted."""
        killed = []
        for pid in self.children():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            killed.append(pid)
        return killed

    def broker_connections_cut(self) -> int:
        """Close, on the Redis server, the connections of the worker's main process (its broker
        consumer, producers and remote control), as a network cut or a Redis failover would:
        the worker lives on and reconnects. Returns how many were closed."""
        client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
        ports = _local_tcp_ports(self.process.pid)
        cut = 0
        for entry in client.client_list():
            if int(entry["addr"].rsplit(":", 1)[1]) in ports:
                cut += client.client_kill_filter(_id=entry["id"])
        return cut

    def database_connections_cut(self) -> int:
        """Terminate, on the PostgreSQL server, the connections of the worker's processes (main
        and pool), as a failover or a network cut would: the worker lives on. Returns how many
        were terminated."""
        return _database_connections_cut([self.process.pid, *self.children()])

    def kill(self) -> None:
        """SIGKILL the whole worker: the main process and its pool."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()


class PrivateRedis:
    """A redis-server of the test's own, on a free port, to stop, restart empty or pause at will
    (never the shared one). Without redis-server on PATH the test fails, saying so."""

    def __init__(self, directory: Path, *, keep_data: bool = False) -> None:
        """`keep_data`: every write is appended to a file and synced before it is answered
        (appendonly, appendfsync always), so a server killed and started again (`restart`) comes
        back with all it had, as a crashed Redis with a durable AOF does; without, it comes
        back empty."""
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(
                "redis-server is not on PATH: this test runs a Redis server of its own "
                "(install the redis-server package; scripts/ensure_services.sh does)"
            )
        self.binary = binary
        self.directory = directory
        self.keep_data = keep_data
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.keep_data else "no",
                "--appendfsync",
                "always",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.directory / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)

        def up() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"redis-server exited with {self.process.returncode}: see its log")
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        try:
            wait_for(up, timeout=30, interval=0.05, what=f"the private Redis on port {self.port}")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # nothing is kept: as `shutdown nosave`
            self.process.wait(timeout=10)

    def restart(self) -> None:
        """Kill and start again: every queue, unacknowledged message and lock is gone, unless
        the server keeps its data (`keep_data`)."""
        self.stop()
        self.start()
        self.restarts += 1


def use_broker(
    monkeypatch: pytest.MonkeyPatch,
    url: str,
    *,
    also_redis: bool = False,
    socket_timeout: float | None = None,
    environment: bool = True,
) -> None:
    """Send this process's Celery messages to the broker at `url` until the test ends (with
    `environment`, the processes it starts too). Celery's configuration is set first: it reads
    Django's settings when first read, and would keep the URL set after it as the one to restore.
    Its connection and producer pools are dropped so that no connection to the suite's broker is
    reused. `also_redis`: the Synapse stream and the API's Redis (REDIS_URL) there as well;
    `socket_timeout`: seconds a paused broker holds a write."""
    from config.celery import app

    monkeypatch.setattr(app.conf, "broker_url", url)
    monkeypatch.setattr(settings, "CELERY_BROKER_URL", url)
    if also_redis:
        monkeypatch.setattr(settings, "REDIS_URL", url)
    if environment:
        monkeypatch.setenv("CELERY_BROKER_URL", url)
        if also_redis:
            monkeypatch.setenv("REDIS_URL", url)
    if socket_timeout is not None:
        monkeypatch.setitem(app.conf.broker_transport_options, "socket_timeout", socket_timeout)
    monkeypatch.setattr(app, "_pool", None)
    monkeypatch.setattr(app.amqp, "_producer_pool", None)


class ManageProcess:
    """A `manage.py` command in a subprocess of its own session (signals reach its children too),
    with its output appended to a log; for the soaks, which kill, stop and restart them."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args, self.env, self.log_path = args, env, log
        self.process: subprocess.Popen[bytes] | None = None
        self.stopped = False  # SIGSTOPped and not yet continued
        self.start()

    def note(self, what: str) -> None:
        """A line in the command's log, with the time: what was done to it, among what it wrote."""
        with self.log_path.open("a") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')}.{int(time.time() * 1000) % 1000:03d} {what}\n")

    def start(self) -> None:
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "manage.py", *self.args],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.stopped = False
        self.note(f"started: pid {self.process.pid}, {' '.join(self.args)}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            self.note(f"{signal.Signals(signum).name} to the process group")
            os.killpg(self.process.pid, signum)

    def kill(self) -> None:
        if self.alive():
            self.note("SIGKILL to the process group")
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.stopped = False

    def database_connections_cut(self) -> int:
        """Terminate, on the PostgreSQL server, the command's connections, as a failover would.
        Returns how many were terminated."""
        return _database_connections_cut([self.process.pid]) if self.alive() else 0

    def stop(self) -> int | None:
        """SIGTERM (after SIGCONT), as a supervisor stops it; its exit code."""
        if self.alive():
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
                self.note(f"exited {self.process.returncode}")
            except subprocess.TimeoutExpired:
                self.note("still running 30 s after SIGTERM")
                self.kill()
                return None
        return self.process.returncode if self.process else None


class Loop(threading.Thread):
    """A function called again and again in a thread of its own (with its own database
    connection) until stopped, `interval` seconds apart; what it raises is counted in `errors`
    (by loop and exception type) and the loop goes on, as a supervisor would start the process
    again. For the soaks, whose faults make any pass fail now and then."""

    def __init__(self, name: str, body: Callable[[], Any], *, interval: float, errors: Counter[str]) -> None:
        super().__init__(name=name, daemon=True)
        self.body, self.interval, self.errors = body, interval, errors
        self.stopping = threading.Event()

    def run(self) -> None:
        from django.db import connections

        try:
            while not self.stopping.is_set():
                try:
                    self.body()
                except Exception as exc:  # a fault under way: counted, tried again
                    self.errors[f"{self.name}: {type(exc).__name__}"] += 1
                    logging.getLogger(__name__).debug("%s", self.name, exc_info=True)
                    connections.close_all()  # a terminated session, say: the next pass opens another
                self.stopping.wait(self.interval)
        finally:
            connections.close_all()

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=60)
        assert not self.is_alive(), f"the {self.name} loop did not stop"


def _database_connections_cut(pids: list[int]) -> int:
    ports: set[int] = set()
    for pid in pids:
        try:
            ports |= _local_tcp_ports(pid)
        except OSError:  # a pool process that has just exited
            continue
    if not ports:
        return 0
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND client_port = ANY(%s) AND pid <> pg_backend_pid()",
            [sorted(ports)],
        )
        return cursor.fetchone()[0]


def _local_tcp_ports(pid: int) -> set[int]:
    """The local ports of the TCP sockets process `pid` holds (from /proc: Linux)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target.removeprefix("socket:[").removesuffix("]"))
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            columns = line.split()
            if columns[9] in inodes:
                ports.add(int(columns[1].rsplit(":", 1)[1], 16))
    return ports


def flush_redis() -> None:
    redis.Redis.from_url(settings.REDIS_URL).flushdb()


def manage(
    *args: str, env: dict[str, str], check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`manage.py *args` in a subprocess with environment `env`, as an operator runs it. With
    `check`, it must exit 0."""
    result = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert not check or result.returncode == 0, result.stdout + result.stderr
    return result


def manage_started(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """`manage.py *args` started in a subprocess with environment `env`, its output (stdout and
    stderr together) to read once it ends (`output_of`)."""
    return subprocess.Popen(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def sqlite_manage(tmp_path: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`manage.py *args` in a subprocess on the embedded default: a fresh SQLite file (and
    var/ and training directories) under tmp_path, none of the suite's services. With `check`,
    it must exit 0."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL", "DJANGO_SETTINGS_MODULE"}
    }
    env |= {
        "DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite3",
        "DJANGO_SETTINGS_MODULE": "config.settings.local",
        "VAR_DIR": str(tmp_path / "var"),
        "TRAINING_DATA_DIR": str(tmp_path / "training"),
    }
    return manage(*args, env=env, check=check)


# --- what a soak prints of the record ---------------------------------------------------


def event_text(event: Any) -> str:
    """An event on one line: its sequence, type and payload (less what every one repeats)."""
    payload = {k: v for k, v in event.payload.items() if k not in ("task_name", "state")}
    return f"#{event.sequence} {event.event_type} {payload}"


def broker_messages(client: redis.Redis) -> dict[str, str]:
    """Celery task id -> where its message is on a Redis broker: "in queue <name>", or
    "unacked" (delivered to a worker, which holds it, with an ETA or running)."""
    where = {json.loads(raw)[0]["headers"]["id"]: "unacked" for raw in client.hvals("unacked")}
    for queue in ("critical", "high", "normal", "low"):
        where |= {json.loads(raw)["headers"]["id"]: f"in queue {queue}" for raw in client.lrange(queue, 0, -1)}
    return where


def record_lines(
    ids: list[str], *, last_events: int | None = None, messages: dict[str, str] | None = None
) -> list[str]:
    """The rows of the workflows `ids` names (workflow or task ids), a line each: the workflow,
    its events, and each task (marked `*` if named) with its attempts and events. With
    `last_events`, only an entity's last so many events, and none of a task that ended; with
    `messages` (broker_messages), where an unfinished task's message is."""
    from orchestration.models import Event, TaskAttempt, TaskExecution, Workflow

    def events_of(entity_id: str) -> list[str]:
        events = Event.objects.filter(entity_id=entity_id).order_by("-sequence" if last_events else "sequence")
        texts = [f"{event.created_at:%H:%M:%S.%f} {event_text(event)}" for event in events[:last_events]]
        return texts[::-1] if last_events else texts

    workflow_ids = set(Workflow.objects.filter(pk__in=ids).values_list("pk", flat=True))
    workflow_ids |= set(TaskExecution.objects.filter(pk__in=ids).values_list("workflow_id", flat=True))
    lines = []
    for workflow in Workflow.objects.filter(pk__in=workflow_ids).order_by("created_at"):
        lines.append(
            f"workflow {workflow.pk} {workflow.status} continue_on_failure={workflow.continue_on_failure} "
            f"deadline={workflow.deadline} steps total/completed/failed/cancelled {workflow.total_steps}/"
            f"{workflow.completed_steps}/{workflow.failed_steps}/{workflow.cancelled_steps} "
            f"errors {workflow.error_count} tokens {workflow.total_tokens_used} ${workflow.total_cost_usd} "
            f"wasted ${workflow.wasted_cost_usd} {workflow.started_at} - {workflow.completed_at} "
            f"error={workflow.error!r}"
        )
        lines += [f"  {text}" for text in events_of(workflow.pk)]
        for task in TaskExecution.objects.filter(workflow_id=workflow.pk).order_by("task_name"):
            mark = "*" if task.pk in ids else " "
            where = ""
            if messages is not None and task.celery_task_id and not task.is_terminal:  # sent, not ended
                where = f" message {messages.get(task.celery_task_id, 'not on the broker')}"
            lines.append(
                f" {mark}task {task.task_name} {task.pk} {task.agent_id} {task.status} retries {task.retry_count}/"
                f"{task.max_retries} deps {task.depends_on} tokens {task.tokens_used} ${task.cost_usd} "
                f"queued {task.queued_at} {task.started_at} - {task.completed_at}{where}"
            )
            lines += [
                f"    attempt {a.attempt_number} {a.status} {a.cause} {a.worker} pid {a.pool_pid} "
                f"{a.started_at} - {a.finished_at} {a.duration_ms} ms tokens {a.tokens_used} ${a.cost_usd} "
                f"{(a.error or '')[:100]!r}"
                for a in TaskAttempt.objects.filter(execution=task).order_by("attempt_number")
            ]
            if not (last_events and task.is_terminal):
                lines += [f"    {text}" for text in events_of(task.pk)]
    return lines
