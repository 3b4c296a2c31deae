"""CommonMiddleware without APPEND_SLASH redirects of API writes.

A 301 (or 302) makes HTTP clients repeat a POST, PUT, PATCH or DELETE as a GET: a POST to
/api/v1/workflows would answer 200 with the list, having submitted nothing (and with DEBUG,
Django raises instead of redirecting). Under /api/ such a request without its trailing slash
is a 404 problem document that names the URL with the slash (errors.not_found).

A path holding a NUL character is a 404 everywhere (the console's object pages too), a query
string holding one a 400 naming its parameter everywhere (the console's list filters too), a
query parameter of the API given more than once a 400 naming it, and
a body longer than DATA_UPLOAD_MAX_MEMORY_SIZE a 413 everywhere, before anything reads it.

A console page whose statement PostgreSQL cancelled (StatementCancelledMiddleware) is a 503
page that says so, not Django's bare "Server Error (500)"; a statement cancelled outside any
view (a middleware's, such as the session's save) gets the same answer from handler500
(errors.server_error)."""

from __future__ import annotations

from collections.abc import Callable

from django.conf import settings
from django.core.exceptions import TooManyFieldsSent
from django.http import Http404, HttpRequest, HttpResponse
from django.http.response import HttpResponseBase
from django.middleware.common import CommonMiddleware

from orchestration.api.errors import (
    SAFE_METHODS,
    query_parameter_refused,
    request_too_large,
    statement_cancelled,
    statement_cancelled_response,
)

API_PREFIX = "/api/"


class ApiCommonMiddleware(CommonMiddleware):
    def process_request(self, request: HttpRequest) -> HttpResponseBase | None:
        # No object id or route holds a NUL, and PostgreSQL refuses one in any text it is
        # given: a path with one is no page (a 404) before any view looks an object up by it.
        if "\x00" in request.path_info:
            raise Http404("no page has a NUL character in its path")
        # Nor does any query parameter: PostgreSQL would refuse it in whatever lookup took it,
        # a 500 wherever the value reaches a query unchecked (the console's list takes any
        # `field__lookup=value` of the model's own fields: `?id__gt=%00`).
        name = _nul_parameter(request)
        if name is not None:
            return query_parameter_refused(request, name, "contains a NUL character (\\u0000)")
        # Every parameter of the API takes one value, and a QueryDict answers its last:
        # `?status=running&status=failed` would filter on `failed` alone, said nowhere.
        if request.path_info.startswith(API_PREFIX):
            repeated = _repeated_parameter(request)
            if repeated is not None:
                name, count = repeated
                return query_parameter_refused(request, name, f"is given {count} times; it takes one value")
        # Django holds a form's fields to DATA_UPLOAD_MAX_MEMORY_SIZE but streams its files to
        # temporary files whatever their size: any form (the login page, to anyone holding a
        # CSRF cookie) would take a file of any size onto the web's disk. Nothing here takes an
        # upload. (Without a Content-Length, Django reads no body at all.)
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length > settings.DATA_UPLOAD_MAX_MEMORY_SIZE:
            return request_too_large(request)
        return super().process_request(request)

    def should_redirect_with_slash(self, request: HttpRequest) -> bool:
        if request.path_info.startswith(API_PREFIX) and request.method not in SAFE_METHODS:
            return False
        return super().should_redirect_with_slash(request)


def _nul_parameter(request: HttpRequest) -> str | None:
    """The name of the first query parameter whose name or value holds a NUL character, or
    None. The query string is parsed only when it holds one (as %00, or raw)."""
    query = request.META.get("QUERY_STRING", "")
    if "%00" not in query and "\x00" not in query:
        return None
    for name, values in _parameters(request):
        if "\x00" in name:
            return repr(name)[1:-1]
        if any("\x00" in value for value in values):
            return name
    return None


def _repeated_parameter(request: HttpRequest) -> tuple[str, int] | None:
    """The name of the first query parameter given more than once and how many times, or
    None. The query string is parsed only when it has two parameters or more (the view
    parses it anyway, and Django keeps the result)."""
    if "&" not in request.META.get("QUERY_STRING", ""):
        return None
    for name, values in _parameters(request):
        if len(values) > 1:
            return name, len(values)
    return None


def _parameters(request: HttpRequest) -> list[tuple[str, list[str]]]:
    """The query's parameters and their values; none when there are more than Django reads
    (answered as such where the view reads them, the limit named)."""
    try:
        return list(request.GET.lists())
    except TooManyFieldsSent:
        return []


class StatementCancelledMiddleware:
    """A view outside DRF (the console, chiefly) whose statement PostgreSQL cancelled: a
    changelist filtered on an unindexed column, an action over many rows, blocked behind a
    migration's lock until the web's statement timeout. The page says what happened and,
    like the API's problem, promises nothing about a write: the console does not run every
    action in one transaction, so part of it may have been saved. (DRF's views answer with a
    problem document of their own, errors.problem_exception_handler.)"""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if not statement_cancelled(exception):
            return None
        return statement_cancelled_response(request, exception)
