"""Inputs at the edges of what JSON, ISO 8601 and PostgreSQL accept: each is refused with a
400 naming the problem (or, for a replayed body, recognised as the same), never a 500, and
nothing is stored that could not be read back."""

from __future__ import annotations

import datetime as dt
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


def test_an_integer_too_long_to_read_is_refused_in_the_clients_terms(callers):
    """Python reads integers of at most 4300 digits; its error told the client to call
    sys.set_int_max_str_digits(), a setting of the server's interpreter."""
    body = '{"name": "n", "metadata": {"x": ' + "9" * 5000 + '}, "tasks": [{"name": "a", "agent": "echo"}]}'
    refused = _post(callers["developer"], body)
    assert refused.status_code == 400
    detail = refused.json()["detail"]
    assert "a number has 5000 digits; at most 4300 are read" in detail
    assert "sys." not in detail
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
    """The spec is refused whole, nothing written, and the problem names the value's place in
    it, as a validation error names a field."""
    tasks = "" if fields.startswith('"tasks"') else ', "tasks": [{"name": "a", "agent": "echo"}]'
    refused = _post(callers["developer"], '{"name": "n", ' + fields + tasks + "}")
    assert refused.status_code == 400, refused.content
    (error,) = refused.json()["errors"]
    assert error["field"] == field
    assert problem in error["detail"]
    assert not Workflow.objects.exists()


@pytest.mark.parametrize(
    ("fields", "quoted"),
    [
        ('"tasks": [{"name": "a\\udc80", "agent": "echo"}]', "tasks[0].name 'a\\udc80' may contain only"),
        ('"x\\ud800": 1, "tasks": [{"name": "a", "agent": "echo"}]', "x\\ud800: unknown field"),
        ('"tasks": [{"name": "a", "agent": "echo", "x\\ud800": 1}]', "tasks[0].x\\ud800: unknown field"),
        ('"metadata": {"k\\ud800": [1e400]}', "metadata.k\\ud800[0] is inf"),
    ],
    ids=["task-name", "unknown-field", "unknown-task-field", "path-through-a-key"],
)
def test_a_spec_problem_quoting_an_unpaired_surrogate_spells_it_as_its_escape(callers, fields, quoted):
    """A problem quotes what the client sent (a task's name, an unknown field's, the keys on a
    value's path), which in a JSON body may hold an unpaired surrogate that UTF-8, and so the
    answer, cannot carry: the answer was a 500, with nothing said of the spec's problems."""
    tasks = "" if '"tasks"' in fields else ', "tasks": [{"name": "a", "agent": "echo"}]'
    refused = _post(callers["developer"], '{"name": "n", ' + fields + tasks + "}")
    assert refused.status_code == 400, refused.content
    assert quoted in refused.json()["detail"], refused.json()
    assert not Workflow.objects.exists()


@pytest.mark.parametrize("header", [{}, {"HTTP_IDEMPOTENCY_KEY": "once"}], ids=["no-key", "key-used-before"])
def test_a_nul_in_a_spec_is_named_among_its_other_problems_and_nothing_is_stored(callers, header):
    """README: every problem of a spec at once. The parser refused the body for its NUL alone,
    hiding the spec's other problems; nor may a key's stored workflow be compared with a body
    PostgreSQL cannot be sent (jsonb takes no NUL)."""
    if header:
        assert _post(callers["developer"], json.dumps({**SPEC, "idempotency_key": "once"})).status_code == 201
    body = {
        "name": "",
        "priority": "urgent",
        "metadata": {"a": ["ok", "x\u0000y"]},
        "tasks": [{"name": "a", "agent": "no\u0000such"}, {"name": "b", "agent": "echo", "depends_on": ["zz"]}],
    }
    refused = _post(callers["developer"], json.dumps(body), **header)
    assert refused.status_code == 400, refused.content
    errors = [(e["field"], e["detail"]) for e in refused.json()["errors"]]
    assert ("metadata.a[1]", "contains a NUL character (\\u0000)") in errors
    assert ("tasks[0].agent", "contains a NUL character (\\u0000)") in errors
    assert {"name", "priority", "tasks[1].depends_on"} <= {field for field, _ in errors}
    assert Workflow.objects.count() == (1 if header else 0)


def test_a_nul_in_the_body_of_another_request_is_still_refused_by_the_parser(callers, submit):
    workflow = submit(callers["developer"]).json()
    cancel = f"/api/v1/workflows/{workflow['workflow_id']}/cancel/"
    answer = callers["developer"].client.post(cancel, '{"reason": "a\\u0000"}', content_type="application/json")
    assert answer.status_code == 400
    assert answer.json()["errors"] == [{"field": "reason", "detail": "contains a NUL character (\\u0000)"}]


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
    (error,) = [e for e in refused.json()["errors"] if "NUL" in e["detail"]]  # (the spec has no tasks either)
    assert error["field"] == "metadata.x" + "[0]" * (depth - 1) + f"[{zeros}]"
    assert peak < 20_000_000, f"{peak / 1e6:.0f} MB"


@pytest.mark.parametrize(
    "path, parameter",
    [
        ("/api/v1/workflows/?created_after=", "created_after"),
        ("/api/v1/workflows/?created_before=", "created_before"),
        ("/api/v1/tasks/?created_after=", "created_after"),
        ("/api/v1/tasks/?created_before=", "created_before"),
        ("/api/v1/events/?since=", "since"),
        ("/api/v1/events/?until=", "until"),
        ("/api/v1/agents/echo/stats/?since=", "since"),
        ("/api/v1/me/spend/?until=", "until"),
    ],
)
def test_a_time_whose_plus_a_query_string_read_as_a_space_says_so(callers, path, parameter):
    """README documents the %2B rule; the error only said "Enter a valid date/time."."""
    client = callers["admin"].client
    refused = client.get(path + "2026-12-01T00:00:00+05:30")  # the '+' arrives as a space
    assert refused.status_code == 400, refused.content
    (error,) = refused.json()["errors"]
    assert error["field"] == parameter
    assert error["detail"].endswith(": a '+' in a query string means a space; write it as %2B.")
    other = client.get(path + "2026-12-01T00:00:00x05:30")  # no space: wrong otherwise
    assert other.status_code == 400 and "%2B" not in other.json()["errors"][0]["detail"]
    assert client.get(path + "2036-12-01T00:00:00%2B05:30").status_code == 200
    assert client.get(path + "2036-12-01+00:00:00Z").status_code == 200  # a space before the time is one


@pytest.mark.parametrize(
    ("path", "parameter"),
    [
        ("/api/v1/workflows/?created_after=", "created_after"),
        ("/api/v1/tasks/?created_before=", "created_before"),
        ("/api/v1/events/?since=", "since"),
        ("/api/v1/agents/echo/stats/?since=", "since"),
        ("/api/v1/me/spend/?until=", "until"),
    ],
)
def test_a_time_in_another_iso_8601_form_is_refused_naming_the_parameter(callers, path, parameter):
    """Python reads ISO week dates (2020-W01-1 is 30 December 2019), the basic format and a
    bare hour; the documented form is YYYY-MM-DD[Thh:mm[:ss]][offset]."""
    client = callers["admin"].client
    for value in ("2020-W01-1", "20200101", "20200101T000000Z", "2020-01-01T10", "2020-01-01T10:00%2B0530x"):
        refused = client.get(path + value)
        assert refused.status_code == 400, (value, refused.content)
        (error,) = refused.json()["errors"]
        assert error["field"] == parameter and "YYYY-MM-DD" in error["detail"], (value, error)
    accepted = ("2036-01-01", "2036-01-01T10:00", "2036-01-01%2010:00:00.5Z", "2036-01-01T10:00:00%2B05:30")
    # RFC 3339 (the schema's date-time) allows a lowercase t and z.
    for value in (*accepted, "2036-01-01t10:00:00Z", "2036-01-01T10:00:00z", "2036-01-01t10:00:00.5z"):
        assert client.get(path + value).status_code == 200, value


@pytest.mark.parametrize("deadline", ["2030-W01-1T00:00:00Z", "20300101T000000Z", "2030-01-01T10Z"])
def test_a_deadline_in_another_iso_8601_form_is_refused_and_stores_nothing(callers, deadline):
    refused = _post(callers["developer"], json.dumps({**SPEC, "deadline": deadline}))
    assert refused.status_code == 400, refused.content
    (error,) = refused.json()["errors"]
    assert error["field"] == "deadline" and "YYYY-MM-DD" in error["detail"]
    assert not Workflow.objects.exists()
    accepted = _post(callers["developer"], json.dumps({**SPEC, "deadline": "2030-01-01T10:00+05:30"}))
    assert accepted.status_code == 201, accepted.content
    lowercase = _post(callers["developer"], json.dumps({**SPEC, "name": "rfc3339", "deadline": "2030-01-01t10:00:00z"}))
    assert lowercase.status_code == 201, lowercase.content
    assert Workflow.objects.get(name="rfc3339").deadline == dt.datetime(2030, 1, 1, 10, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("/api/v1/workflows/?limit=1&limit=2", "limit"),
        ("/api/v1/workflows/?status=running&status=failed", "status"),
        ("/api/v1/tasks/?ordering=created_at&ordering=-created_at", "ordering"),
        ("/api/v1/events/?limit=5&severity=info&severity=error", "severity"),
        ("/api/v1/agents/?status=active&status=active", "status"),
        ("/api/v1/exports/?day=2024-03-05&day=2024-03-06", "day"),
        ("/api/v1/agents/echo/stats/?since=2020-01-01&since=2021-01-01", "since"),
        ("/api/v1/me/spend/?cursor=x&cursor=y", "cursor"),
    ],
)
def test_a_query_parameter_given_twice_is_a_400_naming_it(callers, query, field):
    """A QueryDict answers a repeated parameter's last value: `status=running&status=failed`
    listed the failed workflows alone, to a client that thought it asked for both."""
    refused = callers["admin"].client.get(query)
    assert refused.status_code == 400, refused.content
    assert refused["Content-Type"] == "application/problem+json"
    assert refused.json()["errors"] == [{"field": field, "detail": "is given 2 times; it takes one value"}]


@pytest.mark.parametrize("zone", ["America/New_York", "Europe/Berlin"])
def test_a_time_without_an_offset_is_utc_whatever_the_time_zone_setting(callers, submit, settings, zone):
    """README: a time without an offset is read as UTC. The filters read it in TIME_ZONE,
    refusing one a daylight-saving change skips or repeats there, and agent stats and spend
    (DRF) read it there too, taking such a time silently."""
    settings.TIME_ZONE = zone
    client = callers["admin"].client
    assert submit(callers["admin"]).status_code == 201
    created = Workflow.objects.get().created_at.astimezone(dt.UTC)
    before, after = ((created + dt.timedelta(minutes=m)).strftime("%Y-%m-%dT%H:%M:%S") for m in (-1, 1))
    listed = client.get(f"/api/v1/workflows/?created_after={before}&created_before={after}")
    assert listed.status_code == 200, listed.content
    assert len(listed.json()["results"]) == 1
    assert client.get(f"/api/v1/workflows/?created_after={after}").json()["results"] == []
    for path in ("/api/v1/agents/echo/stats/", "/api/v1/me/spend/"):
        window = client.get(f"{path}?since={before}&until={after}")
        assert window.status_code == 200, window.content
        since = dt.datetime.fromisoformat(window.json()["since"])
        assert since == created.replace(microsecond=0) - dt.timedelta(minutes=1), (path, window.json()["since"])
    # 02:30 on the day New York, then Berlin, springs forward; 01:30 on the day New York falls back.
    for moment in ("2026-03-08T02:30:00", "2026-03-29T02:30:00", "2026-11-01T01:30:00"):
        for query in (f"/api/v1/workflows/?created_after={moment}", f"/api/v1/events/?until={moment}"):
            assert client.get(query).status_code == 200, (query, client.get(query).content)
        spend = client.get(f"/api/v1/me/spend/?since={moment}&until=2026-12-01")
        assert dt.datetime.fromisoformat(spend.json()["since"]) == dt.datetime.fromisoformat(moment + "Z")
