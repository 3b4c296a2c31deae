from __future__ import annotations

import io
import json
import logging
import logging.config

import pytest

from observability import logs
from observability.worker import before_publish


@pytest.fixture
def capture(settings):
    """A logger configured exactly by settings.LOGGING, writing to a buffer."""
    stream = io.StringIO()

    def configure(fmt: str, name: str = "obs.test") -> logging.Logger:
        config = {
            **settings.LOGGING,
            "handlers": {"console": {**settings.LOGGING["handlers"]["console"], "formatter": fmt, "stream": stream}},
            "root": {"handlers": [], "level": "WARNING"},
            "loggers": {name: {"handlers": ["console"], "level": "INFO", "propagate": False}},
        }
        logging.config.dictConfig(config)
        return logging.getLogger(name)

    yield configure, stream
    logging.config.dictConfig(settings.LOGGING)
    logs.log_context_clear()


def test_json_lines_carry_the_task_context(capture):
    configure, stream = capture
    logger = configure("json")
    logs.log_context_bind(execution_id="exec-1", workflow_id="wf-1", attempt=2)
    logger.info("running %s", "step")
    logs.log_context_clear()
    logger.warning("outside")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "running step"
    assert (first["workflow_id"], first["execution_id"], first["attempt"]) == ("wf-1", "exec-1", 2)
    assert first["level"] == "INFO" and first["logger"] == "obs.test" and first["timestamp"].endswith("+00:00")
    assert second["workflow_id"] is None and second["execution_id"] is None and second["attempt"] is None
    assert "task_context" not in first


def test_plain_lines_show_the_context_only_inside_a_task(capture):
    configure, stream = capture
    logger = configure("plain")
    logs.log_context_bind(execution_id="exec-1", workflow_id="wf-1", attempt=1)
    logger.info("inside")
    logs.log_context_clear()
    logger.info("outside")
    inside, outside = stream.getvalue().splitlines()
    assert "[workflow_id=wf-1 execution_id=exec-1 attempt=1] inside" in inside
    assert "[" not in outside and outside.endswith("obs.test outside")


def test_configured_secrets_are_masked_by_value_in_messages_and_tracebacks(capture, settings, monkeypatch):
    settings.SECRET_KEY = "django-secret-value-0123456789"
    settings.LOG_REDACT_ENV = ["EXTRA_SERVICE_PASSWORD"]
    monkeypatch.setenv("EXTRA_SERVICE_PASSWORD", "hunter2-extra-pw")
    configure, stream = capture
    logger = configure("json")
    logger.info("key is %s and pw %s", settings.SECRET_KEY, "hunter2-extra-pw")
    try:
        raise RuntimeError(f"failed with {settings.SECRET_KEY}")
    except RuntimeError:
        logger.exception("boom")
    text = stream.getvalue()
    assert "django-secret-value-0123456789" not in text and "hunter2-extra-pw" not in text
    first, second = (json.loads(line) for line in text.splitlines())
    assert first["message"] == "key is *** and pw ***"
    assert "RuntimeError: failed with ***" in second["exc_info"]


def test_secrets_in_the_extras_of_celery_and_django_records_are_masked_in_json(capture, settings, client):
    """Celery logs a failed task with `extra={"data": ...}` (the raw exception, traceback and
    arguments) and django.request a 4xx with `extra={"request": ...}` (its query string): the
    JSON format writes extras out, so they are masked like the message."""
    from config.celery import app

    settings.SECRET_KEY = "django-secret-value-0123456789"
    configure, stream = capture

    @app.task(name="obs.test.leaky")
    def leaky(credential: str) -> None:
        raise RuntimeError(f"refused Authorization: Bearer abcdefghijklmnopqrstuvwxyz with {settings.SECRET_KEY}")

    configure("json", "celery.app.trace")
    leaky.apply(args=["sk-proj-abcdefghijklmnopqrstu"])
    configure("json", "django.request")
    client.get("/no-such-page?api_key=querystringsecret123")
    text = stream.getvalue()
    for secret in ("abcdefghijklmnopqrstu", "django-secret-value", "querystringsecret123"):
        assert secret not in text, secret
    failed, not_found = (json.loads(line) for line in text.splitlines())
    assert failed["logger"] == "celery.app.trace" and "Bearer ***" in failed["data"]["traceback"]
    assert failed["data"]["args"] == "['sk-proj-***']" and failed["data"]["name"] == "obs.test.leaky"
    assert not_found["request"] == "<WSGIRequest: GET '/no-such-page?api_key=***'>"
    assert not_found["status_code"] == 404


def test_an_extra_that_holds_itself_is_logged_masked(capture):
    """A container extra that refers to itself (or is nested very deep) is masked as its text:
    walking it raised RecursionError out of the logging call, failing the code that logged."""
    configure, stream = capture
    logger = configure("json")
    data: dict = {"auth": "Bearer abcdefghijklmnopqrstuvwxyz"}
    data["self"] = data
    logger.warning("cyclic", extra={"data": data})
    line = json.loads(stream.getvalue())
    assert "abcdefghijklmnopqrstu" not in line["data"]["auth"] and "Bearer ***" in line["data"]["auth"]
    assert data["auth"] == "Bearer abcdefghijklmnopqrstuvwxyz"  # the caller's dict is left alone


def test_the_api_key_variables_agent_definitions_name_are_masked(capture, settings, monkeypatch, tmp_path):
    (tmp_path / "writer.yaml").write_text(
        "id: writer\nname: Writer\nexecutor: llm\nprovider: openai\nmodel: gpt-4o-mini\napi_key_env: WRITER_API_KEY\n"
    )
    monkeypatch.setattr("orchestration.services.agents.default_definitions_dir", lambda: tmp_path)
    monkeypatch.setenv("WRITER_API_KEY", "plainvalue-without-prefix-42")
    assert "plainvalue-without-prefix-42" in logs.configured_secrets()
    configure, stream = capture
    configure("plain").info("calling with plainvalue-without-prefix-42")
    assert stream.getvalue().rstrip().endswith("calling with ***")


def test_the_keys_of_agents_made_before_the_allow_list_stay_masked(settings, monkeypatch):
    """AGENT_API_KEY_ENV_ALLOWED decides what agents read from now on; an agent of the table
    made before it (or before the operator narrowed it) may have sent its key already, and
    the records of those calls are still logged and exported: its value stays masked."""
    monkeypatch.setenv("LEGACY_VLLM_TOKEN", "legacy-value-456789")
    monkeypatch.setenv("COURIER_API_KEY", "courier-value-456")
    secrets = logs.configured_secrets(["LEGACY_VLLM_TOKEN", "COURIER_API_KEY", "sk-pasted-by-mistake-0123"])
    assert {"legacy-value-456789", "courier-value-456"} <= secrets
    settings.LOG_REDACT_ENV = ["PLAIN_SETTING"]
    monkeypatch.setenv("PLAIN_SETTING", "harmless-value-123")
    assert "harmless-value-123" in logs.configured_secrets()


def test_reading_the_agents_variables_does_not_make_them_platform_settings(settings, monkeypatch):
    """The filter and the export read the variables agents name (and LOG_REDACT_ENV's): were
    they counted among the platform's own settings, every agent naming one would be refused."""
    from orchestration.runtime.llm import api_key_env_problem

    monkeypatch.setenv("COURIER_API_KEY", "courier-value-456")
    settings.LOG_REDACT_ENV = ["COURIER_API_KEY"]
    assert "courier-value-456" in logs.configured_secrets(["COURIER_API_KEY"])
    assert api_key_env_problem("COURIER_API_KEY") is None


def test_a_secret_registered_while_the_filter_reads_them_is_masked_from_the_next_record(monkeypatch):
    """A registration in another thread while the filter reads the secrets: the reading may
    miss it, so the next record reads them again; a record never goes unfiltered meanwhile."""
    registered = "registered-mid-read-0123"
    real = logs.configured_secrets

    def reading_while_another_thread_registers() -> set[str]:
        secrets = real()
        logs.secret_register(registered)  # after this reading's snapshot
        return secrets

    redact_filter = logs.RedactFilter()
    monkeypatch.setattr(logs, "configured_secrets", reading_while_another_thread_registers)
    assert registered not in redact_filter.secrets()
    monkeypatch.setattr(logs, "configured_secrets", real)
    assert registered in redact_filter.secrets()
    assert redact_filter.secrets() is redact_filter.secrets()  # read once per registration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Authorization: Bearer abcdefghijklmnop.qrs", "Authorization: Bearer ***"),
        ("Authorization: Basic dXNlcjpwYXNzd29yZA==", "Authorization: Basic ***"),
        ("sent bearer abcdefghijklmnop", "sent bearer ***"),
        ("key sk-proj-abcdefghijklmnopqrstu used", "key sk-proj-*** used"),
        (
            "curl -d @spec.json localhost/api/v1/workflows/ al_1f2e3d4c_Zk3-q9_xY2wVb7LmN0pQrStUvWxYz0123456789abcd",
            "curl -d @spec.json localhost/api/v1/workflows/ al_1f2e3d4c_***",
        ),
        ("input={'key': 'al_1f2e3d4c_Zk3-q9_xY2wVb7LmN0pQrStU'}", "input={'key': 'al_1f2e3d4c_***'}"),
        (
            "normal_1f2e3d4c_identifiers and al_prefix_names stay",
            "normal_1f2e3d4c_identifiers and al_prefix_names stay",
        ),
        ("redis://user:pa55word@redis:6379/0", "redis://user:***@redis:6379/0"),
        ('{"api_key": "abcdef123456"}', '{"api_key": "***"}'),
        ("tokens_used=1523 max_tokens: 400", "tokens_used=1523 max_tokens: 400"),
    ],
)
def test_secret_looking_patterns_are_masked(text, expected):
    assert logs.redact(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "authorization: Token 9944b09199c62bcf9418ad846dd0e4bbdfc6ee4b after the authorization step",
            "authorization: Token *** after the authorization step",
        ),
        (
            'Authorization: Digest username="bob", realm="api", response="6629fae49393a053974509", opaque="5ccc"',
            "Authorization: Digest ***",
        ),
        ("Authorization: rawapikey123456", "Authorization: ***"),
        (
            "{'Proxy-Authorization': 'ApiKey abc123def456', 'Accept': '*/*'}",
            "{'Proxy-Authorization': 'ApiKey ***', 'Accept': '*/*'}",
        ),
        ('{"Authorization": "Digest response=\\"abcdef123\\"", "n": 1}', '{"Authorization": "Digest ***", "n": 1}'),
        ("[(b'authorization', b'SSWS 00abcdefghijkl')]", "[(b'authorization', b'SSWS ***')]"),
        (
            "Authorization: AWS4-HMAC-SHA256 Credential=AKID/20240305/us-east-1/s3/aws4_request, "
            "SignedHeaders=host;x-amz-date, Signature=fe5f80f77d5fa3be\r\nHost: s3",
            "Authorization: AWS4-HMAC-SHA256 ***\r\nHost: s3",
        ),
        # A header in a JSON string (its quotes escaped), a JSON text inside a JSON string, a
        # list of values, a Ruby/PHP hash, a long value pprint splits into adjacent literals.
        (
            '{"msg": "Authorization: Digest username=\\"bob\\", response=\\"6629fae49393a0\\""}',
            '{"msg": "Authorization: Digest ***"}',
        ),
        (
            '{"body": "{\\"Authorization\\": \\"Token 9944b09199c6\\"}"}',
            '{"body": "{\\"Authorization\\": \\"Token ***\\"}"}',
        ),
        ("map[Authorization:[Token 9944b09199c6] Accept:[*/*]]", "map[Authorization:[Token *** Accept:[*/*]]"),
        ('{"Authorization": ["Token 9944b09199c6"]}', '{"Authorization": ["Token ***"]}'),
        ("{ 'Authorization' => 'Token 9944b09199c6' }", "{ 'Authorization' => 'Token ***' }"),
        ("{'Authorization': 'Token '\n                  '9944b09199c62bcf9418ad'}", "{'Authorization': 'Token ***'}"),
        # A pair whose value is a key sent without a scheme, an XML element, a label and its
        # value as two print arguments, a YAML value on the next line.
        ('dict([("Authorization", "rawapikey123456")])', 'dict([("Authorization", "***")])'),
        ("xhr.setRequestHeader('Authorization', 'rawapikey123456')", "xhr.setRequestHeader('Authorization', '***')"),
        ("<Authorization>Token 9944b09199c6</Authorization>", "<Authorization>Token ***</Authorization>"),
        ("<authorization>rawapikey123456</authorization>", "<authorization>***</authorization>"),
        (
            '<Authorization type="Bearer">Token 9944b09199c6</Authorization>',
            '<Authorization type="Bearer">Token ***</Authorization>',
        ),
        ('print("Authorization:", "rawapikey123456")', 'print("Authorization:", "***")'),
        ('print("Authorization:", "Token 9944b09199c6")', 'print("Authorization:", "Token ***")'),
        ("headers:\n  Authorization:\n    Token 9944b09199c6\n", "headers:\n  Authorization:\n    Token ***\n"),
        ("authorization: >-\n    rawapikey123456\n", "authorization: >-\n    ***\n"),
    ],
)
def test_authorization_credentials_of_any_scheme_are_masked_and_the_scheme_kept(text, expected):
    assert logs.redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        'CORS_ALLOW_HEADERS = ("authorization", "content-type", "x-b3-traceid", "content-md5")',
        '["authorization", "Content-Type"]',
        "Use the <authorization> element; it holds the header's value.",
        'print("Authorization:", header_value)',
        "the authorization step failed",
    ],
)
def test_header_names_and_prose_around_the_word_are_kept(text):
    assert logs.redact(text) == text


def test_celery_argument_reprs_are_masked_and_the_publish_time_stamped(settings):
    settings.SECRET_KEY = "django-secret-value-0123456789"
    logs_filter = __import__("observability.worker", fromlist=["_redactor"])._redactor
    logs_filter._read = None  # settings changed: recompute
    headers = {"argsrepr": "('django-secret-value-0123456789',)", "kwargsrepr": "{'auth': 'Bearer abcdefghijklmnop'}"}
    before_publish(headers)
    assert headers["argsrepr"] == "('***',)"
    assert headers["kwargsrepr"] == "{'auth': 'Bearer ***'}"
    assert isinstance(headers["agentledger_published_at"], float)
    logs_filter._read = None


def test_public_redaction_also_masks_url_user_names_and_short_configured_passwords(settings):
    settings.CELERY_BROKER_URL = "redis://:pw5@broker.internal:6379/0"  # shorter than MIN_SECRET_LENGTH
    settings.REDIS_URL, settings.INFLUXDB_URL = "redis://redis.internal:6379/0", None
    settings.SECRET_KEY = "django-secret-value-0123456789"
    text = "amqp://guest:guest-pw@mq:5672// refused pw5 with django-secret-value-0123456789"
    assert logs.redact_public(text) == "amqp://***@mq:5672// refused *** with ***"
    # The logs keep user names and do not mask short values everywhere.
    assert logs.redact(text, logs.configured_secrets()) == "amqp://guest:***@mq:5672// refused pw5 with ***"
    assert logs.configured_url_passwords() == {"pw5"}


def test_a_quoted_credential_is_masked_up_to_its_closing_quote(capture):
    """A passphrase has spaces and a value may hold commas: a quoted value is masked whole (an
    unquoted one up to a separator, and a short one, "true" or "1", not at all)."""
    configure, stream = capture
    logger = configure("plain")
    logger.warning('upstream said {"password": "correct horse battery staple", "user": "bob"}')
    logger.warning("config {'api_key': 'sk live, not a test'} token=abcdef123&page=2 secret=short")
    first, second = stream.getvalue().splitlines()
    assert '{"password": "***", "user": "bob"}' in first
    assert "{'api_key': '***'} token=***&page=2 secret=short" in second


def test_every_handler_a_django_record_reaches_masks_it(settings):
    """Django configures its own `django` logger (DEFAULT_LOGGING) before settings.LOGGING:
    its console handler (on while DEBUG is, the local default) printed every django.request
    line a second time, unformatted (not JSON under LOG_FORMAT=json) and unmasked (a bearer
    key, a password). Configured as Django does it, a django.* record reaches only handlers
    that mask."""
    from django.utils.log import configure_logging

    settings.DEBUG = True
    try:
        configure_logging(settings.LOGGING_CONFIG, settings.LOGGING)
        handlers = []
        logger: logging.Logger | None = logging.getLogger("django.request")
        while logger is not None:
            handlers.extend(logger.handlers)
            logger = logger.parent if logger.propagate else None
        assert handlers
        for handler in handlers:
            assert any(isinstance(f, logs.RedactFilter) for f in handler.filters), handler
    finally:
        logging.config.dictConfig(settings.LOGGING)


@pytest.mark.parametrize(
    "error, one_line",
    [
        ("broker", True),  # kombu's error for a broker that refuses connections
        ("other", False),  # anything else keeps its traceback
    ],
)
def test_beat_logs_a_run_it_could_not_send_to_an_absent_broker_in_one_line(capture, error, one_line):
    """celery beat logged each run it could not send while Redis was away with the stack it was
    sent from and the exception chain: about 130 lines for each, every second (the relay's
    schedule), some 1,300 lines for an outage of eight seconds."""
    import datetime as dt

    from celery.beat import ScheduleEntry, Scheduler
    from kombu.exceptions import OperationalError

    from config.celery import app

    configure, stream = capture
    configure("plain", name="celery.beat")
    scheduler = Scheduler(app, lazy=True)
    entry = ScheduleEntry(name="synapse event relay", task="audit.not_registered", schedule=dt.timedelta(seconds=1))

    def send_task(*args: object, **kwargs: object) -> None:
        if error == "broker":
            raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        raise ValueError("not a broker's error")

    scheduler.send_task = send_task
    scheduler.apply_entry(entry)
    lines = stream.getvalue().splitlines()
    errors = [line for line in lines if " ERROR " in line]
    assert len(errors) == 1, lines
    if one_line:
        assert len(lines) == 2, lines  # "Sending due task ..." and the error
        assert errors[0].endswith(
            "ERROR celery.beat Couldn't apply scheduled task synapse event relay: Error 111 connecting to "
            "127.0.0.1:6379. Connection refused. (the broker is not answering: this run was not sent)"
        ), errors
    else:
        assert "Traceback (most recent call last)" in stream.getvalue()
        assert "ValueError: not a broker's error" in stream.getvalue()


@pytest.mark.parametrize(
    "message, args, error",
    [
        # beat's own files and its remote control: no run to send, the record is kept whole
        ("Removing corrupted schedule file %r: %r", ("/var/lib/beat/schedule",), PermissionError(13, "denied")),
        ("beat: Store cleanup failed after scheduler error", (), OSError(28, "No space left on device")),
    ],
)
def test_beat_s_other_errors_keep_their_message_and_traceback(capture, message, args, error):
    """Only a run beat could not send becomes one line: another celery.beat record whose error is
    an OSError (its schedule file unreadable, the disk full) kept neither its own message nor its
    traceback, and said "the broker is not answering: this run was not sent"."""
    configure, stream = capture
    logger = configure("plain", name="celery.beat")
    try:
        raise error
    except OSError as exc:
        logger.error(message, *args, *([exc] if "%r: %r" in message else []), exc_info=True)
    text = stream.getvalue()
    assert "the broker is not answering" not in text, text
    assert message.split("%")[0] in text and "Traceback (most recent call last)" in text, text


@pytest.mark.parametrize("backend", ["none", "failing"])
def test_a_revoke_logs_no_warning_for_the_result_backend_the_project_does_not_have(capture, backend):
    """Celery marks a revoked task in the result backend on every worker the broadcast reaches;
    with none configured (the project records a cancellation itself) each worker logged "Failed
    to mark task ... as revoked in backend: No result backend is configured" for each task of
    each cancel. A configured backend that fails keeps its warning."""
    from types import SimpleNamespace

    from celery.worker import control

    from config.celery import app

    configure, stream = capture
    configure("plain", name="celery.worker.control")
    if backend == "none":
        state = SimpleNamespace(app=app, consumer=None)
    else:

        class Failing:
            def get_state(self, task_id: str) -> str:
                raise ConnectionError("result backend unreachable")

        state = SimpleNamespace(app=SimpleNamespace(backend=Failing()), consumer=None)
    task_id = "revoke-filter-test"
    try:
        control._revoke(state, [task_id])
    finally:
        control.worker_state.revoked.discard(task_id)
    text = stream.getvalue()
    assert "Tasks flagged as revoked: revoke-filter-test" in text, text  # the revoke's own line stays
    if backend == "none":
        assert "Failed to mark task" not in text, text
    else:
        assert "Failed to mark task revoke-filter-test as revoked in backend: result backend unreachable" in text


@pytest.mark.subprocess
def test_gunicorn_s_access_lines_are_formatted_and_masked_as_the_application_s(tmp_path):
    """gunicorn's workers inherit its master's plain-text handlers: the access log printed each
    request line as the client sent it, query string and credentials included, and not as JSON.
    gunicorn here as platform/entrypoint.sh runs it."""
    import os
    import subprocess
    import sys
    import urllib.request

    from tests.engine import ROOT, output_of, wait_for
    from tests.observability.conftest import free_port

    port = free_port()
    key = "sk-live-" + "gun1corn" * 3
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.test", "LOG_FORMAT": "json"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "config.wsgi:application", "--bind", f"127.0.0.1:{port}",
         "--workers", "1", "--worker-class", "gthread", "--threads", "2", "--no-control-socket",
         "--access-logfile", "-"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:

        def answered() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz?api_key={key}", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return server.poll() is not None  # exited: its output says why

        wait_for(answered, timeout=30, what="gunicorn to answer")
    finally:
        server.terminate()
    output = output_of(server, timeout=30)
    assert key not in output
    # One line a request; a loaded machine may answer requests the wait gave up on too (each a
    # line of its own, as the worker takes them from the listen queue).
    access = [json.loads(line) for line in output.splitlines() if '"gunicorn.access"' in line]
    assert access, output
    for line in access:
        assert line["level"] == "INFO" and "GET /healthz?api_key=*** HTTP/1.1" in line["message"]
