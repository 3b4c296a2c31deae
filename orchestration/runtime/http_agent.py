"""The `http` executor (seed 004's agent services) and the one outbound HTTP path that both
network executors use.

Every try is exactly one request of ours: no client-side retries, no redirects, no proxies
from the environment, a connect and a read timeout on every call, and a cap on the size of
the answer. The engine decides about retrying from the error class raised here.
"""

from __future__ import annotations

import email.utils
import json
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.conf import settings

from orchestration.errors import AgentError, PermanentError, RetryableError
from orchestration.models import Agent
from orchestration.runtime import pricing
from orchestration.runtime.context import AgentResult, TaskContext, Usage
from orchestration.runtime.tools import json_loads_strict
from orchestration.runtime.urlpolicy import Target, url_check

if TYPE_CHECKING:
    import httpx

USER_AGENT = "agentledger/0.1"
SNIPPET_CHARS = 300
ERROR_BODY_BYTES = 64 * 1024
"""Of a non-2xx answer only this much is read (for the error's snippet): its size is no reason
to change how the error is classified."""


@dataclass(frozen=True)
class Reply:
    """An HTTP answer, read in full (up to the size cap)."""

    url: str
    status: int
    headers: httpx.Headers
    content: bytes

    def snippet(self, redact: Iterable[str] = ()) -> str:
        """The start of the body, on one line, with the `redact` values masked: before it is
        cut, or a value quoted across the cut would keep its first characters."""
        text = " ".join(self.content.decode("utf-8", errors="replace").split())
        for secret in redact:
            if secret:
                text = text.replace(secret, "[redacted]")
        return text[:SNIPPET_CHARS]

    def json(self) -> Any:
        """The body as JSON (NaN and Infinity refused: they are not JSON, nor is nesting too
        deep to parse); ValueError if not.

        Its encoding is told as json.loads tells a body's, which is what the providers' SDKs
        read (httpx's Response.json()): a UTF-8 byte order mark, which some proxies put before
        an answer, is skipped (RFC 8259 §8.1 lets a parser ignore it), and UTF-16 and UTF-32
        are read. Decoded strictly: an unpaired surrogate is refused here, not stored."""
        return json_loads_strict(self.content.decode(json.detect_encoding(self.content)))


def retry_after_seconds(headers: httpx.Headers) -> float | None:
    """Seconds to wait from `retry-after-ms` (OpenAI) or `Retry-After` (seconds or HTTP date)."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(float(millis) / 1000, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def status_error(reply: Reply, *, what: str, redact: Iterable[str] = ()) -> AgentError | None:
    """The error for a non-2xx answer (None for 2xx): 408, 429 and 5xx are retryable (with the
    server's Retry-After), redirects and other 4xx are permanent."""
    if 200 <= reply.status < 300:
        return None
    if 300 <= reply.status < 400:
        location = reply.headers.get("location", "?")
        return PermanentError(f"{what} answered HTTP {reply.status} (redirect to {location}; not followed)")
    message = f"{what} answered HTTP {reply.status}: {reply.snippet(redact)}"
    if reply.status in (408, 429) or reply.status >= 500:
        return RetryableError(message, retry_after=retry_after_seconds(reply.headers))
    return PermanentError(message)


def post_json(
    target: Target,
    payload: dict[str, Any],
    *,
    headers: dict[str, str],
    connect_timeout: float,
    read_timeout: float,
    what: str,
) -> Reply:
    """POST `payload` as JSON to a checked target, connecting to its checked addresses in
    turn (the Host header and TLS SNI carry the name). Transport failures and timeouts raise
    RetryableError; an answer over AGENT_HTTP_MAX_RESPONSE_BYTES raises PermanentError.

    `read_timeout` bounds each read, the wait for the whole status line and headers, and, with
    the connect timeout, the whole body: httpx's read timeout is per read, so a server sending
    a byte now and then (or a `100 Continue` after another) would otherwise hold the attempt
    until the task's time limit."""
    body = json.dumps(payload, allow_nan=False).encode()
    request_headers = {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "Accept-Encoding": "gzip, deflate",
        "User-Agent": USER_AGENT,
        **headers,
        "Host": target.url.netloc.decode("ascii"),
    }
    extensions = {"sni_hostname": target.hostname} if target.url.scheme == "https" else {}
    # Imported on the first request, not with this module: every Django process loads the
    # module (through the agent registry) and httpx brings in about 15 MB (with rich and
    # pygments for its command line), which the web, the exporter and the consumer never use.
    import httpcore
    import httpx

    timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
    ssl_context = httpx.create_ssl_context(trust_env=False)
    limit = settings.AGENT_HTTP_MAX_RESPONSE_BYTES
    last_connect_error: Exception | None = None
    for address in target.addresses:
        url = target.url.copy_with(host=address)
        reads = _BoundedReads(first=read_timeout)
        transport = httpx.HTTPTransport(verify=ssl_context, trust_env=False)
        # httpx takes no network backend: its pool, made as it makes it, with ours.
        transport._pool = httpcore.ConnectionPool(ssl_context=ssl_context, network_backend=reads)
        try:
            with (
                httpx.Client(transport=transport, timeout=timeout, follow_redirects=False, trust_env=False) as client,
                client.stream("POST", url, content=body, headers=request_headers, extensions=extensions) as response,
            ):
                # From the headers' arrival: a server answering late (a model's whole generation
                # first) keeps its time for the body.
                deadline = time.monotonic() + connect_timeout + read_timeout
                reads.deadline = deadline
                content = _read_body(response, limit=limit, what=what, deadline=deadline)
                return Reply(
                    url=str(target.url), status=response.status_code, headers=response.headers, content=content
                )
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            last_connect_error = exc  # try the next address of the host
        except httpx.TimeoutException as exc:
            raise RetryableError(f"{what}: timed out ({type(exc).__name__}, read timeout {read_timeout:g} s)") from None
        except httpx.TransportError as exc:
            raise RetryableError(f"{what}: {type(exc).__name__}: {exc}") from None
    raise RetryableError(
        f"{what}: cannot connect to {target.hostname} ({', '.join(target.addresses)}): "
        f"{type(last_connect_error).__name__}: {last_connect_error}"
    )


class _BoundedReads:
    """A network backend (httpcore's, wrapped) whose connections' reads end by `deadline`
    (time.monotonic()), which starts `first` seconds after the first read, the wait for the
    answer's status line and headers, and the caller moves once they have arrived."""

    def __init__(self, *, first: float) -> None:
        import httpcore

        self._backend = httpcore.SyncBackend()
        self._first = first
        self.deadline: float | None = None

    def connect_tcp(self, *args: Any, **kwargs: Any) -> _BoundedStream:
        return _BoundedStream(self._backend.connect_tcp(*args, **kwargs), self)

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)

    def read_timeout(self, timeout: float | None) -> float | None:
        """`timeout` cut to what is left before the deadline; httpcore's ReadTimeout past it."""
        import httpcore

        now = time.monotonic()
        if self.deadline is None:
            self.deadline = now + self._first
        if (left := self.deadline - now) <= 0:
            raise httpcore.ReadTimeout("the answer took longer than its deadline")
        return left if timeout is None else min(timeout, left)


class _BoundedStream:
    """A connection's stream whose reads end by its backend's deadline."""

    def __init__(self, stream: Any, reads: _BoundedReads) -> None:
        self._stream = stream
        self._reads = reads

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, self._reads.read_timeout(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, timeout)

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, *args: Any, **kwargs: Any) -> _BoundedStream:
        return _BoundedStream(self._stream.start_tls(*args, **kwargs), self._reads)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


def _read_body(response: httpx.Response, *, limit: int, what: str, deadline: float) -> bytes:
    """The answer's body, decoded, never holding more than `limit` decoded bytes (+1) in
    memory: a compressed body is inflated here chunk by chunk with a bound on each step
    (httpx would inflate each received chunk whole, and nest encodings, before any size
    check). A 2xx answer over the limit, or in an encoding that cannot be decoded, is an
    error; of any other only the first ERROR_BODY_BYTES are kept (as they came, if they cannot
    be decoded). Past `deadline` (time.monotonic()) it raises httpx.ReadTimeout."""
    import httpx

    success = 200 <= response.status_code < 300
    cap = limit if success else min(limit, ERROR_BODY_BYTES)
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity"):
        decoder = None
    elif encoding in ("gzip", "x-gzip", "deflate"):
        decoder = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib header, detected
    elif success:
        raise PermanentError(f"{what}: answered with Content-Encoding {encoding!r}; only gzip or deflate is accepted")
    else:
        # An error answer is classified by its status, its body only quoted: a 503 or a 429 a
        # proxy sent compressed some other way (or mislabelled) failed the task for good.
        decoder = None
    content = bytearray()
    received = False
    # The bytes given to the decoder until it has the two that its header check reads (None
    # after): a first read of one byte is taken without an error, bare deflate or not.
    head: bytes | None = b""
    for raw in response.iter_raw():
        if time.monotonic() > deadline:
            raise httpx.ReadTimeout("the answer took longer than its deadline")
        received = received or bool(raw)
        data = raw
        while data:
            if decoder is None:
                content.extend(data)
                data = b""
            else:
                try:
                    content.extend(decoder.decompress(data, cap + 1 - len(content)))
                except zlib.error as exc:
                    if encoding == "deflate" and head is not None:
                        # `deflate` is the zlib format (RFC 9110), but some servers send the bare
                        # stream, which httpx, urllib3 and browsers read: a paid result failed
                        # for good. Read again from its first byte.
                        decoder, data, head = zlib.decompressobj(-zlib.MAX_WBITS), head + data, None
                        continue
                    if success:
                        raise PermanentError(f"{what}: the answer is not valid {encoding} ({exc})") from None
                    decoder = None  # an error answer's body, quoted as it came (above)
                    continue
                if head is not None:
                    head = head + data if len(head) + len(data) < 2 else None
                data = decoder.unconsumed_tail
            if len(content) > cap:
                if success:
                    raise PermanentError(f"{what}: the answer exceeds AGENT_HTTP_MAX_RESPONSE_BYTES ({limit})")
                return bytes(content[:cap])
    if success and decoder is not None and received and not decoder.eof:
        # A body without Content-Length ends when the connection closes: cut there, only the
        # compressed stream's own end tells it is incomplete (read as a whole, it would be
        # taken for a malformed answer and failed for good instead of retried). No body at all
        # (a 204, Content-Length: 0, with the header a proxy adds to any answer) was not cut.
        raise httpx.RemoteProtocolError(f"the {encoding} answer ended before its compressed stream did")
    return bytes(content)


def read_timeout_for(setting: float, context: TaskContext) -> float:
    """A read timeout never longer than the task's own timeout."""
    return float(min(setting, context.timeout_seconds))


def task_payload(task_input: dict[str, Any], context: TaskContext) -> dict[str, Any]:
    """Seed 004 §3.1's task shape, with the execution's identity and the upstream outputs."""
    description = task_input.get("description")
    return {
        "agent_id": context.agent_id,
        "task_details": {
            "task_description": description if isinstance(description, str) else "",
            "context": task_input,
        },
        "execution_id": context.execution_id,
        "workflow_id": context.workflow_id,
        "task_name": context.task_name,
        "attempt": context.attempt_number,
        "upstream": context.upstream,
    }


def _token_count(metadata: dict[str, Any], key: str, what: str) -> int:
    value = metadata.get(key, 0)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PermanentError(f"{what}: metadata.{key} must be a non-negative integer, got {value!r}")
    return value


def usage_from_result(body: dict[str, Any], *, default_model: str, what: str) -> Usage:
    """Usage from a seed 004 §3.2 result: metadata.input_tokens/output_tokens when given,
    else metadata.tokens_used counted as output; priced by metadata.model when the price table
    knows it, else by the agent's model."""
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise PermanentError(f"{what}: metadata must be an object, got {type(metadata).__name__}")
    if "input_tokens" in metadata or "output_tokens" in metadata:
        input_tokens = _token_count(metadata, "input_tokens", what)
        output_tokens = _token_count(metadata, "output_tokens", what)
    else:
        input_tokens, output_tokens = 0, _token_count(metadata, "tokens_used", what)
    model = metadata.get("model") if isinstance(metadata.get("model"), str) else ""
    # As the llm executor does: a model name the table does not list (a dated snapshot, say)
    # is priced as the agent's model, not recorded at cost 0.
    priced = model if pricing.is_priced(model) else default_model or model
    cost = pricing.cost_usd(priced or None, input_tokens, output_tokens)
    return Usage(input_tokens=input_tokens, output_tokens=output_tokens, cost_usd=cost)


def with_usage(error: AgentError, usage: Usage) -> AgentError:
    """The error carrying what its try used, read by attempt_run as the try's spend."""
    if usage.tokens:
        error.usage = usage  # type: ignore[attr-defined]
    return error


def error_usage(reply: Reply, *, default_model: str, what: str) -> Usage:
    """What an error answer says its try used. Seed 004 defines no error answer; one whose body
    carries §3.2's `metadata` is read as a result's would be (the service's model may have been
    paid before it failed), as the llm executor reads a provider's error answer. A body that
    is not that shape, or whose counts are malformed, counts as none: the error stays the
    answer's status, not a complaint about its usage."""
    try:
        body = reply.json()
    except ValueError:
        return Usage()
    if not isinstance(body, dict) or not isinstance(body.get("metadata"), dict):
        return Usage()
    try:
        return usage_from_result(body, default_model=default_model, what=what)
    except PermanentError:
        return Usage()


def http_execute(*, agent: Agent, task_input: dict[str, Any], context: TaskContext) -> AgentResult:
    """POST the task to the agent's service and return its seed 004 §3.2 result as output."""
    if not agent.url:
        raise PermanentError(f"agent {agent.id!r} uses the http executor but has no url")
    what = f"agent service {agent.url}"
    target = url_check(agent.url)
    reply = post_json(
        target,
        task_payload(task_input, context),
        headers={},
        connect_timeout=settings.AGENT_HTTP_CONNECT_TIMEOUT_SECONDS,
        read_timeout=read_timeout_for(settings.AGENT_HTTP_READ_TIMEOUT_SECONDS, context),
        what=what,
    )
    if (error := status_error(reply, what=what)) is not None:
        usage = error_usage(reply, default_model=agent.model, what=what)
        context.paid(usage)
        raise with_usage(error, usage)
    try:
        body = reply.json()
    except ValueError as exc:
        raise PermanentError(f"{what} answered with a body that is not JSON ({exc}): {reply.snippet()}") from None
    if not isinstance(body, dict):
        raise PermanentError(f"{what} answered with JSON {type(body).__name__}; expected an object")
    usage = usage_from_result(body, default_model=agent.model, what=what)
    context.paid(usage)
    return AgentResult(output=body, usage=usage)
