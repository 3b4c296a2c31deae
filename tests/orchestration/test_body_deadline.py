"""The body deadline of the http executor starts when the answer's headers arrive: the wait
for them is bounded per read, as it was, and a server that answers late (a model's whole
generation before its headers) still has its connect + read timeout for the body."""

from __future__ import annotations

import socket
import time

import pytest

from orchestration.errors import RetryableError
from orchestration.runtime.executors import agent_execute
from tests.fakes.servers import RawServer
from tests.orchestration.test_executors import ctx, http_agent

BODY = b'{"result": "' + b"x" * 30 + b'"}'


@pytest.fixture
def local_net(settings):
    settings.AGENT_HTTP_ALLOW_PRIVATE = True
    settings.AGENT_HTTP_ALLOWED_HOSTS = ["127.0.0.1"]
    settings.AGENT_HTTP_READ_TIMEOUT_SECONDS = 2
    settings.AGENT_HTTP_CONNECT_TIMEOUT_SECONDS = 1
    return settings


def _late_headers_then_steady_body(conn: socket.socket) -> None:
    time.sleep(1.7)  # within the 2 s read timeout
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY))
    for start in range(0, len(BODY), 15):  # 3 chunks, 0.6 s apart: the body takes 1.2 s
        time.sleep(0.6)
        conn.sendall(BODY[start : start + 15])


def test_an_answer_whose_headers_come_late_still_has_the_deadline_for_its_body(local_net):
    with RawServer(_late_headers_then_steady_body) as server:
        result = agent_execute(agent=http_agent(server.url), task_input={}, context=ctx())
    assert result.output == {"result": "x" * 30}


def _large_steady(conn: socket.socket) -> None:
    body = b'{"result": "' + b"x" * (10 * 1024 * 1024 - 100) + b'"}'
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
    for start in range(0, len(body), 64 * 1024):
        conn.sendall(body[start : start + 64 * 1024])


def test_a_large_body_sent_steadily_is_read_whole(local_net):
    with RawServer(_large_steady) as server:
        result = agent_execute(agent=http_agent(server.url), task_input={}, context=ctx())
    assert len(result.output["result"]) == 10 * 1024 * 1024 - 100


def _headers_trickled(conn: socket.socket) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Pad: " + b"a" * 100 + b"\r\n\r\n"
    for byte in head:  # each read comes well within the read timeout; the whole takes 40 s
        conn.sendall(bytes([byte]))
        time.sleep(0.25)


def _continue_after_continue(conn: socket.socket) -> None:
    for _ in range(40):  # each a whole answer, within the read timeout: 40 s of them
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        time.sleep(1)


@pytest.mark.parametrize("respond", [_headers_trickled, _continue_after_continue], ids=["trickled", "100-continue"])
def test_an_answer_whose_headers_never_end_is_cut_off_near_the_read_timeout(local_net, respond):
    # Bounded per read only, it held the attempt until the task's time limit (20 s on a worker
    # with these settings, the attempt recorded a soft time-out instead of a retryable failure).
    with RawServer(respond) as server:
        started = time.monotonic()
        with pytest.raises(RetryableError, match="timed out"):
            agent_execute(agent=http_agent(server.url), task_input={}, context=ctx())
    assert time.monotonic() - started < 5  # cut at about 2 s, the read timeout
