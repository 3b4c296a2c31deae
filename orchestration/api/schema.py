"""OpenAPI helpers: problem-detail responses and examples."""

from __future__ import annotations

from typing import Any, ClassVar

from django.core.signals import setting_changed
from django.dispatch import receiver
from django.http import HttpResponse
from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.request import Request

from orchestration.api.errors import PROBLEM_CONTENT_TYPE, TITLES, problem
from orchestration.api.serializers import ProblemSerializer
from orchestration.api.throttling import RateLimitedMixin

_DETAILS = {
    400: ("validation_error", "name: must not be empty", [{"field": "name", "detail": "must not be empty"}]),
    401: ("not_authenticated", "Authentication credentials were not provided.", None),
    403: ("permission_denied", "Your role (viewer) does not grant workflow:create, which this operation needs.", None),
    404: ("not_found", "Not found.", None),
    409: ("conflict", "workflow 0190... is completed; only a pending or running workflow can be cancelled", None),
    410: ("gone", "the data file of export run 42 no longer matches the sha256 it recorded", None),
    412: ("precondition_failed", 'If-Match names no version of this file; its ETag is "9f86d0..."', None),
    413: ("request_too_large", "The request body exceeds the limit of 2621440 bytes.", None),
    415: ("unsupported_media_type", 'Unsupported media type "text/plain" in request.', None),
    422: ("unprocessable", "Idempotency-Key 'k1' was already used for a different request body.", None),
    429: ("throttled", "Request was throttled. Expected available in 12 seconds.", None),
    503: ("unavailable", "settled=true needs the relay's position on the Synapse stream, which is unknown: ...", None),
}


def problem_responses(*codes: int) -> dict[Any, Any]:
    """{(status, media type): response} entries documenting problem-detail answers, each
    with an example."""
    responses = {}
    for code in codes:
        kind, detail, errors = _DETAILS[code]
        example = problem(status_code=code, detail=detail, code=kind, instance="/api/v1/workflows/", errors=errors)
        responses[(code, PROBLEM_CONTENT_TYPE)] = OpenApiResponse(
            response=ProblemSerializer,
            description=TITLES[code],
            examples=[OpenApiExample(TITLES[code], value=example, status_codes=[str(code)], response_only=True)],
        )
    return responses


# Answers any operation can give before its view runs: a query parameter given twice or
# holding a NUL (400, ApiCommonMiddleware) and content negotiation (406) for every one, and
# for those taking a body its size limit (413) and media type (415).
_EVERY_OPERATION = (400, 406)
_WITH_A_BODY = (413, 415)
_REPEATED = "is given 2 times; it takes one value"
_MORE_DETAILS = {
    400: ("validation_error", f"status: {_REPEATED}", [{"field": "status", "detail": _REPEATED}]),
    406: ("not_acceptable", "Could not satisfy the request Accept header.", None),
    503: ("unavailable", "Rate limits are counted in Redis, which is not answering; retry shortly.", None),
}


def _problem_response(code: int, path: str) -> dict[str, Any]:
    kind, detail, errors = _MORE_DETAILS[code] if code in _MORE_DETAILS else _DETAILS[code]
    example = problem(status_code=code, detail=detail, code=kind, instance=path, errors=errors)
    name = TITLES[code].title().replace(" ", "")
    return {
        "description": TITLES[code],
        "content": {
            PROBLEM_CONTENT_TYPE: {
                "schema": {"$ref": "#/components/schemas/Problem"},
                "examples": {name: {"value": example, "summary": TITLES[code]}},
            }
        },
    }


def document_negotiation_problems(result: dict[str, Any], generator: Any, request: Any, public: bool) -> dict:
    """drf-spectacular postprocessing hook: the 400, 406, 413 and 415 problems on every
    operation that can answer them, and 503 on the rate-limited ones, where the operation's own
    responses do not list them already."""
    for path, operations in result.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            codes = _EVERY_OPERATION + (_WITH_A_BODY if "requestBody" in operation else ())
            # A rate-limited operation answers 503 when the counter's Redis does not answer.
            codes += (503,) if "429" in responses else ()
            for code in codes:
                responses.setdefault(str(code), _problem_response(code, path))
    return result


class CachedSchemaView(RateLimitedMixin, SpectacularAPIView):
    """`/api/v1/schema/`, served to anyone (like the docs page that reads it), so it must cost
    next to nothing: drf-spectacular generates the schema on every request (a quarter to a
    third of a second of CPU, plus a fifth for YAML) and an anonymous caller's limit is per
    address (API_RATE_LIMIT_ANONYMOUS), shared by every client behind one. The schema is the
    same for every caller (SERVE_PUBLIC) and changes only with the code, so each format is
    rendered once per process. `?lang=` and `?version=` are not honoured: the API has no
    translations and its version is in the path, and a cache keyed on them would be as easy
    to miss as none."""

    _rendered: ClassVar[dict[type, tuple[bytes, str, str]]] = {}

    @extend_schema(exclude=True)  # as SpectacularAPIView's own (SERVE_INCLUDE_SCHEMA is off)
    def get(self, request: Request, *args: Any, **kwargs: Any) -> HttpResponse:
        # By renderer, rendered with its plain media type: parameters of the Accept header
        # (`; indent=8`, any other) would make as many cache entries as a client cares to ask for.
        renderer = request.accepted_renderer
        cached = self._rendered.get(type(renderer))
        if cached is None:
            response = self._get_schema_response(request)
            response.accepted_renderer = renderer
            response.accepted_media_type = renderer.media_type
            response.renderer_context = self.get_renderer_context()
            response.render()
            cached = (response.content, response["Content-Type"], response["Content-Disposition"])
            self._rendered[type(renderer)] = cached
        content, content_type, disposition = cached
        answer = HttpResponse(content, content_type=content_type)
        answer["Content-Disposition"] = disposition
        return answer

    def _get_version_parameter(self, request: Request) -> None:
        return None


class DocsView(RateLimitedMixin, SpectacularSwaggerView):
    """`/api/v1/docs/`: the interactive docs, with the RateLimit-* headers of every answer."""


@receiver(setting_changed)
def _forget_rendered_schema(**kwargs: Any) -> None:
    """Settings shape the schema (page sizes, body limit): a test that changes one gets a new one."""
    CachedSchemaView._rendered.clear()
