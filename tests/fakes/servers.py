"""Local HTTP servers that speak the protocols of what lies outside the project: a seed 004
agent service, an OpenAI-compatible chat-completions API and the Anthropic messages API.

Each listens on 127.0.0.1 (or the `host` given, such as ::1) on an ephemeral port (or the
`port` given) in a thread, checks the requests it gets the way the real service would (path,
headers, body), records them, and answers with real-shaped bodies. `script(...)` queues answers for the next
requests (failures, delays, Retry-After); once the queue is empty the server answers normally.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    """A scripted answer. `body` is sent as JSON unless it is bytes; with `body` None the
    server's normal answer is sent (after `delay`, with the extra `headers`)."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    raw: bytes


class FakeServer:
    """Base: a threaded server, a script of answers, a record of requests."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.requests: list[Recorded] = []
        self._script: deque[Reply] = deque()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                server._handle(self)

            def do_GET(self) -> None:
                server._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server_class = ThreadingHTTPServer
        if ":" in host:
            server_class = type("IPv6Server", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
        self._httpd = server_class((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """The server's origin: http, its host and port."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> FakeServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def script(self, *replies: Reply) -> None:
        with self._lock:
            self._script.extend(replies)

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        request = Recorded(
            method=handler.command,
            path=handler.path,
            headers={k.lower(): v for k, v in handler.headers.items()},
            body=body,
            raw=raw,
        )
        with self._lock:
            self.requests.append(request)
            scripted = self._script.popleft() if self._script else None
        reply = scripted or Reply()
        if reply.delay:
            time.sleep(reply.delay)
        if reply.body is None and reply.status == 200:
            status, payload = self.answer(request)
        else:
            status, payload = reply.status, reply.body
        content = payload if isinstance(payload, bytes) else json.dumps(payload if payload is not None else {}).encode()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(content)))
            for name, value in reply.headers.items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(content)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test)

    def answer(self, request: Recorded) -> tuple[int, Any]:
        raise NotImplementedError


class AgentService(FakeServer):
    """A seed 004 agent service: takes a task (§3.1 plus context), answers with §3.2's
    result shape."""

    def __init__(self, *, model: str = "claude-3-5-sonnet-20241022", tokens_used: int = 1523) -> None:
        super().__init__()
        self.model = model
        self.tokens_used = tokens_used

    def answer(self, request: Recorded) -> tuple[int, Any]:
        if request.method != "POST" or "json" not in request.headers.get("content-type", ""):
            return 415, {"error": "POST a JSON task"}
        details = (request.body or {}).get("task_details")
        if not isinstance(details, dict) or "task_description" not in details:
            return 400, {"error": "task_details.task_description is required"}
        return 200, {
            "result": f"Done: {details['task_description']}",
            "metadata": {
                "agent_id": request.body.get("agent_id"),
                "model": self.model,
                "tokens_used": self.tokens_used,
            },
            "processing_time_ms": 12.5,
        }


def _openai_error(message: str, kind: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class OpenAIServer(FakeServer):
    """An OpenAI-compatible server: POST /v1/chat/completions with a Bearer key (base URL
    `{url}/v1`). Answers a chat.completion object with usage; with `tool_call` set and tools
    in the request, answers a call of the first tool instead of text. As OpenAI's, its usage
    details the prompt tokens its cache served (`cached_tokens`, part of prompt_tokens) and
    the reasoning tokens (`reasoning_tokens`, part of completion_tokens)."""

    def __init__(
        self,
        *,
        api_key: str | None = "sk-test",
        prompt_tokens: int = 1200,
        completion_tokens: int = 350,
        cached_tokens: int = 0,
        reasoning_tokens: int = 0,
        model_suffix: str = "",
        tool_call: dict[str, Any] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(host=host, port=port)
        self.api_key = api_key
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.cached_tokens = cached_tokens
        self.reasoning_tokens = reasoning_tokens
        self.model_suffix = model_suffix
        self.tool_call = tool_call

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def answer(self, request: Recorded) -> tuple[int, Any]:
        if request.method != "POST" or request.path != "/v1/chat/completions":
            return 404, _openai_error(f"Invalid URL ({request.method} {request.path})", "invalid_request_error")
        if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
            given = request.headers.get("authorization", "").removeprefix("Bearer ")
            # The real API quotes the key it was given, as this does.
            return 401, _openai_error(
                f"Incorrect API key provided: {given}.", "invalid_request_error", "invalid_api_key"
            )
        body = request.body
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return 400, _openai_error("you must provide a model parameter", "invalid_request_error")
        if body.get("max_tokens") is not None and re.match(r"(ft:)?(o[1-9]|gpt-5)", body["model"]):
            # OpenAI's reasoning models take max_completion_tokens only, fine-tuned ones too.
            return 400, _openai_error(
                "Unsupported parameter: 'max_tokens' is not supported with this model. "
                "Use 'max_completion_tokens' instead.",
                "invalid_request_error",
                "unsupported_parameter",
            )
        messages = body.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or any(m.get("role") not in ("system", "user", "assistant", "tool") for m in messages)
        ):
            return 400, _openai_error("'messages' must be a non-empty list of role messages", "invalid_request_error")
        called = {c["id"] for m in messages if m.get("role") == "assistant" for c in m.get("tool_calls") or []}
        for m in messages:
            if m.get("role") == "tool" and m.get("tool_call_id") not in called:
                return 400, _openai_error(
                    "messages with role 'tool' must be a response to a preceeding message with 'tool_calls'.",
                    "invalid_request_error",
                )
        message: dict[str, Any] = {"role": "assistant", "content": f"echo: {(messages[-1]['content'] or '')[:80]}"}
        finish_reason = "stop"
        # Like a model: it calls a tool, then answers from the tool's result.
        if self.tool_call and body.get("tools") and messages[-1]["role"] != "tool":
            name = body["tools"][0]["function"]["name"]
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_abc123",
                        "type": "function",
                        "function": {"name": name, "arguments": json.dumps(self.tool_call)},
                    }
                ],
            }
            finish_reason = "tool_calls"
        return 200, {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"] + self.model_suffix,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens, "audio_tokens": 0},
                "completion_tokens_details": {
                    "reasoning_tokens": self.reasoning_tokens,
                    "audio_tokens": 0,
                    "accepted_prediction_tokens": 0,
                    "rejected_prediction_tokens": 0,
                },
            },
            "system_fingerprint": "fp_test",
        }


def _anthropic_error(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


class AnthropicServer(FakeServer):
    """The Anthropic messages API: POST /v1/messages with x-api-key and anthropic-version.
    As Anthropic's, its usage reports the prompt tokens written to its cache
    (`cache_write_tokens` to the 5-minute cache, `cache_write_1h_tokens` to the 1-hour one,
    summed in cache_creation_input_tokens and told apart in cache_creation) and read from it
    (`cache_read_tokens`) beside input_tokens, which leaves them out."""

    def __init__(
        self,
        *,
        api_key: str = "sk-ant-test",
        input_tokens: int = 2000,
        output_tokens: int = 500,
        cache_write_tokens: int = 0,
        cache_write_1h_tokens: int = 0,
        cache_read_tokens: int = 0,
        tool_call: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.api_key = api_key
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.cache_write_tokens = cache_write_tokens
        self.cache_write_1h_tokens = cache_write_1h_tokens
        self.cache_read_tokens = cache_read_tokens
        self.tool_call = tool_call

    def answer(self, request: Recorded) -> tuple[int, Any]:
        if request.method != "POST" or request.path != "/v1/messages":
            return 404, _anthropic_error("not_found_error", f"Not found: {request.path}")
        if request.headers.get("x-api-key") != self.api_key:
            return 401, _anthropic_error("authentication_error", "invalid x-api-key")
        if request.headers.get("anthropic-version") != "2023-06-01":
            return 400, _anthropic_error("invalid_request_error", "anthropic-version header is required")
        body = request.body
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return 400, _anthropic_error("invalid_request_error", "model: Field required")
        if not isinstance(body.get("max_tokens"), int):
            return 400, _anthropic_error("invalid_request_error", "max_tokens: Field required")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or messages[0].get("role") != "user":
            return 400, _anthropic_error("invalid_request_error", "messages: first message must use the user role")
        if "system" in body and not isinstance(body["system"], str | list):
            return 400, _anthropic_error("invalid_request_error", "system: must be a string")
        used: set[str] = set()
        for m in messages:
            blocks = m.get("content") if isinstance(m.get("content"), list) else []
            for block in blocks:
                if block.get("type") == "tool_use":
                    used.add(block.get("id"))
                if block.get("type") == "tool_result" and block.get("tool_use_id") not in used:
                    return 400, _anthropic_error(
                        "invalid_request_error", "tool_result block(s) provided without a matching tool_use block"
                    )
        last = messages[-1].get("content")
        answering_tool = isinstance(last, list) and any(b.get("type") == "tool_result" for b in last)
        content: list[dict[str, Any]] = [{"type": "text", "text": "Hello from "}, {"type": "text", "text": "Claude."}]
        stop_reason = "end_turn"
        if answering_tool:
            result = next(b for b in last if b.get("type") == "tool_result")
            content = [{"type": "text", "text": f"The tool said {result.get('content')}"}]
        elif self.tool_call and body.get("tools"):
            content = [
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_01abc", "name": body["tools"][0]["name"], "input": self.tool_call},
            ]
            stop_reason = "tool_use"
        return 200, {
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {
                "input_tokens": self.input_tokens,
                "cache_creation_input_tokens": self.cache_write_tokens + self.cache_write_1h_tokens,
                "cache_read_input_tokens": self.cache_read_tokens,
                "cache_creation": {
                    "ephemeral_5m_input_tokens": self.cache_write_tokens,
                    "ephemeral_1h_input_tokens": self.cache_write_1h_tokens,
                },
                "output_tokens": self.output_tokens,
                "service_tier": "standard",
            },
        }


@dataclass
class LinePoint:
    measurement: str
    tags: dict[str, str]
    fields: dict[str, Any]
    timestamp: int | None


def _split_unescaped(text: str, separator: str, *, quotes: bool = False) -> list[str]:
    """Split on `separator` where it is not backslash-escaped (nor, with quotes, inside a
    double-quoted string); escapes are kept for the caller."""
    parts, current, escaped, quoted = [], [], False, False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            current.append(char)
            escaped = True
        elif quotes and char == '"':
            current.append(char)
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if quoted:
        raise ValueError("unterminated string field value")
    parts.append("".join(current))
    return parts


def _unescape(text: str) -> str:
    out, escaped = [], False
    for char in text:
        if escaped:
            out.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        else:
            out.append(char)
    return "".join(out)


def _field_value(raw: str) -> Any:
    if raw.startswith('"'):
        if len(raw) < 2 or not raw.endswith('"'):
            raise ValueError(f"bad string field value {raw!r}")
        return _unescape(raw[1:-1])
    if raw in ("t", "T", "true", "True", "TRUE"):
        return True
    if raw in ("f", "F", "false", "False", "FALSE"):
        return False
    if raw.endswith("i"):
        return int(raw[:-1])
    if raw.endswith("u"):
        return int(raw[:-1])
    return float(raw)


def parse_line_protocol(text: str) -> list[LinePoint]:
    """InfluxDB line protocol, strictly: `measurement[,tag=value...] field=value[,...] [timestamp]`.
    Raises ValueError naming the problem."""
    points = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        sections = _split_unescaped(line, " ", quotes=True)
        if len(sections) not in (2, 3):
            raise ValueError(f"line {number}: expected measurement, fields and an optional timestamp: {line!r}")
        series = _split_unescaped(sections[0], ",")
        measurement = _unescape(series[0])
        if not measurement:
            raise ValueError(f"line {number}: missing measurement")
        tags = {}
        for pair in series[1:]:
            key_value = _split_unescaped(pair, "=")
            if len(key_value) != 2 or not key_value[0] or not key_value[1]:
                raise ValueError(f"line {number}: bad tag {pair!r}")
            tags[_unescape(key_value[0])] = _unescape(key_value[1])
        fields = {}
        for pair in _split_unescaped(sections[1], ",", quotes=True):
            key_value = _split_unescaped(pair, "=", quotes=True)
            if len(key_value) != 2 or not key_value[0]:
                raise ValueError(f"line {number}: bad field {pair!r}")
            fields[_unescape(key_value[0])] = _field_value(key_value[1])
        if not fields:
            raise ValueError(f"line {number}: a point needs at least one field")
        timestamp = int(sections[2]) if len(sections) == 3 else None
        points.append(LinePoint(measurement=measurement, tags=tags, fields=fields, timestamp=timestamp))
    return points


class InfluxDBServer(FakeServer):
    """InfluxDB v2's write endpoint: POST /api/v2/write?org=&bucket=&precision= with
    `Authorization: Token <token>` and a line-protocol body (gzip allowed). Parses every line
    (a malformed one fails the whole request with 400, as InfluxDB does), keeps the points and
    answers 204.

    `stored` is what InfluxDB keeps of them: one point per measurement, tag set and timestamp
    (in nanoseconds, whatever the request's precision); a point written again with the same
    three replaces the fields it names ("duplicate points", InfluxDB's documentation)."""

    def __init__(self, *, token: str, org: str = "agentledger", bucket: str = "tasks") -> None:
        super().__init__()
        self.token = token
        self.org = org
        self.bucket = bucket
        self.points: list[LinePoint] = []
        self.precisions: list[str] = []
        self.stored: dict[tuple[str, frozenset[tuple[str, str]], int], dict[str, Any]] = {}

    def answer(self, request: Recorded) -> tuple[int, Any]:
        import gzip
        from urllib.parse import parse_qs, urlsplit

        url = urlsplit(request.path)
        if request.method != "POST" or url.path != "/api/v2/write":
            return 404, {"code": "not found", "message": "path not found"}
        if request.headers.get("authorization") != f"Token {self.token}":
            return 401, {"code": "unauthorized", "message": "unauthorized access"}
        query = {key: values[0] for key, values in parse_qs(url.query).items()}
        if query.get("org") != self.org:
            return 404, {"code": "not found", "message": f'organization name "{query.get("org")}" not found'}
        if query.get("bucket") != self.bucket:
            return 404, {"code": "not found", "message": f'bucket "{query.get("bucket")}" not found'}
        precision = query.get("precision", "ns")
        if precision not in ("ns", "us", "ms", "s"):
            return 400, {"code": "invalid", "message": f"invalid precision {precision!r}"}
        raw = request.raw
        if request.headers.get("content-encoding") == "gzip":
            raw = gzip.decompress(raw)
        try:
            points = parse_line_protocol(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            return 400, {"code": "invalid", "message": f"unable to parse points: {exc}"}
        scale = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000}[precision]
        received_ns = time.time_ns()
        with self._lock:
            self.points.extend(points)
            self.precisions.append(precision)
            for point in points:
                at = point.timestamp * scale if point.timestamp is not None else received_ns
                key = (point.measurement, frozenset(point.tags.items()), at)
                self.stored.setdefault(key, {}).update(point.fields)
        return 204, b""


class RawServer:
    """A server that reads one HTTP/1.1 request per connection and hands the socket to
    `respond`, which writes whatever bytes it likes, when it likes (a trickle, a reset): for
    what a well-behaved http.server cannot send."""

    def __init__(self, respond: Any) -> None:
        self.respond = respond
        self.requests: list[bytes] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            while len(body) < length:
                body += conn.recv(65536)
            self.requests.append(head + b"\r\n\r\n" + body)
            with contextlib.suppress(OSError):  # the client gave up
                self.respond(conn)

    def __enter__(self) -> RawServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed.set()
        self._sock.close()
