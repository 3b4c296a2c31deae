"""CommonMiddleware without APPEND_SLASH redirects of API writes.

A 301 (or 302) makes HTTP clients repeat a POST, PUT, PATCH or DELETE as a GET: a POST to
/api/v1/workflows would answer 200 with the list, having submitted nothing (and with DEBUG,
Django raises instead of redirecting). Under /api/ such a request without its trailing slash
is a 404 problem document that names the URL with the slash (errors.not_found).

A path holding a NUL character is a 404 everywhere (the console's object pages too)."""

from __future__ import annotations

from django.http import Http404, HttpRequest
from django.http.response import HttpResponseBase
from django.middleware.common import CommonMiddleware

API_PREFIX = "/api/"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


class ApiCommonMiddleware(CommonMiddleware):
    def process_request(self, request: HttpRequest) -> HttpResponseBase | None:
        # No object id or route holds a NUL, and PostgreSQL refuses one in any text it is
        # given: a path with one is no page (a 404) before any view looks an object up by it.
        if "\x00" in request.path_info:
            raise Http404("no page has a NUL character in its path")
        return super().process_request(request)

    def should_redirect_with_slash(self, request: HttpRequest) -> bool:
        if request.path_info.startswith(API_PREFIX) and request.method not in SAFE_METHODS:
            return False
        return super().should_redirect_with_slash(request)
