"""A try's outcome whose COMMIT reached PostgreSQL and whose answer never came back (the
connection went in between), on a real worker whose database connections pass through a local
TCP proxy that drops that answer: the write, tried again on a new connection, finds the attempt
recorded as it wrote it (_result_record_through_lost_connection). What that commit was to send
(the task's retry) is sent then, not left to the dispatch sweep."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import pytest

from orchestration.models import Agent, TaskAttempt, TaskExecution, Workflow
from orchestration.services.workflows import workflow_submit
from tests.engine import database_url, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

COMMIT = b"Q\x00\x00\x00\x0bCOMMIT\x00"  # the simple query psycopg sends to commit
COMMITTED = b"C\x00\x00\x00\x0bCOMMIT\x00"  # PostgreSQL's CommandComplete for it


class CommitAnswerDropper:
    """A TCP proxy to PostgreSQL (no TLS: the test server has none). Once `arm()`ed, the first
    connection that sends `marker` (a statement of the write) and then COMMIT has that COMMIT
    forwarded, and, once PostgreSQL answers it, both of its sockets closed without the answer:
    the transaction is committed and the client sees a lost connection."""

    def __init__(self, marker: bytes, upstream: tuple[str, int]) -> None:
        self.marker = marker
        self.upstream = upstream
        self.armed = threading.Event()
        self.dropped = threading.Event()
        self.sockets: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self) -> None:
        self.armed.set()

    def close(self) -> None:
        self._closed(self.listener, *self.sockets)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self.sockets += [client, server]
            state = {"marked": False, "drop": False}
            threading.Thread(target=self._up, args=(client, server, state), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, state), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, state: dict) -> None:
        seen = b""
        try:
            while data := client.recv(65536):
                seen = (seen + data)[-4096:]
                if self.armed.is_set() and not self.dropped.is_set():
                    state["marked"] = state["marked"] or self.marker in seen
                    if state["marked"] and COMMIT in seen:
                        state["drop"] = True
                        self.armed.clear()
                server.sendall(data)
        except OSError:
            pass

    def _down(self, server: socket.socket, client: socket.socket, state: dict) -> None:
        seen = b""
        try:
            while data := server.recv(65536):
                if state["drop"]:
                    seen = (seen + data)[-4096:]
                    if COMMITTED in seen:
                        self.dropped.set()
                        break
                    continue
                client.sendall(data)
        except OSError:
            pass
        self._closed(client, server)

    @staticmethod
    def _closed(*sockets: socket.socket) -> None:
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@pytest.fixture
def dropper():
    from django.db import connection

    s = connection.settings_dict
    proxy = CommitAnswerDropper(b'"error_class"', (s["HOST"] or "127.0.0.1", int(s["PORT"] or 5432)))
    yield proxy
    proxy.close()


def test_a_retryable_failure_whose_commit_answer_was_lost_sends_its_retry_at_once(engine, dropper, tmp_path: Path):
    """The try fails with a retryable error; the COMMIT of its record lands, its answer is lost.
    Written again on a new connection, the record finds the attempt failed as it wrote it (its
    own). The retry that COMMIT scheduled was sent by its after-commit callback, which never
    ran: the task waited, retrying, for the dispatch sweep (past DISPATCH_SWEEP_AFTER_SECONDS,
    60 s by default, after its backoff) to send it, while idle workers waited for work."""
    Agent.objects.create(
        id="held-flaky",
        name="Held flaky",
        executor=Agent.Executor.PYTHON,
        entrypoint="tests.orchestration.edge_agents.held_then_retryable",
    )
    release = tmp_path / "release"
    url = database_url().replace(f":{dropper.upstream[1]}/", f":{dropper.port}/")
    engine(env={"DATABASE_URL": url})
    workflow, _ = workflow_submit(
        spec={
            "name": "lost answer",
            "tasks": [{"name": "t", "agent": "held-flaky", "input": {"release": str(release)}, "max_retries": 2}],
        }
    )
    task = TaskExecution.objects.get(workflow=workflow)
    wait_for(
        lambda: TaskAttempt.objects.filter(execution=task, status=TaskAttempt.Status.RUNNING).exists(),
        what="the first try to run",
    )
    dropper.arm()
    release.touch()
    assert dropper.dropped.wait(30), "the COMMIT's answer was not dropped"
    first = wait_for(
        lambda: TaskAttempt.objects.filter(execution=task, attempt_number=1, status="failed").first(),
        what="the first try to be recorded failed",
    )
    assert (first.cause, first.retryable) == ("error", True)
    ended = time.monotonic()
    # The backoff is under 2 s (TASK_RETRY_BACKOFF_MAX_SECONDS in the tests); no beat runs here.
    wf = wait_for(
        lambda: (w := Workflow.objects.get(pk=workflow.pk)).is_terminal and w,
        timeout=20,
        what="the retry to run and complete the workflow",
    )
    assert wf.status == Workflow.Status.COMPLETED
    assert time.monotonic() - ended < 20
    assert [(a.attempt_number, a.status) for a in TaskAttempt.objects.filter(execution=task)] == [
        (1, "failed"),
        (2, "succeeded"),
    ]
