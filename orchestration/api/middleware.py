"""CommonMiddleware without APPEND_SLASH redirects of API writes.

A 301 (or 302) makes HTTP clients repeat a POST, PUT, PATCH or DELETE as a GET: a POST to
/api/v1/workflows would answer 200 with the list, having submitted nothing (and with DEBUG,
Django raises instead of redirecting). Under /api/ such a request without its trailing slash
is a 404 problem document that names the URL with the slash (errors.not_found)."""

from __future__ import annotations

from django.http import HttpRequest
from django.middleware.common import CommonMiddleware

API_PREFIX = "/api/"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


class ApiCommonMiddleware(CommonMiddleware):
    def should_redirect_with_slash(self, request: HttpRequest) -> bool:
        if request.path_info.startswith(API_PREFIX) and request.method not in SAFE_METHODS:
            return False
        return super().should_redirect_with_slash(request)
