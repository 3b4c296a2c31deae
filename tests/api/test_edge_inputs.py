"""Inputs at the edges of what JSON, ISO 8601 and PostgreSQL accept: each is refused with a
400 naming the problem (or, for a replayed body, recognised as the same), never a 500, and
nothing is stored that could not be read back."""

from __future__ import annotations

import json

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
