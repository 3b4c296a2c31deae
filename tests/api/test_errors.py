"""One error shape (RFC 9457) for every failure, and the inputs schemathesis' coverage phase
found that once ended in a 500: empty filters, NUL characters, unpaired surrogates, UTC
offsets PostgreSQL refuses, values of the wrong JSON type."""

from __future__ import annotations

import io
import json
import logging
import socket

import psycopg
import pytest
from django.core.files.uploadhandler import FileUploadHandler
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import Client, override_settings
from rest_framework.test import APIRequestFactory

from orchestration.api.errors import problem_exception_handler
from orchestration.models import Workflow
from tests.api.conftest import SPEC
from tests.engine import database_url
from tests.factories import UserFactory


@pytest.mark.parametrize(
    "query, field",
    [("status=", "status"), ("created_before=", "created_before"), ("entity_id=a%00b", "entity_id")],
)
def test_bad_query_values_are_400s_naming_the_parameter(callers, query, field):
    path = "/api/v1/events/" if field == "entity_id" else "/api/v1/workflows/"
    response = callers["admin"].client.get(f"{path}?{query}")
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == field


def test_a_utc_offset_postgresql_refuses_is_normalised(callers, submit):
    submit(callers["developer"])
    response = callers["developer"].client.get("/api/v1/events/?since=0208-10-03T06:49:11.906-17:49")
    assert response.status_code == 200
    assert response.json()["results"]


@pytest.mark.parametrize(
    "text, problem",
    [("a\u0000b", "NUL character"), ("\ud800", "unpaired UTF-16 surrogate")],
    ids=["nul", "surrogate"],
)
def test_text_postgresql_cannot_store_is_refused_before_anything_is_written(callers, text, problem):
    body = json.dumps({**SPEC, "name": text})  # ASCII JSON: the characters travel as escapes
    response = callers["developer"].client.post("/api/v1/workflows/", body, content_type="application/json")
    assert response.status_code == 400
    assert problem in response.json()["detail"]
    assert Workflow.objects.count() == 0


def test_a_nul_in_a_path_is_a_404(callers):
    assert callers["developer"].client.get("/api/v1/workflows/a%00b/").status_code == 404


class RecordingUploadHandler(FileUploadHandler):
    """Stands in for Django's handlers, which write an uploaded file to memory or a temporary
    file: records the bytes of every file part it is given."""

    received: list[int] = []

    def receive_data_chunk(self, raw_data: bytes, start: int) -> None:
        self.received.append(len(raw_data))

    def file_complete(self, file_size: int) -> None:
        return None


@pytest.fixture
def uploads(settings) -> list[int]:
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2048
    settings.FILE_UPLOAD_HANDLERS = [f"{__name__}.RecordingUploadHandler"]
    RecordingUploadHandler.received = []
    return RecordingUploadHandler.received


def test_a_file_over_the_body_limit_posted_to_the_console_is_a_413_and_is_not_read(db, uploads):
    """Django limits a form's fields, not its files, which it streams to temporary files: any
    form, the login page to anyone with a CSRF cookie, would take a file of any size. Nothing
    here takes an upload; the documented limit holds for every body."""
    client = Client(enforce_csrf_checks=True)
    token = client.get("/admin/login/").cookies["csrftoken"].value
    upload = io.BytesIO(b"x" * 8192)
    upload.name = "big.bin"
    response = client.post(
        "/admin/login/", {"csrfmiddlewaretoken": token, "username": "x", "password": "y", "file": upload}
    )
    assert response.status_code == 413
    assert uploads == []


def test_a_form_over_the_body_limit_is_a_413_page_and_an_api_body_a_413_problem(callers, uploads):
    form = Client().post("/admin/login/", {"username": "x", "password": "y" * 4096})
    assert form.status_code == 413
    assert "2048 bytes" in form.content.decode()
    anonymous = Client().post(
        "/api/v1/workflows/", {**SPEC, "description": "x" * 4096}, content_type="application/json"
    )
    assert anonymous.status_code == 413
    assert anonymous["Content-Type"] == "application/problem+json"
    assert anonymous.json()["detail"] == "The request body exceeds the limit of 2048 bytes."


@pytest.mark.parametrize("value", [0, True, ["echo"]])
def test_values_of_the_wrong_json_type_are_not_coerced(callers, value):
    response = callers["developer"].client.post(
        "/api/v1/conversations/t/messages/", {"agent": "echo", "content": value}, format="json"
    )
    assert response.status_code == 400
    assert response.json()["errors"] == [{"field": "content", "detail": "must be a string"}]


def test_an_idempotency_key_of_the_wrong_type_is_refused(callers, submit):
    response = submit(callers["developer"], {**SPEC, "idempotency_key": None})
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == "idempotency_key"


def test_an_unexpected_exception_is_a_500_problem_without_internals(caplog):
    request = APIRequestFactory().get("/api/v1/workflows/")
    with caplog.at_level(logging.ERROR, logger="orchestration.api.errors"):
        response = problem_exception_handler(RuntimeError("secret internals"), {"request": request})
    assert response.status_code == 500
    assert response.content_type == "application/problem+json"
    assert response.data == {
        "type": "urn:agentledger:problem:server-error",
        "title": "Internal server error",
        "status": 500,
        "detail": "The server failed to handle this request.",
        "instance": "/api/v1/workflows/",
    }
    assert "secret internals" in caplog.text  # logged for operators, not sent to the client


def test_a_statement_the_statement_timeout_cancels_is_a_503_saying_nothing_changed(transactional_db, callers, caplog):
    """DATABASE_STATEMENT_TIMEOUT_SECONDS (compose sets it for web): a list blocked behind a
    lock until PostgreSQL cancels it answers a problem, not a bare 500."""
    submit_body = json.dumps(SPEC)
    with psycopg.connect(database_url(), autocommit=False) as other:
        other.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")  # e.g. a migration's
        with connection.cursor() as cursor:
            cursor.execute("SET statement_timeout = '300ms'")  # what the setting's options do
        try:
            listed = callers["admin"].client.get("/api/v1/events/")
            posted = callers["developer"].client.post(
                "/api/v1/workflows/", submit_body, content_type="application/json"
            )
        finally:
            with connection.cursor() as cursor:
                cursor.execute("RESET statement_timeout")
        other.rollback()
    for response in (listed, posted):
        assert response.status_code == 503, response.content
        assert response["Content-Type"] == "application/problem+json"
    assert "cancelled (nothing was changed)" in listed.json()["detail"]
    assert "may have been saved" in posted.json()["detail"]  # a write cannot promise that
    assert "a database statement was cancelled in /api/v1/events/" in caplog.text
    # The submission's transaction was rolled back: no workflow without its workflow_created event.
    assert Workflow.objects.count() == 0


def test_a_statement_cancelled_after_the_submission_committed_does_not_say_nothing_changed(
    transactional_db, callers, monkeypatch
):
    """The submission commits in its own transaction, then the view reads the workflow back
    for the answer. A statement cancelled in that read must not answer "nothing was changed"
    (and "try again later"): the workflow is stored and queued, and a client that believes the
    problem and sends the same body again (no Idempotency-Key) runs it twice."""
    from orchestration.api.views import WorkflowViewSet

    respond = WorkflowViewSet._workflow_response

    def slow_read_back(self, workflow, code):
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_sleep(1)")  # a read back that outlasts the statement timeout
        return respond(self, workflow, code)

    monkeypatch.setattr(WorkflowViewSet, "_workflow_response", slow_read_back)
    with connection.cursor() as cursor:
        cursor.execute("SET statement_timeout = '300ms'")
    try:
        posted = callers["developer"].client.post(
            "/api/v1/workflows/", json.dumps(SPEC), content_type="application/json"
        )
    finally:
        with connection.cursor() as cursor:
            cursor.execute("RESET statement_timeout")
    assert posted.status_code == 503, posted.content
    assert Workflow.objects.count() == 1, "the submission was committed before the cancelled statement"
    assert "nothing was changed" not in posted.json()["detail"], posted.json()["detail"]


def test_a_read_whose_statement_is_cancelled_still_says_nothing_changed(transactional_db, callers):
    with connection.cursor() as cursor:
        cursor.execute("SET statement_timeout = '300ms'")
    try:
        with psycopg.connect(database_url(), autocommit=False) as other:
            other.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
            listed = callers["admin"].client.get("/api/v1/events/")
            other.rollback()
    finally:
        with connection.cursor() as cursor:
            cursor.execute("RESET statement_timeout")
    assert listed.status_code == 503
    assert "nothing was changed" in listed.json()["detail"]


@override_settings(ROOT_URLCONF="tests.api.session_urls")
def test_a_statement_cancelled_in_a_middleware_is_a_503_saying_so(transactional_db, caplog):
    """The session is saved by SessionMiddleware after the view returned, where neither DRF's
    handler nor StatementCancelledMiddleware sees an error: behind a lock on the sessions
    table until the statement timeout, the answer still says what happened (handler500)."""
    from django.contrib.sessions.models import Session

    client = Client(raise_request_exception=False)  # as a server would: answer, not re-raise
    with connection.cursor() as cursor:
        cursor.execute("SET statement_timeout = '300ms'")
    try:
        with psycopg.connect(database_url(), autocommit=False) as other:
            other.execute("LOCK TABLE django_session IN ACCESS EXCLUSIVE MODE")  # e.g. a migration's
            page = client.get("/remember/")
            api = client.post("/api/v1/remember/")
            other.rollback()
    finally:
        with connection.cursor() as cursor:
            cursor.execute("RESET statement_timeout")
    assert page.status_code == 503, page.content
    assert page["Retry-After"] == "5"
    assert "it was cancelled (nothing was changed)" in page.content.decode()
    assert api.status_code == 503, api.content
    assert api["Content-Type"] == "application/problem+json" and "Retry-After" not in api
    assert api.json()["type"] == "urn:agentledger:problem:unavailable"
    assert "may have been saved" in api.json()["detail"]  # a write cannot promise that
    assert "a database statement was cancelled in /remember/" in caplog.text
    assert not Session.objects.exists()


@pytest.fixture
def database_away(transactional_db, callers):
    """The callers and their keys are stored; then PostgreSQL goes away (down, restarting,
    failing over): `lose("refused")` points the connection at a port nothing listens on,
    `lose("terminated")` has the server end this session, as a failover does."""
    saved = dict(connection.settings_dict)

    def lose(how: str) -> None:
        if how == "refused":
            connection.close()
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                connection.settings_dict.update(HOST="127.0.0.1", PORT=sock.getsockname()[1])
        else:
            connection.ensure_connection()
            with psycopg.connect(database_url(), autocommit=True) as other:
                other.execute("SELECT pg_terminate_backend(%s)", [connection.connection.info.backend_pid])

    yield lose
    connection.close()
    connection.settings_dict.update(saved)


@pytest.mark.parametrize("how", ["refused", "terminated"])
def test_a_request_while_the_database_is_away_is_a_503_problem_not_a_500(database_away, callers, how, caplog):
    database_away(how)
    listed = callers["admin"].client.get("/api/v1/workflows/")
    assert listed.status_code == 503, listed.content
    assert listed["Content-Type"] == "application/problem+json"
    assert listed.json()["type"] == "urn:agentledger:problem:unavailable"
    assert listed.json()["detail"] == "The database is not answering (nothing was changed); try again shortly."
    database_away(how)
    posted = callers["developer"].client.post("/api/v1/workflows/", json.dumps(SPEC), content_type="application/json")
    assert posted.status_code == 503, posted.content
    assert "may have been saved" in posted.json()["detail"]  # a write cannot promise that
    assert "the database could not be reached in /api/v1/workflows/" in caplog.text


@pytest.mark.parametrize("how", ["refused", "terminated"])
def test_a_console_page_while_the_database_is_away_is_a_503_page_not_a_500(database_away, how, caplog):
    """The API's fix first covered /api/ alone: a console page answered Django's 500 page, and
    a traceback was logged as an internal server error."""
    client = Client(raise_request_exception=False)
    client.force_login(UserFactory(is_staff=True, is_superuser=True))
    database_away(how)
    page = client.get("/admin/orchestration/workflow/")
    assert page.status_code == 503, page.content[:500]
    assert b"The database is not answering (nothing was changed); try again shortly." in page.content
    assert page["Retry-After"] == "5"
    assert "the database could not be reached in /admin/orchestration/workflow/" in caplog.text


def test_a_spec_with_thousands_of_problems_lists_the_first_hundred_and_counts_the_rest(callers, submit):
    """50 000 unknown dependencies (0.7 MB) were answered with 6.9 MB, every problem twice."""
    spec = {**SPEC, "tasks": [{**SPEC["tasks"][0], "depends_on": [f"t{i}" for i in range(5000)]}]}
    refused = submit(callers["developer"], spec)
    assert refused.status_code == 400
    body = refused.json()
    assert len(body["errors"]) == 101
    assert all(e["field"] == "tasks[0].depends_on" for e in body["errors"][:100])
    assert body["errors"][100] == {"field": "", "detail": "and 4900 more problems, not listed"}
    assert body["detail"].endswith("; and 4900 more problems, not listed")
    assert len(refused.content) < 30_000
    assert not Workflow.objects.exists()


def test_submit_workflow_lists_the_first_hundred_problems_and_counts_the_rest(callers, tmp_path):
    path = tmp_path / "spec.json"
    spec = {**SPEC, "tasks": [{**SPEC["tasks"][0], "depends_on": [f"t{i}" for i in range(150)]}]}
    path.write_text(json.dumps(spec))
    with pytest.raises(CommandError) as refused:
        call_command("submit_workflow", str(path), stdout=io.StringIO())
    lines = str(refused.value).splitlines()
    assert lines[0] == "invalid workflow spec:" and len(lines) == 102
    assert lines[-1] == "  and 50 more problems, not listed"
