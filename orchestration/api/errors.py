"""RFC 9457 problem details: the one error shape of the API.

Every error answer is `application/problem+json` with type, title, status, detail and
instance; every 400 adds `errors`, a list of {field, detail} (a workflow spec's problems as a
serializer's: the field's path, and the problem without it). Unexpected exceptions
are logged and answered 500 without any trace of the code.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import psycopg.errors
from django.conf import settings
from django.core.exceptions import (
    BadRequest,
    PermissionDenied,
    RequestDataTooBig,
    SuspiciousOperation,
    TooManyFieldsSent,
)
from django.db import DatabaseError
from django.http import Http404, HttpRequest, HttpResponse
from django.urls import is_valid_path
from django.utils.html import escape
from django.views import defaults
from rest_framework import exceptions
from rest_framework.response import Response
from rest_framework.views import exception_handler

from orchestration.api.exceptions import Conflict, RequestTooLarge, Unavailable
from orchestration.api.renderers import FastJSONRenderer
from orchestration.db import database_unreachable
from orchestration.errors import LISTED_PROBLEMS, SpecError, TransitionError, more_problems

logger = logging.getLogger(__name__)

API_PREFIX = "/api/"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
PROBLEM_CONTENT_TYPE = "application/problem+json"
# RFC 9457 allows any URI as the type; a URN names the kind without promising a page.
PROBLEM_TYPE_BASE = "urn:agentledger:problem:"

TITLES = {
    400: "Invalid request",
    401: "Not authenticated",
    403: "Permission denied",
    404: "Not found",
    405: "Method not allowed",
    406: "Not acceptable",
    409: "Conflict",
    410: "Gone",
    412: "Precondition failed",
    413: "Request body too large",
    415: "Unsupported media type",
    422: "Unprocessable request",
    429: "Too many requests",
    500: "Internal server error",
    503: "Service unavailable",
}

# "tasks[2] (fetch).depends_on: unknown task" -> "tasks[2].depends_on"; a value's path as the
# request's parser names it ("tasks[0].input.t[1]", "metadata (a key)") is kept whole.
_FIELD_RE = re.compile(
    r"^(?P<field>[A-Za-z_]\w*(?:\[\d+\])*(?: \([^)]*\))?(?:\.[A-Za-z_]\w*(?:\[\d+\])*)*(?: \(a key\))?)"
)


def problem_type(code: str) -> str:
    return PROBLEM_TYPE_BASE + code.replace("_", "-")


def problem(
    *, status_code: int, detail: str, code: str, instance: str, errors: list[dict[str, str]] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": problem_type(code),
        "title": TITLES.get(status_code, "Error"),
        "status": status_code,
        "detail": detail,
        "instance": instance,
    }
    if errors is None and status_code == 400:
        # Every 400 lists its problems, so that a client reads any of them one way: one that
        # names no field (a body that is not JSON) is listed under the empty field.
        errors = [{"field": "", "detail": detail}]
    if errors is not None:
        body["errors"] = errors
    return body


def spec_field(text: str) -> str:
    """The field a SpecError problem names (its leading path, without the task's name)."""
    match = _FIELD_RE.match(text)
    if not match:
        return ""
    field = match.group("field")
    return re.sub(r"^(tasks\[\d+\]) \((?!a key\)$)[^)]*\)", r"\1", field)


def spec_problem(text: str) -> dict[str, str]:
    """A SpecError problem as a validation error's {field, detail}: "tasks[2] (fetch).depends_on:
    unknown task 'x'" is {"field": "tasks[2].depends_on", "detail": "unknown task 'x'"}, and
    "tasks[1] (a).max_retries must be between 0 and 20, got 50" is {"field":
    "tasks[1].max_retries", "detail": "must be between 0 and 20, got 50"}: the detail says the
    field no more than a serializer's does. A problem that names no field keeps its whole text."""
    field = spec_field(text)
    match = _FIELD_RE.match(text)
    if match:
        for separator in (": ", " "):
            if text[match.end() :].startswith(separator):
                return {"field": field, "detail": text[match.end() + len(separator) :]}
    return {"field": field, "detail": text}


def _flatten(data: Any, prefix: str = "") -> list[dict[str, str]]:
    """DRF's nested ValidationError detail as a flat list of {field, detail}."""
    if isinstance(data, dict):
        items: list[dict[str, str]] = []
        for key, value in data.items():
            name = "" if key == "non_field_errors" else str(key)
            items.extend(_flatten(value, f"{prefix}.{name}" if prefix and name else prefix or name))
        return items
    if isinstance(data, list):
        if all(not isinstance(item, dict | list) for item in data):
            return [{"field": prefix, "detail": str(item)} for item in data]
        items = []
        for i, item in enumerate(data):
            items.extend(_flatten(item, f"{prefix}[{i}]"))
        return items
    return [{"field": prefix, "detail": str(data)}]


def _listed(errors: list[dict[str, str]]) -> list[dict[str, str]]:
    """The first LISTED_PROBLEMS errors, then one (naming no field) counting the rest: an
    answer is not to grow with however many problems a large body holds."""
    if len(errors) <= LISTED_PROBLEMS:
        return errors
    return [*errors[:LISTED_PROBLEMS], {"field": "", "detail": more_problems(len(errors) - LISTED_PROBLEMS)}]


def _code_of(exc: exceptions.APIException) -> str:
    codes = exc.get_codes()
    return codes if isinstance(codes, str) else exc.default_code


def problem_exception_handler(exc: Exception, context: dict[str, Any]) -> Response:
    """DRF's EXCEPTION_HANDLER: every error, expected or not, as a problem document."""
    request = context.get("request")
    instance = request.get_full_path() if request is not None else ""
    if request is not None:
        # A problem document is JSON whatever the client asked for: the browsable API would
        # render it as HTML under an application/problem+json Content-Type.
        request.accepted_renderer = FastJSONRenderer()
        request.accepted_media_type = PROBLEM_CONTENT_TYPE
    if isinstance(exc, SpecError):
        # The shape of a serializer's validation error: each problem under the field it names,
        # the field said once; `detail` lists the problems as written (with a task's name).
        errors = _listed([spec_problem(p) for p in exc.problems])
        return _respond(400, "; ".join(exc.listed), "validation_error", instance, errors)
    if isinstance(exc, TransitionError):
        exc = Conflict(str(exc))
    elif isinstance(exc, RequestDataTooBig):
        exc = RequestTooLarge(f"The request body exceeds the limit of {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes.")
    elif isinstance(exc, TooManyFieldsSent):
        # Django answers these 400 outside DRF; inside a view they reach this handler.
        exc = exceptions.ParseError(
            f"The request has more than {settings.DATA_UPLOAD_MAX_NUMBER_FIELDS} query or form parameters."
        )
    elif statement_cancelled(exc):
        # DATABASE_STATEMENT_TIMEOUT_SECONDS cut a statement short (or an operator cancelled
        # it), which the client should know, rather than a bare 500.
        logger.warning("a database statement was cancelled in %s: %s", instance, exc)
        exc = Unavailable(_cancelled_detail("GET" if request is None else request.method, api=True))
    elif database_unreachable(exc):
        logger.warning("the database could not be reached in %s: %s", instance, exc)
        exc = Unavailable(_unreachable_detail("GET" if request is None else request.method))
    elif isinstance(exc, SuspiciousOperation | BadRequest):
        logging.getLogger("django.security").warning("%s in %s: %s", type(exc).__name__, instance, exc)
        exc = exceptions.ParseError("The request is malformed.")
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()

    response = exception_handler(exc, context)
    if response is None:
        logger.exception("unhandled error in %s", instance, exc_info=exc)
        return _respond(500, "The server failed to handle this request.", "server_error", instance)

    assert isinstance(exc, exceptions.APIException)
    errors = None
    if isinstance(exc, exceptions.ValidationError):
        errors = _listed(_flatten(exc.detail))
        detail = "; ".join(f"{e['field']}: {e['detail']}" if e["field"] else e["detail"] for e in errors)
        code = "validation_error"
    else:
        detail = str(exc.detail)
        code = _code_of(exc)
    problem_response = _respond(response.status_code, detail, code, instance, errors)
    for header, value in response.headers.items():
        if header.lower() in ("retry-after", "www-authenticate", "allow"):
            problem_response[header] = value
    return problem_response


def _respond(status_code: int, detail: str, code: str, instance: str, errors: list | None = None) -> Response:
    return Response(
        problem(status_code=status_code, detail=detail, code=code, instance=instance, errors=errors),
        status=status_code,
        content_type=PROBLEM_CONTENT_TYPE,
    )


def json_response(data: Any, *, status: int = 200, content_type: str = "application/json") -> HttpResponse:
    """A JSON answer built outside DRF's views (a handler, a middleware, a probe), rendered as
    DRF's are: compact, by the same renderer."""
    return HttpResponse(FastJSONRenderer().render(data), status=status, content_type=content_type)


def _plain_problem(
    request: HttpRequest, status_code: int, detail: str, code: str, errors: list[dict[str, str]] | None = None
) -> HttpResponse:
    return json_response(
        problem(status_code=status_code, detail=detail, code=code, instance=request.get_full_path(), errors=errors),
        status=status_code,
        content_type=PROBLEM_CONTENT_TYPE,
    )


def statement_cancelled(exc: BaseException) -> bool:
    """PostgreSQL cancelled one of the request's statements (DATABASE_STATEMENT_TIMEOUT_SECONDS,
    or an operator's pg_cancel_backend)."""
    return isinstance(exc, DatabaseError) and isinstance(exc.__cause__, psycopg.errors.QueryCanceled)


def _unreachable_detail(method: str | None, *, api: bool = True) -> str:
    """What a request that lost the database was told: a read changed nothing; a write may have
    committed before the connection was lost (as for a cancelled statement)."""
    if method in SAFE_METHODS:
        return "The database is not answering (nothing was changed); try again shortly."
    if not api:
        return (
            "The database is not answering; what this form changed before the connection was lost may have been "
            "saved: look at the page again before sending the form again."
        )
    return (
        "The database is not answering; what this request changed before the connection was lost may have been "
        "saved: read the resource before sending it again (or send it again with the same Idempotency-Key)."
    )


def database_unreachable_response(request: HttpRequest, exc: BaseException) -> HttpResponse:
    """The 503 for a request, outside DRF's views (the console, a middleware), that lost the
    database or could not reach it: a problem document under /api/, a page elsewhere; a read
    is invited to try again."""
    logger.warning("the database could not be reached in %s: %s", request.path, exc)
    return _unavailable(request, _unreachable_detail(request.method, api=_is_api(request)))


def _is_api(request: HttpRequest) -> bool:
    return request.path.startswith(API_PREFIX)


def _cancelled_detail(method: str | None, *, api: bool) -> str:
    """What a request whose statement PostgreSQL cancelled was told. Only a read can promise
    that nothing was changed: a write may have committed a transaction of its own before the
    statement that was cancelled (a submission is stored, then read back for the answer; the
    console does not run every action in one transaction), and a client told "nothing was
    changed" would send it again."""
    if method in SAFE_METHODS:
        if api:
            return (
                "The database did not finish this request in time and it was cancelled (nothing was changed); "
                "narrow the filters or try again later."
            )
        return (
            "The database did not finish this page in time and it was cancelled (nothing was changed). "
            "Narrow the filters or the search, or try again later."
        )
    if api:
        return (
            "The database did not finish this request in time and it was cancelled; what it changed before "
            "that may have been saved: read the resource before sending it again (or send it again with the "
            "same Idempotency-Key)."
        )
    return (
        "The database did not finish this request in time and it was cancelled. What it changed before "
        "that may have been saved: look at the records before doing it again, on fewer of them."
    )


def statement_cancelled_response(request: HttpRequest, exc: BaseException) -> HttpResponse:
    """The 503 for a request, outside DRF's views, one of whose statements PostgreSQL
    cancelled (DRF's views answer through problem_exception_handler): a problem document
    under /api/, a page elsewhere. A read may be tried again; a write is not invited to."""
    logger.warning("a database statement was cancelled in %s: %s", request.path, exc)
    return _unavailable(request, _cancelled_detail(request.method, api=_is_api(request)))


def _unavailable(request: HttpRequest, detail: str) -> HttpResponse:
    """A 503 saying `detail`: a problem document under /api/, a page elsewhere; a read is
    invited to try again in a few seconds."""
    if _is_api(request):
        response: HttpResponse = _plain_problem(request, 503, detail, "unavailable")
    else:
        response = HttpResponse(
            "<!doctype html>\n<title>Service unavailable (503)</title>\n<h1>Service unavailable (503)</h1>\n"
            f"<p>{escape(detail)}</p>\n",
            status=503,
        )
    if request.method in SAFE_METHODS:
        response["Retry-After"] = "5"
    return response


def request_too_large(request: HttpRequest) -> HttpResponse:
    """The 413 for a body over DATA_UPLOAD_MAX_MEMORY_SIZE, answered before anything reads it
    (ApiCommonMiddleware): a problem document under /api/, a page elsewhere."""
    detail = f"The request body exceeds the limit of {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes."
    if _is_api(request):
        return _plain_problem(request, 413, detail, "request_too_large")
    return HttpResponse(
        "<!doctype html>\n<title>Request body too large (413)</title>\n<h1>Request body too large (413)</h1>\n"
        f"<p>{escape(detail)}</p>\n",
        status=413,
    )


def query_parameter_refused(request: HttpRequest, name: str, reason: str) -> HttpResponse:
    """The 400 for a query parameter no view can take (ApiCommonMiddleware), naming it: a
    problem document under /api/ shaped as a serializer's or a filter's validation error, a
    page elsewhere."""
    if _is_api(request):
        return _plain_problem(
            request, 400, f"{name}: {reason}", "validation_error", [{"field": name, "detail": reason}]
        )
    return HttpResponse(
        "<!doctype html>\n<title>Bad request (400)</title>\n<h1>Bad request (400)</h1>\n"
        f"<p>The query parameter {escape(name)} {escape(reason)}.</p>\n",
        status=400,
    )


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """handler404: a problem document under /api/ (Django resolves unknown URLs before DRF
    is involved), Django's page elsewhere."""
    if _is_api(request):
        detail = "No endpoint matches this URL."
        if not request.path_info.endswith("/") and is_valid_path(
            f"{request.path_info}/", getattr(request, "urlconf", None)
        ):
            detail = f"No endpoint matches this URL; the endpoint is {request.path}/ (with a trailing slash)."
        return _plain_problem(request, 404, detail, "not_found")
    return defaults.page_not_found(request, exception or Http404())


def bad_request(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """handler400 (e.g. a disallowed Host header, caught before any view runs)."""
    if _is_api(request):
        return _plain_problem(request, 400, "The request is malformed.", "bad_request")
    return defaults.bad_request(request, exception or Exception())


def permission_denied(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """handler403 (e.g. a CSRF failure outside DRF)."""
    if _is_api(request):
        return _plain_problem(request, 403, "You may not do this.", "permission_denied")
    return defaults.permission_denied(request, exception or Exception())


def server_error(request: HttpRequest) -> HttpResponse:
    """handler500: a problem document under /api/, Django's page elsewhere; a 503 saying so
    when the error is a statement PostgreSQL cancelled outside any view (a middleware's, such
    as the session's save), where neither DRF nor StatementCancelledMiddleware sees it, or a
    database that could not be reached (a console page, a middleware's session read)."""
    exc = sys.exc_info()[1]
    if exc is not None and statement_cancelled(exc):
        return statement_cancelled_response(request, exc)
    if exc is not None and database_unreachable(exc):
        return database_unreachable_response(request, exc)
    if _is_api(request):
        return _plain_problem(request, 500, "The server failed to handle this request.", "server_error")
    return defaults.server_error(request)
