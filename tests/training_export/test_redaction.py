"""Secrets never reach a training file: one redaction function for CSV and JSONL."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command

from config.env import Env
from orchestration.event_types import EventType
from orchestration.models import TaskExecution
from tests.engine import ROOT
from tests.factories import AgentFactory, EventFactory, MessageFactory, TaskExecutionFactory
from training_export.services.redaction import MASK, NOT_SECRET_LAST_WORDS, build_redactor, redact
from training_export.services.store import store_agent_event, store_agent_task, store_tool_execution

T0 = dt.datetime(2024, 3, 5, 10, 0, tzinfo=dt.UTC)
CANARY = "canary-7f3a9c1e5b"
SECRETS = {
    "password": f"pw-{CANARY}",
    "openai": f"sk-{CANARY}abcdefghijklmnop",
    "platform": f"al_{CANARY}_0123456789abcdef",
    "bearer": f"Bearer eyJ{CANARY}.payload.sig",
    "email": f"{CANARY}@example.org",
}


def secret_input() -> dict:
    return {
        "question": f"call the API with {SECRETS['openai']} and mail {SECRETS['email']}",
        "credentials": {"password": SECRETS["password"], "nested": [{"Authorization": SECRETS["bearer"]}]},
        "headers": [f"X-Key: {SECRETS['platform']}"],
        "max_tokens": 100,
    }


def test_keys_are_matched_as_whole_words_at_any_depth():
    redactor = build_redactor(["secret", "token", "api_key", "password"], [])
    value = {
        "client_secret": "a",
        "Access-Token": "b",
        "refreshToken": "c",
        "openai_api_key": "d",
        "list": [{"db_password": "e"}],
        "tokens_used": 12,
        "max_tokens": 5,
        "secretary": "kept",
    }
    assert redactor.value(value) == {
        "client_secret": MASK,
        "Access-Token": MASK,
        "refreshToken": MASK,
        "openai_api_key": MASK,
        "list": [{"db_password": MASK}],
        "tokens_used": 12,
        "max_tokens": 5,
        "secretary": "kept",
    }


def test_default_patterns_mask_credentials_and_emails_inside_text():
    text = redact(f"a {SECRETS['bearer']} b {SECRETS['openai']} c {SECRETS['platform']} d {SECRETS['email']} e")
    assert CANARY not in text
    assert text == f"a {MASK} b {MASK} c {MASK} d {MASK} e"
    assert redact("plain words, sk-short, 42") == "plain words, sk-short, 42"
    # Inside a word is not a key: task names, ids, totals.
    kept = "risk-assessment-for-customers total_al_0123456789abcdefgh task-0123456789abcdefghij"
    assert redact(kept) == kept
    assert redact("x\nsk-0123456789abcdefXYZ") == f"x\n{MASK}"


def test_default_patterns_mask_url_credentials_and_key_value_secrets():
    text = "export OPENAI_API_KEY=abc123def456ghi; db postgres://app:hunter2secret@db/x; password: s3cr3t!"
    masked = redact(text)
    for secret in ("abc123def456ghi", "hunter2secret", "s3cr3t!"):
        assert secret not in masked
    assert masked.startswith("export OPENAI_") and "postgres://" in masked and "@" not in masked.split("postgres://")[1]
    assert redact("tokens_used: 5 of 100") == "tokens_used: 5 of 100", "a word that merely starts like one is kept"


def test_a_credential_that_a_mask_uncovers_is_masked_too_and_masking_twice_changes_nothing():
    # The key=value pattern's mask turns this into a credential URL, which the URL pattern
    # (tried before it) then matches: passes repeat while each masks more.
    text = "see https://secret=x/y&:pw123@host ok"
    masked = redact(text)
    assert "pw123" not in masked and masked.startswith("see https://") and masked.endswith("host ok")
    assert redact(masked) == masked


@pytest.mark.parametrize(
    "patterns",
    [
        [r"sk-[a-z]{4}", r"[a-z]+@[a-z]+\.org"],
        [r"(ab)\1", r"x(y)z"],
        [r"(?i)secret-\d+", r"sk-[a-z]{4}"],
        # A pattern masking what an earlier one left: the literal pre-check sees each result.
        [r"sk-[a-z]{4}", r"\[REDACTED\]!"],
        [r"(?i:token|passw(?:or)?d)=\w+", r"\bxy(?:z|zz)+"],
    ],
)
def test_the_literal_pre_check_agrees_with_the_patterns_one_by_one(patterns):
    redactor = build_redactor([], patterns)
    texts = ["ababab x", "sk-abcd!", "SECRET-42 and xyz", "mail bob@example.org", "nothing here", "abab xyz"]
    texts += ["TOKEN=abc passwd=x", "xyzz xyq", "\u017fecret-1 \u017fk-abcd", "é sk-abcd"]
    for text in texts:
        expected = text
        for pattern in patterns:
            expected = re.sub(pattern, MASK, expected)
        assert redactor.text(text) == expected
        assert redactor.text(text) == expected  # and again, from the cache


def test_keys_holding_a_secret_or_a_pattern_match_are_masked_and_no_value_is_lost(settings):
    redactor = build_redactor(["password"], settings.REDACT_PATTERNS, ["hunter2-long-secret"])
    value = {
        "alice@example.com": {"role": "admin"},
        "bob@example.org": "reader",
        "pw hunter2-long-secret": "x",
        "plain": {"sk-live-abcdefghijklmnopqrst": 1},
        "password": "p",
    }
    assert redactor.value(value) == {
        MASK: {"role": "admin"},
        f"{MASK}#2": "reader",
        f"pw {MASK}": "x",
        "plain": {MASK: 1},
        "password": MASK,
    }


def test_the_one_scan_gate_agrees_with_the_default_patterns_one_by_one(settings):
    import random

    redactor = build_redactor([], settings.REDACT_PATTERNS)
    assert redactor.gate is not None and redactor.gate.search("wf-7 step 42 done") is None
    rng = random.Random(11)
    pieces = ["sk-", "al_", "gh", "p_", "AKIA", "xox", "b-", "@", ".", ":", "//", "://", "bearer ", "Bearer\t"]
    pieces += ["token", "TOKEN=", "api-key: ", "passwd=", "secret:", "x" * 20, "A1" * 9, "é", "\u017f"]
    pieces += [" ", "-", "_", "="]
    texts = [text for value in SECRETS.values() for text in (value, f"say {value}!")]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 8))) for _ in range(3000)]
    for text in texts:
        expected = text
        for pattern in settings.REDACT_PATTERNS:
            expected = re.sub(pattern, MASK, expected)
        assert redactor.text(text) == expected, text


def test_a_pattern_is_skipped_only_when_a_literal_every_match_holds_is_missing(settings):
    redactor = build_redactor([], settings.REDACT_PATTERNS)
    needed = {scan.pattern.pattern: scan.needed for scan in redactor.pattern_scans}
    assert needed[settings.REDACT_PATTERNS[1]] == (("sk-",),)
    assert needed[settings.REDACT_PATTERNS[-1]] == (
        (
            "password",
            "passwd",
            "passphrase",
            "secret",
            "api",
            "private",
            "credential",
            "accountkey",
            "sharedaccesskey",
            "token",
        ),
    )
    for name in ("openai", "platform", "bearer", "email"):
        assert redactor.text(f"x {SECRETS[name]}") == f"x {MASK}", name
    assert redactor.text("task-42 of wf-7") == "task-42 of wf-7"


def test_the_default_keys_mask_the_usual_spellings_of_a_password(settings):
    redactor = build_redactor(settings.REDACT_KEYS, [])
    value = {"db_pwd": "a", "PWD": "b", "ssh_passphrase": "c", "pwds_tried": 2}
    assert redactor.value(value) == {"db_pwd": MASK, "PWD": MASK, "ssh_passphrase": MASK, "pwds_tried": 2}


def test_configured_keys_and_patterns_replace_the_defaults(settings):
    settings.REDACT_KEYS = ["ssn"]
    settings.REDACT_PATTERNS = [r"\d{3}-\d{2}-\d{4}"]
    assert redact({"ssn": "x", "password": "kept", "note": "id 123-45-6789"}) == {
        "ssn": MASK,
        "password": "kept",
        "note": f"id {MASK}",
    }


def test_a_canary_secret_in_task_input_never_appears_in_any_csv_or_jsonl(db, settings, tmp_path: Path):
    settings.TRAINING_DATA_DIR = tmp_path / "training"
    settings.TRAINING_EXPORT_DIR = tmp_path / "exports"
    agent = AgentFactory(system_prompt=f"Use the key {SECRETS['openai']}")
    task = TaskExecutionFactory(
        agent=agent,
        status=TaskExecution.Status.COMPLETED,
        input_data=secret_input(),
        output_data={"echo": secret_input()},
        error=f"failed with {SECRETS['bearer']}",
        started_at=T0,
        completed_at=T0,
    )
    EventFactory(
        event_type=EventType.TASK_COMPLETED,
        entity_id=task.execution_id,
        created_at=T0,
        payload={"input": secret_input()},
    )
    EventFactory(
        event_type=EventType.TOOL_EXECUTED,
        entity_type="tool",
        created_at=T0,
        payload={"tool_name": "http", "input_params": secret_input(), "output_result": {"token": SECRETS["password"]}},
    )
    MessageFactory(instance_id="t", agent=agent, role="user", content=secret_input()["question"], created_at=T0)
    MessageFactory(
        instance_id="t",
        agent=agent,
        role="assistant",
        content=f"Sure, using {SECRETS['platform']}",
        created_at=T0 + dt.timedelta(seconds=1),
    )
    # The CSV side (what the consumer and the store API write).
    store_agent_task(
        execution_id=task.execution_id,
        agent_id=agent.id,
        task_name=task.task_name,
        status="completed",
        input_data=secret_input(),
        output_data=secret_input(),
        error=SECRETS["bearer"],
        recorded_at=T0,
    )
    store_agent_event(event_type="agent_started", payload=secret_input(), created_at=T0)
    store_tool_execution(
        execution_id="x", agent_id=agent.id, tool_name="http", input_params=secret_input(), created_at=T0
    )
    # The JSONL side.
    call_command(
        "export_training_data", "--type", "all", "--start", "2024-03-05", "--end", "2024-03-05", "--no-progress"
    )

    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} >= {".csv", ".jsonl", ".json", ".md"}
    assert len([p for p in files if p.suffix == ".jsonl"]) == 6  # the conversations' keys file too
    for path in files:
        text = path.read_text("utf-8")
        assert CANARY not in text, f"{path} leaks the canary"
    tasks_csv = (tmp_path / "training" / "tasks" / "tasks_2024-03-05.csv").read_text()
    assert MASK in tasks_csv and "max_tokens" in tasks_csv


@pytest.mark.parametrize("value", ["not json", '{"a": 1}', '["ok", 3]'])
def test_redact_patterns_must_be_a_json_array_of_strings(value):
    with pytest.raises(ImproperlyConfigured, match="REDACT_PATTERNS"):
        Env({"REDACT_PATTERNS": value}).json_str_list("REDACT_PATTERNS", [])


def test_an_invalid_redact_pattern_stops_the_settings_from_loading():
    proc = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.test", "REDACT_PATTERNS": '["ok", "(unclosed"]'},
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "REDACT_PATTERNS: '(unclosed' is not a valid regular expression" in proc.stderr


# Credentials in shapes the log filter (observability/logs.py) masks and the training data's
# default REDACT_PATTERNS did not: a URL with an empty user (Redis's usual `redis://:pw@host`),
# and key/value pairs whose key or value is quoted (JSON or a Python literal inside a string:
# a tool's output, an error message quoting a request body).
LEAKY_TEXTS = {
    "redis_url": f"connect to redis://:{CANARY}@cache:6379/0 failed",
    "json_text": f'upstream said {{"password": "{CANARY}", "user": "bob"}}',
    "python_literal": f"config was {{'api_key': '{CANARY}'}}",
    "quoted_value": f'api_key="{CANARY}"',
    "json_token": f'{{"access_token":"{CANARY}","token_type":"bearer"}}',
}


def test_default_patterns_mask_url_credentials_with_an_empty_user_and_quoted_key_values(db):
    for name, text in LEAKY_TEXTS.items():
        masked = redact(text)
        assert CANARY not in masked, f"{name}: {masked!r}"
    # Nothing else is lost: token counts and plain words are kept.
    assert redact('{"tokens_used": 12, "max_tokens": 5}') == '{"tokens_used": 12, "max_tokens": 5}'
    assert redact("the password policy: at least 12 characters") == "the password policy: at least 12 characters"


def test_credentials_in_text_never_reach_a_csv_partition_or_a_jsonl_export(db, settings, tmp_path: Path):
    settings.TRAINING_DATA_DIR = tmp_path / "training"
    settings.TRAINING_EXPORT_DIR = tmp_path / "exports"
    agent = AgentFactory()
    output = {"body": LEAKY_TEXTS["json_text"], "log": LEAKY_TEXTS["redis_url"]}
    task = TaskExecutionFactory(
        agent=agent,
        status=TaskExecution.Status.COMPLETED,
        output_data=output,
        error=LEAKY_TEXTS["python_literal"],
        started_at=T0,
        completed_at=T0,
    )
    EventFactory(event_type=EventType.TASK_COMPLETED, entity_id=task.execution_id, created_at=T0, payload=output)
    store_agent_task(
        execution_id=task.execution_id,
        agent_id=agent.id,
        task_name=task.task_name,
        status="completed",
        output_data=output,
        error=LEAKY_TEXTS["quoted_value"],
        recorded_at=T0,
    )
    store_agent_event(event_type="agent_started", payload={"tool_output": LEAKY_TEXTS["json_token"]}, created_at=T0)
    call_command(
        "export_training_data", "--type", "all", "--start", "2024-03-05", "--end", "2024-03-05", "--no-progress"
    )

    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".csv", ".jsonl")]
    assert len(files) >= 3
    for path in files:
        assert CANARY not in path.read_text("utf-8"), f"{path} leaks the credential"


def test_a_percent_encoded_password_of_a_configured_url_is_masked_as_the_password_it_is(db, settings):
    # A password with reserved characters is percent-encoded in the URL; the client sends (and
    # a connection dump, an error or a tool's output shows) the decoded password.
    settings.CELERY_BROKER_URL = "redis://:Xy%40Zq%2F7w-k9Lm@cache:6379/0"
    decoded = "Xy@Zq/7w-k9Lm"
    masked = redact(f"connection_kwargs={{'host': 'cache', 'password': {decoded!r}}} auth with {decoded}")
    assert decoded not in masked, masked


def test_a_masked_key_and_a_key_spelled_as_the_mask_keep_both_values_in_either_order(db):
    assert sorted(redact({"alice@example.org": 1, "[REDACTED]": 2}).values()) == [1, 2]
    assert sorted(redact({"[REDACTED]": 2, "alice@example.org": 1}).values()) == [1, 2]


def test_a_quoted_secret_value_is_masked_whole_not_only_up_to_its_first_space_or_comma(db):
    # A value class that stops at a space, a comma or a semicolon leaked all of a quoted
    # passphrase but its first word.
    for text in (
        '{"password": "correct horse battery staple"}',
        "{'api_key': 'sk live, not a test'}",
        'secret="a;b;c horse"',
    ):
        masked = redact(text)
        assert "horse" not in masked and "live" not in masked and ";b" not in masked, masked
    # Unquoted values still end at the first separator (a query string, free text).
    assert redact("token=abc&x=1") == "[REDACTED]&x=1"
    assert redact('{"tokens_used": 12, "max_tokens": 5}') == '{"tokens_used": 12, "max_tokens": 5}'


AUTH = "c4n4ryAuthCredential9f"  # shaped like no other default pattern
AUTHORIZATION_TEXTS = {
    "basic": (f"Authorization: Basic {AUTH}==", MASK),
    "drf_token": (f"authorization: Token {AUTH}", MASK),
    "bare_key": (f"Authorization: {AUTH}", MASK),
    "proxy": (f"Proxy-Authorization: Basic {AUTH}", f"Proxy-{MASK}"),
    "django_meta": (f"'HTTP_AUTHORIZATION': 'Basic {AUTH}', 'HTTP_HOST': 'api'", f"'HTTP_{MASK}', 'HTTP_HOST': 'api'"),
    "digest": (
        f'Authorization: Digest username="bob", realm="api", nonce="n1", uri="/x", qop=auth, response="{AUTH}"',
        MASK,
    ),
    "aws_sigv4": (
        "Authorization: AWS4-HMAC-SHA256 Credential=AKID/20240305/us-east-1/s3/aws4_request, "
        f"SignedHeaders=host;x-amz-date, Signature={AUTH}",
        MASK,
    ),
    "json_text": (
        f'{{"Authorization": "ApiKey {AUTH}", "Accept": "application/json"}}',
        f'{{"{MASK}", "Accept": "application/json"}}',
    ),
    "json_escaped_quotes": (
        f'{{"Authorization": "Digest username=\\"bob\\", response=\\"{AUTH}\\"", "n": 1}}',
        f'{{"{MASK}", "n": 1}}',
    ),
    "python_repr": (f"{{'Authorization': 'Basic {AUTH}', 'Accept': '*/*'}}", f"{{'{MASK}', 'Accept': '*/*'}}"),
    "python_code": (f"headers['Authorization'] = 'Token {AUTH}'", f"headers['{MASK}'"),
    "header_pairs": (f"[(b'host', b'api'), (b'authorization', b'Basic {AUTH}')]", f"[(b'host', b'api'), (b'{MASK}')]"),
    "add_header": (f'req.add_header("Authorization", "Bearer-ish {AUTH}")', f'req.add_header("{MASK}")'),
    "request_dump": (
        f"POST /v1/charges HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Token {AUTH}\r\n"
        "Content-Length: 2\r\n\r\n{}",
        f"POST /v1/charges HTTP/1.1\r\nHost: api.example.com\r\n{MASK}\r\nContent-Length: 2\r\n\r\n{{}}",
    ),
    "curl": (
        f"curl -H 'Authorization: Basic {AUTH}' https://api.example.com/v1",
        f"curl -H '{MASK}' https://api.example.com/v1",
    ),
    "query_string": (f"GET /x?authorization=Basic%20{AUTH}&page=2", f"GET /x?{MASK}&page=2"),
}


def test_authorization_in_prose_is_kept_and_whatever_follows_the_header_label_is_masked(db):
    """The word, a list of header names or a Vary header are no credential; "Authorization:"
    followed by a word is taken for a header carrying a key sent without a scheme, which is
    what it looks like ("required" may be one)."""
    prose = (
        "basic arithmetic first; the authorization step failed.\n"
        "Vary: Authorization, Accept\n"
        'allow_headers: ["authorization", "content-type"]\n'
        "see {'authorization': {'scheme': 'basic'}}\n"
    )
    assert redact(prose + "Authorization: required") == prose + MASK


def test_header_names_xml_and_code_around_the_word_are_kept(db):
    """A list of header names whose second one follows "authorization" (a key sent without a
    scheme looks like no header name), an element that is not closed, a block of code or an
    indented sentence under "Authorization:" are no credential."""
    texts = [
        'CORS_ALLOW_HEADERS = ("authorization", "content-type", "x-b3-traceid", "content-md5")',
        'for name in ("HTTP_AUTHORIZATION", "HTTP_X_API_KEY"):',
        '["authorization", "Content-Type"]',
        "Use the <authorization> element; it holds the header's value.",
        "<p>Send the <code>Authorization</code> header.</p>",
        "<authorization></authorization>",
        "    if not authorization:\n        return None\n",
        "Authorization:\n  Users must sign in before they can edit a page.\n",
        'print("Authorization:", header_value)',
    ]
    for text in texts:
        assert redact(text) == text


# Shapes found in review: a header inside a JSON-encoded string (its quotes escaped), a JSON text
# inside a JSON string, a header's values as a list (API Gateway's multiValueHeaders, Go's
# http.Header, Java's Map<String, List<String>>), a Ruby/PHP hash and a long value that pprint
# splits into adjacent literals.
AUTHORIZATION_LEAKS = {
    "digest_in_json_string": (
        f'{{"msg": "Authorization: Digest username=\\"bob\\", response=\\"{AUTH}\\"", "n": 1}}',
        f'{{"msg": "{MASK}", "n": 1}}',
    ),
    "json_in_json_string": (
        f'{{"body": "{{\\"Authorization\\": \\"Basic {AUTH}\\", \\"Accept\\": \\"*/*\\"}}"}}',
        f'{{"body": "{{\\"{MASK}\\", \\"Accept\\": \\"*/*\\"}}"}}',
    ),
    "multi_value_json": (
        f'{{"multiValueHeaders": {{"Authorization": ["Basic {AUTH}"], "Accept": ["*/*"]}}}}',
        f'{{"multiValueHeaders": {{"{MASK}"], "Accept": ["*/*"]}}}}',
    ),
    "go_header": (
        f"map[Accept:[*/*] Authorization:[Basic {AUTH}]]",
        f"map[Accept:[*/*] {MASK}]",
    ),
    "java_map": (f"{{Authorization=[Token {AUTH}], Accept=[*/*]}}", f"{{{MASK}, Accept=[*/*]}}"),
    "ruby_hash": (f'{{ "Authorization" => "Basic {AUTH}" }}', f'{{ "{MASK}" }}'),
    "pprint_split": (
        f"{{'Authorization': 'Basic '\n                  '{AUTH * 4}'}}",
        f"{{'{MASK}'}}",
    ),
}


# Shapes the patterns above still missed: a pair whose value is a key sent without a scheme, an
# XML element, a label and its value as two print arguments, a YAML value on the next line.
AUTHORIZATION_MORE_LEAKS = {
    "pair_bare_key": (
        f'conn.request("GET", "/", headers=dict([("Authorization", "{AUTH}")]))',
        f'conn.request("GET", "/", headers=dict([("{MASK}")]))',
    ),
    "list_pair_bare_key": (
        f'new Headers([["Accept", "*/*"], ["Authorization", "{AUTH}"]])',
        f'new Headers([["Accept", "*/*"], ["{MASK}"]])',
    ),
    "set_header_bare_key": (f"xhr.setRequestHeader('Authorization', '{AUTH}')", f"xhr.setRequestHeader('{MASK}')"),
    "xml_basic": (
        f"<Headers><Authorization>Basic {AUTH}</Authorization></Headers>",
        f"<Headers><{MASK}</Authorization></Headers>",
    ),
    "xml_token": (f"<authorization>{AUTH}</authorization>", f"<{MASK}</authorization>"),
    "xml_attributes": (
        f"<ns:Authorization xmlns:ns=\"urn:x\" type='Bearer'>{AUTH}</ns:Authorization>",
        f"<ns:{MASK}</ns:Authorization>",
    ),
    "print_arguments": (f'print("Authorization:", "{AUTH}")', f'print("{MASK}")'),
    "print_arguments_in_json": (
        f'{{"code": "print(\\"Authorization:\\", \\"{AUTH}\\")"}}',
        f'{{"code": "print(\\"{MASK}\\")"}}',
    ),
    "yaml_next_line": (
        f"headers:\n  Authorization:\n    Basic {AUTH}\n  Accept: '*/*'\n",
        f"headers:\n{MASK}\n  Accept: '*/*'\n",
    ),
    "yaml_next_line_bare_key": (f"Authorization:\n  {AUTH}", MASK),
    "yaml_block_scalar": (f"authorization: >-\n    Basic {AUTH}\nnext: 1", f"{MASK}\nnext: 1"),
    "yaml_digest_next_line": (
        f'proxy-authorization:\r\n  Digest username="bob", response="{AUTH}"\r\nnext: 1',
        f"{MASK}\r\nnext: 1",
    ),
}


@pytest.mark.parametrize("name", [*AUTHORIZATION_TEXTS, *AUTHORIZATION_LEAKS, *AUTHORIZATION_MORE_LEAKS])
def test_authorization_credentials_are_masked_whatever_the_scheme(db, name):
    """Every scheme and shape: header lines, JSON, literals, dumps, and the nested, listed and
    split shapes (AUTHORIZATION_LEAKS, AUTHORIZATION_MORE_LEAKS)."""
    text, expected = {**AUTHORIZATION_TEXTS, **AUTHORIZATION_LEAKS, **AUTHORIZATION_MORE_LEAKS}[name]
    masked = redact(text)
    assert AUTH not in masked
    assert masked == expected
    assert redact(masked) == masked


def test_authorization_at_a_line_end_masks_nothing_of_the_next_line(db):
    """A header's value is on its line: "Authorization:" ending a line (a heading, Python code,
    an empty header in a request dump) leaves the next line alone."""
    texts = [
        "## Authorization:\nUsers must sign in before they can edit a page.",
        "    if not authorization:\n        raise HTTPException(status_code=401)\n",
        "GET / HTTP/1.1\r\nAuthorization: \r\nHost: api.example.com\r\n",
        # a nested YAML mapping (an OpenAPI security section, a config): keys, not a credential
        "security:\n  authorization:\n    type: oauth2\n    flow: implicit\n",
        "authorization:\n  enabled: true\n",
        # a YAML sequence under the key (roles, an OpenAPI security requirement's scopes)
        "roles:\n  authorization:\n    - admin\n    - editor\n",
        "security:\n  - authorization:\n      - read:pets\n      - write:pets\n",
        "authorization:\n  # admin\n",
    ]
    for text in texts:
        assert redact(text) == text
    # A quoted value may follow on the next line (pretty-printed JSON or Python), a string
    # prefix before its quote too (not taken for a bare key, the literal left in clear).
    assert AUTH not in redact(f'{{"Authorization":\n    "Basic {AUTH}"}}')
    for prefix in ("f", "b", "r", "rb"):
        assert AUTH not in redact(f'headers = {{\n    "Authorization":\n        {prefix}"Token {AUTH}",\n}}')
    # A value already masked stays as it is.
    assert redact(f"Authorization: {MASK}") == f"Authorization: {MASK}"


# Common shapes of credentials in free text (a tool's output, an error, a pasted config) that
# the default patterns let through.
COMMON_SECRET_TEXTS = {
    "env_secret_key": f"DJANGO_SECRET_KEY={CANARY}",
    "aws_secret": f"AWS_SECRET_ACCESS_KEY = {CANARY}",
    "python_setting": f"SECRET_KEY = '{CANARY}'",
    "private_key_value": f"private_key={CANARY}",
    "escaped_json_body": f'request body: {{\\"password\\": \\"{CANARY}\\"}}',
    "pem": f"-----BEGIN RSA PRIVATE KEY-----\nMIIEow{CANARY}\nAKCAQEA\n-----END RSA PRIVATE KEY-----",
    "pem_cut_off": f"-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn{CANARY}",
    "google": f"key AIzaSy{CANARY}0123456789abcdefghijklmn",
    "github_fine_grained": f"github_pat_11ABCDEFG0_{CANARY.replace('-', '')}abcdefghijklmnop",
    "gitlab": f"glpat-{CANARY}0123456789",
    "token_secret": f"oauth_token_secret: {CANARY}",
    "hugging_face": f"hf_{CANARY.replace('-', '')}abcdefghijklmnopqrstu",
    "stripe": f"sk_live_{CANARY.replace('-', '')}0123456789",
    "slack_webhook": f"https://hooks.slack.com/services/T000/B000/{CANARY}",
    "cookie": f"Cookie: sessionid={CANARY}; csrftoken=abc",
    "jwt": f"id eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.{CANARY}",
    "azure": f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={CANARY}==;EndpointSuffix=x",
    "curl_user": f"curl -u admin:{CANARY} https://api.example.org",
    "wget_user": f"wget --user=admin:{CANARY} https://api.example.org",
    "npm": f"npm_{CANARY.replace('-', '')}0123456789abcdefghij",
}


def test_default_patterns_mask_common_secret_shapes_in_free_text(db):
    for name, text in COMMON_SECRET_TEXTS.items():
        masked = redact(text)
        assert CANARY not in masked and CANARY.replace("-", "") not in masked, f"{name}: {masked!r}"
    # Words that only look like the keys, and token counts, are kept.
    kept = (
        "tokens_used: 5 of 100",
        "token_type: bearer",
        "the cookie jar",
        "max_tokens=5",
        "docker run -u 1000:1000 app",
    )
    for text in kept:
        assert redact(text) == text


def test_common_secret_shapes_never_reach_a_jsonl_export_and_the_lines_stay_json(db, settings, tmp_path: Path):
    settings.TRAINING_EXPORT_DIR = tmp_path / "exports"
    TaskExecutionFactory(
        status=TaskExecution.Status.COMPLETED,
        input_data={"texts": list(COMMON_SECRET_TEXTS.values())},
        output_data=COMMON_SECRET_TEXTS,
        started_at=T0,
        completed_at=T0,
    )
    call_command(
        "export_training_data", "--type", "tasks", "--start", "2024-03-05", "--end", "2024-03-05", "--no-progress"
    )

    (path,) = (tmp_path / "exports").rglob("*.jsonl")
    text = path.read_text("utf-8")
    assert CANARY not in text and CANARY.replace("-", "") not in text
    (record,) = [json.loads(line) for line in text.splitlines()]
    assert set(record["output_data"]) == set(COMMON_SECRET_TEXTS)


def test_a_numeric_user_group_and_a_cookie_in_prose_are_kept_and_a_numeric_password_is_masked(db):
    kept = (
        "docker run --user 1000:1000 app",
        "docker run --user=1000:1000 app",
        "docker run -u 0:0 app",
        "a fortune cookie: you will be rich",
        "I'd like a cookie: chocolate chip",
    )
    for text in kept:
        assert redact(text) == text
    # A password of digits is still a password; a cookie header still carries its session.
    assert redact("curl -u admin:482913 https://x.org") == f"curl {MASK} https://x.org"
    assert redact("curl --user bob:123456 https://x.org") == f"curl {MASK} https://x.org"
    assert redact(f"Set-Cookie: sid={CANARY}; Path=/; HttpOnly") == f"Set-{MASK}"
    assert CANARY not in redact(f'headers = {{"Cookie": "sessionid={CANARY}"}}')


def test_a_pem_armour_line_in_code_or_a_cut_off_key_in_json_text_masks_no_further_than_its_quote(db):
    code = (
        'if pem.startswith("-----BEGIN RSA PRIVATE KEY-----"):\n'
        '    kind = "rsa"\n'
        'elif pem.startswith("-----BEGIN CERTIFICATE-----"):\n'
        '    kind = "certificate"\n'
    )
    assert redact(code) == code.replace("-----BEGIN RSA PRIVATE KEY-----", MASK)
    # A key cut off inside a JSON text: masked up to its string's end, the text stays JSON.
    text = json.dumps({"pem": f"-----BEGIN PRIVATE KEY-----\nMIIE{CANARY}", "project_id": "demo"})
    masked = redact(text)
    assert CANARY not in masked
    assert json.loads(masked) == {"pem": MASK, "project_id": "demo"}


@pytest.mark.parametrize(
    "text",
    [
        "-u=" * 20_000 + ":",
        "--user=" * 9_000 + ":",
        "secret_" * 9_000,
        "password-" * 7_000,
        "-----BEGIN " + "PRIVATE KEY " * 10_000,
        "secret_length_" * 7_000,
        "password_hash-" * 7_000 + "=",
    ],
    ids=["-u", "--user", "secret_", "password-", "pem-label", "secret_length_", "password_hash-"],
)
def test_the_default_patterns_take_linear_time_over_runs_of_their_own_words(db, text):
    # Each word of the run was a new start searched to the run's end: seconds for 60 KB
    # (minutes for a megabyte), now milliseconds.
    started = time.perf_counter()
    redact(text)
    assert time.perf_counter() - started < 1.0


def test_a_mask_inside_json_text_inside_json_text_keeps_both_texts_json(db):
    # A tool's output quoting a request whose body is JSON text: the masks stop before an
    # escaped quote (eating its backslash left a bare quote that ended the outer string).
    body = {
        "cmd": f"curl https://x.org -u admin:{CANARY}",
        "header": f"Cookie: sid={CANARY}",
        "pem": f"-----BEGIN PRIVATE KEY-----\nMIIE{CANARY}",
        "run": "docker run -u 1000:1000 app",
    }
    text = json.dumps({"request": json.dumps(body)})
    masked = redact(text)
    assert CANARY not in masked
    assert json.loads(json.loads(masked)["request"]) == {
        "cmd": f"curl https://x.org {MASK}",
        "header": MASK,
        "pem": MASK,
        "run": "docker run -u 1000:1000 app",
    }


# Keys whose first word is a secret's but whose last word says they name something about it (code
# and config discussed in agent conversations): the key=value pattern masked them, and the text
# with them (`MIN_SECRET_LENGTH = 6` became `MIN_[REDACTED]`).
KEYS_NAMING_NO_SECRET = (
    "api_key_hash = abc123",
    "MIN_SECRET_LENGTH = 6",
    "api_key_env: OPENAI_API_KEY",
    "private_key_path = /etc/x.pem",
    "credentials_url = https://example.org/creds",
    "password_min_length=8",
    "secret_name: prod-db",
    "api_key_id = 42",
    "SECRET_KEY_LENGTH = 50",
    '"credentials_file": "~/.aws/credentials"',
    "token_count: 512",
    "max_tokens=1024",
    "token_type: bearer",
)
# ...and the keys next to them that name a secret: masked as before.
NEAR_MISSES = {
    "db_password": f"DB_PASSWORD={CANARY}",
    "aws_secret": f"AWS_SECRET_ACCESS_KEY = {CANARY}",
    "api_key_sk": f"api_key: sk-{CANARY}",
    "rails_secret_key_base": f"secret_key_base={CANARY}",
    "password_hash": f"password_hash = pbkdf2_sha256$600000${CANARY}",
    "db_password_hash": f"DB_PASSWORD_HASH: {CANARY}",
    "passwd_hash": f"passwd-hash={CANARY}",
    "vault_secret_id": f"VAULT_SECRET_ID={CANARY}",
    "secret_id_quoted": f'"secret_id": "{CANARY}"',
    "hash_not_last": f"api_key_hash_value = {CANARY}",
    "cognito_secret_hash": f"SECRET_HASH={CANARY}",
    "keystone_token_id": f"token_id: {CANARY}",
    "token_ids": f"token-ids={CANARY}",
    "client_secret_hash": f"client_secret_hash = {CANARY}",
    "env_not_last": f"API_KEY_ENV_VALUE={CANARY}",
    "word_not_whole": f"secret_idx={CANARY}",
    "name_run_on": f"secret_names2={CANARY}",
    "url_with_credentials": f"credentials_url = https://bob:{CANARY}@example.org/x",
    "path_holding_a_key": f"private_key_path = '-----BEGIN PRIVATE KEY-----\\nMIIE{CANARY}'",
    "token": f"token: {CANARY}",
    "secret_token": f"secret_token={CANARY}",
}


@pytest.mark.parametrize("text", KEYS_NAMING_NO_SECRET)
def test_a_key_naming_something_about_a_secret_is_kept_in_free_text(db, text):
    assert redact(text) == text


@pytest.mark.parametrize("name", NEAR_MISSES)
def test_a_key_naming_a_secret_next_to_the_kept_ones_is_still_masked(db, name):
    masked = redact(NEAR_MISSES[name])
    assert CANARY not in masked, masked


@pytest.mark.parametrize("word", sorted(NOT_SECRET_LAST_WORDS))
def test_the_default_pattern_and_the_json_keys_keep_the_same_last_words(db, settings, word):
    # The default key=value pattern (settings) spells the words of NOT_SECRET_LAST_WORDS.
    redactor = build_redactor(settings.REDACT_KEYS, settings.REDACT_PATTERNS)
    for key in (f"api_key_{word}", f"CLIENT_SECRET_KEY_{word.upper()}", f"private-key-{word}"):
        assert redactor.text(f"{key} = value1") == f"{key} = value1"
        assert not redactor.key_is_secret(key), key
    assert redactor.text(f"api_key_{word}_x = value1") == MASK
    assert redactor.key_is_secret(f"api_key_{word}_x")


def test_token_accounting_and_keys_naming_something_about_a_secret_are_kept_as_json_keys(db):
    kept = {
        "usage": {"max_tokens": 1024, "token_count": 512, "total_tokens": 900, "prompt_tokens": 400},
        "token_type": "bearer",
        "tokenCount": 3,
        "api_key_env": "OPENAI_API_KEY",
        "secret_name": "prod-db",
        "credentials_path": "/etc/creds.json",
    }
    assert redact(kept) == kept
    masked = {
        "secret_id": "a",
        "secretId": "b",
        "password_hash": "c",
        "pwdHash": "d",
        "access_token": "e",
        "client_secret": "f",
        "api_key": "g",
        "private_key_pem": "h",
        "SECRET_HASH": "i",
        "token_id": "j",
        "subjectTokenId": "k",
    }
    assert redact(masked) == dict.fromkeys(masked, MASK)


def test_a_configured_key_ending_in_a_kept_word_is_still_masked():
    redactor = build_redactor(["session_id", "token"], [])
    assert redactor.value({"session_id": "a", "user_session_id": "b", "token_count": 1}) == {
        "session_id": MASK,
        "user_session_id": MASK,
        "token_count": 1,
    }


def test_a_configured_word_of_personal_data_masks_its_hash_and_name_too():
    # The last words say a credential's key names no secret (a token's count, an API key's hash):
    # a hash or a type of personal data (an SSN, an email address) can be turned back into it.
    redactor = build_redactor(["ssn", "email", "token"], [])
    assert redactor.value({"ssn_hash": "h", "email_hash": "e", "email_type": "work", "token_count": 3}) == {
        "ssn_hash": MASK,
        "email_hash": MASK,
        "email_type": MASK,
        "token_count": 3,
    }


def test_keys_naming_no_secret_reach_a_jsonl_export_unmasked_and_their_neighbours_do_not(db, settings, tmp_path):
    settings.TRAINING_EXPORT_DIR = tmp_path / "exports"
    TaskExecutionFactory(
        status=TaskExecution.Status.COMPLETED,
        input_data={"prompt": "call it with max_tokens=1024; api_key_hash = 5f2a9c", "max_tokens": 1024},
        output_data={"usage": {"token_count": 512, "total_tokens": 900}, "token_type": "bearer", **NEAR_MISSES},
        started_at=T0,
        completed_at=T0,
    )
    call_command(
        "export_training_data", "--type", "tasks", "--start", "2024-03-05", "--end", "2024-03-05", "--no-progress"
    )

    (path,) = (tmp_path / "exports").rglob("*.jsonl")
    text = path.read_text("utf-8")
    assert CANARY not in text
    (record,) = [json.loads(line) for line in text.splitlines()]
    assert record["input_data"] == {"prompt": "call it with max_tokens=1024; api_key_hash = 5f2a9c", "max_tokens": 1024}
    assert record["output_data"]["usage"] == {"token_count": 512, "total_tokens": 900}
    assert record["output_data"]["token_type"] == "bearer"


def test_the_gate_needs_a_url_scheme_for_the_url_credentials_pattern_not_a_colon(settings):
    # Nearly every text holds a colon: the gate let ~94% of plain text through to the patterns.
    redactor = build_redactor([], settings.REDACT_PATTERNS)
    (url_scan,) = [scan for scan in redactor.pattern_scans if scan.pattern.pattern.startswith("(?<=://)")]
    assert ("://",) in url_scan.needed
    assert redactor.gate.search("note: step 2 of 3 is done, see the log: nothing failed") is None
    assert redactor.text("connect to redis://:pw123@cache:6379 failed") == f"connect to redis://{MASK}cache:6379 failed"


def test_a_tokens_hash_is_masked_it_is_what_a_magic_link_logs_in_with(db):
    # Supabase's sign-in links carry `?token_hash=...`, which its verify endpoint takes in a JSON
    # body as the login: kept as a key naming something about a token (its last word "hash").
    link = f"https://abc.supabase.co/auth/v1/verify?token_hash=pkce_{CANARY}&type=magiclink"
    assert CANARY not in redact(link)
    assert CANARY not in redact(f"secret_token_hash={CANARY}")
    body = {"type": "email", "token_hash": CANARY, "tokenHash": CANARY, "refresh_token_hash": CANARY}
    assert redact(body) == {"type": "email", **dict.fromkeys(["token_hash", "tokenHash", "refresh_token_hash"], MASK)}
    # the hash of an API key, or of a secret, stays kept (stored to compare, not sent to log in)
    assert redact({"api_key_hash": "5f2a", "text": "api_key_hash = 5f2a"}) == {
        "api_key_hash": "5f2a",
        "text": "api_key_hash = 5f2a",
    }
