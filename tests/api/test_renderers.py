"""The orjson renderer writes what DRF's JSONRenderer writes."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from decimal import Decimal

import pytest
from django.db import OperationalError
from django.test import Client, RequestFactory
from django.utils.translation import gettext_lazy
from rest_framework.renderers import JSONRenderer
from rest_framework.utils.serializer_helpers import ReturnDict, ReturnList

from orchestration.api import errors
from orchestration.api.renderers import FastJSONRenderer

DOCUMENTS = {
    "page": {
        "next": "http://testserver/api/v1/workflows/?cursor=abc",
        "previous": None,
        "results": ReturnList([{"id": "x", "n": 1, "ok": True, "tags": ["a"], "meta": {}}], serializer=None),
    },
    "text": {"plain": "a", "unicode": "ünï €", "separators": "a\u2028b\u2029c", "quote": '"\\/\n\t'},
    "objects": {
        "utc": dt.datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC),
        "offset": dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=-3))),
        "date": dt.date(2030, 1, 2),
        "time": dt.time(3, 4, 5),
        "decimal": Decimal("1.230000"),
        "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "lazy": gettext_lazy("Not found."),
        "tuple": (1, 2),
        "returndict": ReturnDict({"a": 1}, serializer=None),
    },
    "numbers": {"int": -(2**63), "float": 0.1, "zero": 0.0, "neg": -2.5},
    "big integer (standard library)": {"n": 2**70},
    "integer keys (standard library)": {1: "one"},
}


@pytest.mark.parametrize("name", DOCUMENTS)
def test_the_output_is_byte_for_byte_drfs(name):
    document = DOCUMENTS[name]
    assert FastJSONRenderer().render(document) == JSONRenderer().render(document)


def test_floats_mean_the_same_even_where_spelled_differently():
    document = {"small": 1e-7, "large": 1e22, "pi": 3.141592653589793}
    assert json.loads(FastJSONRenderer().render(document)) == json.loads(JSONRenderer().render(document))


def test_indented_output_is_drfs():
    document = {"a": [1, {"b": None}]}
    accepted = "application/json; indent=4"
    assert FastJSONRenderer().render(document, accepted) == JSONRenderer().render(document, accepted)


def test_what_neither_can_encode_fails_the_same_way():
    with pytest.raises(TypeError):
        JSONRenderer().render({"x": object()})
    with pytest.raises(TypeError):
        FastJSONRenderer().render({"x": object()})


def test_the_api_answers_with_it(callers):
    response = callers["developer"].client.get("/api/v1/me/")
    assert isinstance(response.accepted_renderer, FastJSONRenderer)
    assert response["Content-Type"] == "application/json"
    problem = callers["developer"].client.get("/api/v1/workflows/?status=sleeping")
    assert problem["Content-Type"] == "application/problem+json"
    assert problem.json()["status"] == 400


def _compact(response) -> bytes:
    return json.dumps(json.loads(response.content), separators=(",", ":"), ensure_ascii=False).encode()


def test_answers_built_outside_drf_are_as_compact_as_drfs(callers, settings):
    """The 404, 413, 500 and 503 problems of handlers and middleware (and the probes' JSON)
    were Django's JsonResponse, `{"type": "...", "title": ...}`, where DRF's are compact."""
    client = callers["developer"].client
    answers = [(client.get("/api/v1/workflows/nope/"), 404), (client.get("/api/v1/nothing/"), 404)]
    request = RequestFactory().get("/api/v1/workflows/")
    answers.append((errors.server_error(request), 500))
    answers.append((errors.database_unreachable_response(request, OperationalError("gone")), 503))
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1024
    answers.append((client.post("/api/v1/workflows/", "x" * 2048, content_type="application/json"), 413))
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    answers.append((Client().get("/readyz"), 503))
    for response, status in answers:
        assert response.status_code == status
        assert b'", "' not in response.content and b'": ' not in response.content
        assert response.content == _compact(response)
