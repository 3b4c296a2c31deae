"""Inputs at the edges of what JSON, ISO 8601 and PostgreSQL accept: each is refused with a
400 naming the problem (or, for a replayed body, recognised as the same), never a 500, and
nothing is stored that could not be read back."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from orchestration.models import Workflow
from tests.api.conftest import SPEC


def _post(caller, text: str, **headers: str):
    return caller.client.post("/api/v1/workflows/", data=text, content_type="application/json", **headers)


def test_a_deadline_past_the_year_9999_in_utc_is_refused_and_stores_nothing(callers):
    body = json.dumps({**SPEC, "deadline": "9999-12-31T23:59:59-10:00"})  # year 10000 in UTC
    refused = _post(callers["developer"], body)
    assert refused.status_code == 400
    assert "out of range" in refused.json()["errors"][0]["detail"]
    assert not Workflow.objects.exists()
    # (stored, it would have made every list holding it a 500, the admin's too)
    assert callers["admin"].client.get("/api/v1/workflows/").status_code == 200


def test_a_deadline_that_is_no_date_is_refused(callers):
    refused = _post(callers["developer"], json.dumps({**SPEC, "deadline": "2030-13-45T10:00:00Z"}))
    assert refused.status_code == 400
    assert "ISO 8601" in refused.json()["errors"][0]["detail"]


@pytest.mark.parametrize("number", ["1e400", "-1e400"])
def test_a_number_too_large_for_json_storage_is_refused(callers, number):
    body = '{"name": "n", "metadata": {"x": ' + number + '}, "tasks": [{"name": "a", "agent": "echo"}]}'
    refused = _post(callers["developer"], body)
    assert refused.status_code == 400
    assert refused["Content-Type"].startswith("application/problem+json")
    assert "out of range" in refused.content.decode()
    assert not Workflow.objects.exists()


@pytest.mark.parametrize("value", ["1e16", "-0.0", "1.50"])
def test_the_same_body_again_with_the_same_key_is_a_replay_whatever_jsonb_made_of_its_numbers(callers, value):
    body = '{"name": "n", "tasks": [{"name": "a", "agent": "echo", "input": {"x": ' + value + "}}]}"
    first = _post(callers["developer"], body, HTTP_IDEMPOTENCY_KEY="numbers")
    again = _post(callers["developer"], body, HTTP_IDEMPOTENCY_KEY="numbers")
    assert (first.status_code, again.status_code) == (201, 200), again.content
    assert again.json()["workflow_id"] == first.json()["workflow_id"]
    other = body.replace(value, "2")
    assert _post(callers["developer"], other, HTTP_IDEMPOTENCY_KEY="numbers").status_code == 422


def test_an_error_is_a_json_problem_document_whatever_the_client_accepts(callers):
    answer = callers["developer"].client.get("/api/v1/workflows/nope/", HTTP_ACCEPT="text/html")
    assert answer.status_code == 404
    assert answer["Content-Type"].startswith("application/problem+json")
    assert json.loads(answer.content)["status"] == 404


def test_a_key_prefix_with_a_nul_is_an_invalid_key_not_a_500(db):
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Bearer al_\x00\x00\x00\x00\x00\x00\x00\x00_secret")
    answer = client.get("/api/v1/me/")
    assert answer.status_code == 401
    assert answer["Content-Type"].startswith("application/problem+json")


def test_a_percent_sign_in_a_filter_value_is_a_400_naming_the_filter(callers):
    """django-filter formats every error message with its parameters: a message holding the
    value itself (`'%' is not a boolean`) raised TypeError, a 500."""
    answer = callers["admin"].client.get("/api/v1/events/?settled=%25")
    assert answer.status_code == 400, answer.content
    assert answer.json()["errors"] == [{"field": "settled", "detail": "'%' is not a boolean: use true or false"}]


@pytest.mark.parametrize(
    "query, field",
    [("entity_id=a%00b", "entity_id"), ("cursor=%00", "cursor"), ("limit=1%00", "limit"), ("a%00b=1", "a\\x00b")],
)
def test_a_nul_in_any_query_parameter_is_a_400_naming_it(callers, query, field):
    answer = callers["admin"].client.get(f"/api/v1/events/?{query}")
    assert answer.status_code == 400, answer.content
    assert answer["Content-Type"].startswith("application/problem+json")
    assert answer.json()["errors"] == [{"field": field, "detail": "contains a NUL character (\\u0000)"}]


@pytest.mark.parametrize(
    "fields, field, problem",
    [
        (
            '"tasks": [{"name": "a", "agent": "echo", "input": {"t": ["ok", "a\\u0000b"]}}]',
            "tasks[0].input.t[1]",
            "NUL",
        ),
        ('"metadata": {"a\\u0000": 1}', "metadata (a key)", "NUL character"),
        ('"description": "\\ud800"', "description", "unpaired UTF-16 surrogate"),
        ('"metadata": {"x": [1e400]}', "metadata.x[0]", "number out of range"),
    ],
)
def test_a_value_postgresql_cannot_store_is_refused_naming_where_it_is(callers, fields, field, problem):
    """The body is refused whole, before any view reads it (nothing is written), and the
    problem names the value's place in it, as a validation error names a field."""
    tasks = "" if fields.startswith('"tasks"') else ', "tasks": [{"name": "a", "agent": "echo"}]'
    refused = _post(callers["developer"], '{"name": "n", ' + fields + tasks + "}")
    assert refused.status_code == 400, refused.content
    (error,) = refused.json()["errors"]
    assert error["field"] == field
    assert problem in error["detail"]
    assert not Workflow.objects.exists()


def test_naming_where_a_value_postgresql_cannot_store_is_takes_no_memory_per_value_and_level(callers):
    """Its path was built for every value on the way, each holding its parents' path: a body of
    2.4 MB (a list 900 levels deep holding 1.2 million zeros, then a NUL) took 3.5 GB and 5 s to
    refuse, its memory growing with the values times the depth. Here 100 000 zeros 300 deep."""
    depth, zeros = 300, 100_000
    body = '{"name": "n", "metadata": {"x": ' + "[" * depth + "0," * zeros + '"\\u0000"' + "]" * depth + "}}"
    tracemalloc.start()
    try:
        refused = _post(callers["developer"], body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert refused.status_code == 400, refused.content
    (error,) = refused.json()["errors"]
    assert error["field"] == "metadata.x" + "[0]" * (depth - 1) + f"[{zeros}]"
    assert peak < 20_000_000, f"{peak / 1e6:.0f} MB"
