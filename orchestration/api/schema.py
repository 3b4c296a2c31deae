"""OpenAPI helpers: problem-detail responses and examples."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import OpenApiExample, OpenApiResponse

from orchestration.api.errors import PROBLEM_CONTENT_TYPE, TITLES, problem
from orchestration.api.serializers import ProblemSerializer

_DETAILS = {
    400: ("validation_error", "name: must not be empty", [{"field": "name", "detail": "must not be empty"}]),
    401: ("not_authenticated", "Authentication credentials were not provided.", None),
    403: ("permission_denied", "Your role (viewer) does not grant workflow:create, which this operation needs.", None),
    404: ("not_found", "Not found.", None),
    409: ("conflict", "workflow 0190... is completed; only a running workflow can be cancelled", None),
    410: ("gone", "the data file of export run 42 no longer matches the sha256 it recorded", None),
    413: ("request_too_large", "The request body exceeds the limit of 2621440 bytes.", None),
    422: ("unprocessable", "Idempotency-Key 'k1' was already used for a different request body.", None),
    429: ("throttled", "Request was throttled. Expected available in 12 seconds.", None),
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
