"""The batch pre-check (`Redactor.dirty`), configured secret values, and every text column of
every exported record going through the redactor."""

from __future__ import annotations

import csv
import datetime as dt
import gc
import io
import json
import random
from pathlib import Path

import orjson
import pytest
from django.core.management import call_command

from orchestration.event_types import EventType
from orchestration.models import TaskExecution
from tests.factories import AgentFactory, EventFactory, MessageFactory, TaskExecutionFactory
from training_export.services.export import export_run
from training_export.services.redaction import MASK, build_redactor, current_redactor
from training_export.services.store import TrainingDataStore, _csv_line, store_agent_event, store_agent_task

DAY = dt.date(2024, 3, 5)
T0 = dt.datetime(2024, 3, 5, 10, 0, tzinfo=dt.UTC)
# Shaped like no default pattern: only the configured-secret rule can catch it.
CANARY = "plaincanary7f3a9c1e5bvalue"


def fragments() -> list[str]:
    return [
        "sk-",
        "abcdefghijklmnopqrstu",
        "@",
        "example.org",
        "bob",
        '"',
        "\\",
        "token",
        "Token",
        " = ",
        ":",
        "://",
        "user",
        "pw",
        "Bearer ",
        "AKIA",
        "0123456789ABCDEF",
        "é",
        "\n",
        "-",
        "_",
        "api",
        "key",
        CANARY[:9],
        CANARY,
        "",
    ]


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(fragments()) for _ in range(rng.randint(0, 6)))


def random_json(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randint(0, 5 if depth < 3 else 2)
    if kind == 0:
        return random_text(rng)
    if kind == 1:
        return rng.choice([1, 2.5, None, True])
    if kind == 2:
        return rng.randint(0, 10**6)
    if kind == 3:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    keys = ["note", "max_tokens", "access_token", "apiKey", "user", "x", random_text(rng)]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}


@pytest.mark.parametrize("seed", range(4))
def test_a_record_the_batch_check_clears_is_unchanged_by_the_full_redaction(settings, seed):
    redactor = build_redactor(settings.REDACT_KEYS, settings.REDACT_PATTERNS, [CANARY])
    assert redactor.joinable
    rng = random.Random(seed)
    texts, json_texts, values = [], [], []
    for _ in range(400):
        texts.append([random_text(rng) for _ in range(rng.randint(0, 3))])
        value = random_json(rng)
        values.append([value])
        # Both encoders' escapes: the standard library's \uXXXX and \" and orjson's raw UTF-8.
        encode = json.dumps if rng.random() < 0.5 else (lambda v: orjson.dumps(v).decode())
        json_texts.append([encode(value)])
    dirty = redactor.dirty(texts, json_texts, values)
    assert 0 < len(dirty) < 400
    for index in set(range(400)) - dirty:
        assert [redactor.text(text) for text in texts[index]] == texts[index]
        assert redactor.value(values[index][0]) == values[index][0]


def test_matches_hidden_by_json_escapes_are_still_found(settings):
    redactor = build_redactor(settings.REDACT_KEYS, settings.REDACT_PATTERNS, [CANARY])
    values = [
        {"note": "sk-abcdefghijklmnopqrstu"},
        {"note": "mail bob@example.org"},
        {"note": CANARY},
        {"password": "x"},
        {"note": "plain"},
    ]
    raw = [
        r'{"note": "sk\u002dabcdefghijklmnopqrstu"}',
        r'{"note": "mail bob\u0040example.org"}',
        '{"note": "' + CANARY[:5] + r"\u00" + CANARY[5:].encode().hex()[:2] + CANARY[6:] + '"}',
        r'{"pass\u0077ord": "x"}',
        r'{"note": "pl\u0061in"}',
    ]
    assert [json.loads(text) for text in raw] == values
    assert redactor.dirty([[]] * 5, [[text] for text in raw], [[value] for value in values]) == {0, 1, 2, 3}


def test_patterns_whose_matches_depend_on_the_string_edge_disable_the_batch_check():
    # x?(?!\B) matches an empty string alone, but not between the quotes of the joined text.
    for pattern in (r"^sk-\w+", r"\w+$", r'x(?<!")y', r"(?<=.)abc", r"\Aabc", r"x?(?!\B)", r"a\Bb"):
        redactor = build_redactor([], [pattern])
        assert not redactor.joinable, pattern
        assert redactor.dirty([["abc"], ["x"]], [[], []], [[], []]) == {0, 1}
    assert build_redactor([], [r"\bsk-\w+", r"(?<![a-z])key=\S+"]).joinable
    edge = build_redactor(["token"], [r"x?(?!\B)"])
    assert edge.text("") == MASK and edge.dirty([[""]], [[]], [[]]) == {0}


def test_csv_lines_are_the_bytes_the_csv_module_writes():
    rng = random.Random(7)
    alphabet = ["a", ",", '"', "\r", "\n", " ", "\t", "\x00", "é", "\u2028", "\\", ""]
    for _ in range(20_000):
        cells = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 4))) for _ in range(rng.randint(1, 5))]
        buffer = io.StringIO()
        csv.writer(buffer, quoting=csv.QUOTE_MINIMAL, lineterminator="\n").writerow(cells)
        line = _csv_line(cells)
        assert list(csv.reader(io.StringIO(line, newline=""))) == [cells], cells
        if not any("\r" in cell for cell in cells):  # the 3.11 writer leaves a lone one bare
            assert line == buffer.getvalue(), cells


def test_configured_secret_values_are_masked_inside_any_string(settings):
    settings.SECRET_KEY = f"django-{CANARY}"
    redactor = current_redactor()
    assert f"django-{CANARY}" in redactor.secrets
    assert redactor.text(f"key=django-{CANARY}!") == f"key={MASK}!"
    assert redactor.value({"deep": [f"x django-{CANARY} " * 20]}) == {"deep": [f"x {MASK} " * 20]}
    settings.SECRET_KEY = "another-django-secret-value"
    assert f"django-{CANARY}" not in current_redactor().secrets, "a settings change is picked up"


def test_a_configured_secret_never_appears_in_any_csv_or_jsonl(db, settings, monkeypatch, tmp_path: Path):
    """A canary equal to configured secrets (SECRET_KEY, a provider key named by LOG_REDACT_ENV)
    placed in a task input, an event payload and a conversation message."""
    settings.TRAINING_DATA_DIR = tmp_path / "training"
    settings.TRAINING_EXPORT_DIR = tmp_path / "exports"
    provider_key = f"provider{CANARY}"
    monkeypatch.setenv("EXTRA_PROVIDER_KEY", provider_key)
    settings.LOG_REDACT_ENV = ["EXTRA_PROVIDER_KEY"]
    settings.SECRET_KEY = CANARY
    agent = AgentFactory(system_prompt=f"never say {CANARY}")
    task = TaskExecutionFactory(
        agent=agent,
        status=TaskExecution.Status.COMPLETED,
        input_data={"question": f"use {CANARY}", "list": [provider_key]},
        output_data={"answer": f"ok {provider_key}"},
        error=f"failed near {CANARY}",
        task_name=f"task {CANARY}",
        started_at=T0,
        completed_at=T0,
    )
    EventFactory(
        event_type=EventType.TASK_COMPLETED,
        entity_id=task.execution_id,
        session_id=CANARY,
        created_at=T0,
        payload={"input": {"text": f"x{CANARY}y"}},
    )
    EventFactory(
        event_type=EventType.TOOL_EXECUTED,
        entity_type="tool",
        created_at=T0,
        payload={"tool_name": "http", "input_params": {"q": provider_key}, "error": CANARY},
    )
    MessageFactory(instance_id="t", agent=agent, role="user", content=f"my key is {provider_key}", created_at=T0)
    MessageFactory(
        instance_id="t", agent=agent, role="assistant", content=f"noted {CANARY}", created_at=T0 + dt.timedelta(1)
    )
    store_agent_task(
        execution_id=task.execution_id,
        agent_id=agent.id,
        task_name="t",
        status="completed",
        input_data={"question": f"use {CANARY}"},
        error=provider_key,
        recorded_at=T0,
    )
    store_agent_event(event_type="agent_started", agent_id=CANARY, payload={"p": provider_key}, created_at=T0)
    call_command(
        "export_training_data", "--type", "all", "--start", "2024-03-05", "--end", "2024-03-06", "--no-progress"
    )
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert {path.suffix for path in files} >= {".csv", ".jsonl"}
    assert len([path for path in files if path.suffix == ".jsonl"]) >= 5
    for path in files:
        assert "plaincanary" not in path.read_text("utf-8"), f"{path} leaks the configured secret"
    events = (tmp_path / "exports" / "events").rglob("events-train.jsonl")
    records = [json.loads(line) for path in events for line in path.read_text().splitlines()]
    assert any(record["session_id"] == MASK for record in records)


def test_every_text_column_of_an_event_record_is_redacted_but_the_event_id(db, settings, tmp_path: Path):
    settings.TRAINING_EXPORT_DIR = tmp_path
    event = EventFactory(
        event_type=EventType.TASK_STARTED,
        entity_id="bob@example.org",
        workflow_id="wf-1",
        agent_id="sk-abcdefghijklmnopqrstu",
        source="platform",
        created_at=T0,
        payload={"note": "clean"},
    )
    clean = EventFactory(event_type=EventType.TASK_STARTED, entity_id="task-2", created_at=T0, payload={"a": "b"})
    run = export_run(data_type="events", start_date=DAY, end_date=DAY)
    first, second = (json.loads(line) for line in Path(run.path).read_text().splitlines())
    assert first["event_id"] == event.event_id
    assert (first["entity_id"], first["agent_id"], first["workflow_id"]) == (MASK, MASK, "wf-1")
    assert second["entity_id"] == "task-2" and second["payload"] == {"a": "b"} and second["event_id"] == clean.event_id


def test_tool_call_ids_and_names_in_chat_exports_are_redacted(db, settings, tmp_path: Path):
    """A call's id is free text: masked where it holds a secret. A function's name that holds
    one would be masked into a name OpenAI refuses ("[REDACTED]"): its thread is skipped and
    counted, and the secret is in no file."""
    settings.TRAINING_EXPORT_DIR = tmp_path
    agent = AgentFactory(config={"tools": ["calculator"]})
    leaky = AgentFactory(config={"tools": ["calculator", "sk-abcdefghijklmnopqrstuvw"]})
    secret_id = "call bob@example.org"
    for instance_id, owner, name in (("t-1", agent, "calculator"), ("t-2", leaky, "lookup bob@example.org")):
        for i, fields in enumerate(
            [
                {"role": "user", "content": "q"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {"id": secret_id, "type": "function", "function": {"name": name, "arguments": "{}"}}
                    ],
                },
                {"role": "tool", "content": "ok", "tool_call_id": secret_id},
                {"role": "assistant", "content": "done"},
            ]
        ):
            MessageFactory(instance_id=instance_id, agent=owner, created_at=T0 + dt.timedelta(seconds=i), **fields)
    run = export_run(data_type="conversations", start_date=DAY, end_date=DAY)
    directory = Path(run.path).parent
    text = Path(run.path).read_text()
    for written in (text, (directory / "manifest.json").read_text(), (directory / "README.md").read_text()):
        assert "bob@example.org" not in written and "sk-abcdefghijklmnopqrstuvw" not in written
    (example,) = (json.loads(line) for line in text.splitlines())
    call = example["messages"][1]["tool_calls"][0]
    assert call["id"] == f"call {MASK}" == example["messages"][2]["tool_call_id"]
    assert call["function"]["name"] == "calculator"
    [(reason, count)] = json.loads((directory / "manifest.json").read_text())["skipped"].items()
    assert "a function name is 1-64 letters, digits, _ or -" in reason and count == 1


def test_store_rows_the_batch_check_cannot_clear_are_redacted_value_by_value(settings, tmp_path: Path):
    store = TrainingDataStore(tmp_path)
    rows = [
        {"event_id": "e1", "event_type": "x", "created_at": T0, "payload": {"note": "clean", "n": 1}},
        {"event_id": "e2", "event_type": "x", "created_at": T0, "payload": {"api_key": "v", "max_tokens": 3}},
        {"event_id": "e3", "event_type": "bob@example.org", "created_at": T0, "payload": {}},
    ]
    store.write_rows("events", DAY, rows)
    (_, *lines) = store.path("events", DAY).read_text().splitlines()
    assert lines[0].endswith('"{""n"":1,""note"":""clean""}"')
    assert lines[1].endswith(f'"{{""api_key"":""{MASK}"",""max_tokens"":3}}"')
    assert lines[2].startswith(f"e3,,{MASK},")


def test_the_consumer_turns_the_cyclic_collector_back_on_after_a_batch(tmp_path: Path):
    from training_export.services.synapse import BatchResult, SynapseConsumer, WrittenBatch

    consumer = SynapseConsumer(client=None, store=TrainingDataStore(tmp_path), stream="s", group="g", consumer="c")
    seen = []

    def write(entries):
        seen.append(gc.isenabled())
        return WrittenBatch(entry_ids=[], dead=[], result=BatchResult())

    consumer.write = write
    assert gc.isenabled()
    consumer.process([])
    assert seen == [False] and gc.isenabled()


def test_json_escapes_are_decoded_as_a_json_parser_decodes_them():
    from training_export.services.redaction import _json_unescape

    rng = random.Random(3)
    alphabet = ["a", "\\", '"', "/", "\n", "\t", "\b", "é", "\u2028", "\x01", "\\u", "😀", "n"]
    for _ in range(20_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        for encoded in (json.dumps(text), json.dumps(text, ensure_ascii=False), orjson.dumps(text).decode()):
            assert _json_unescape(encoded) == f'"{text}"', encoded
    assert _json_unescape(r'"\ud800"') is None, "a lone surrogate is left to the full walk"


def test_json_escapes_of_a_batch_are_decoded_as_each_text_alone():
    from training_export.services.redaction import _json_unescape, _json_unescape_many

    rng = random.Random(5)
    alphabet = ["a", "\\", "\\\\", '"', "/", "\n", "\t", "\b", "é", "\x00", "\x01", "\\u", "😀", "n", "u"]
    for _ in range(3_000):
        texts = []
        for _ in range(rng.randint(0, 6)):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
            encode = rng.choice(
                [
                    lambda t: json.dumps(t, separators=(",", ":")),
                    lambda t: json.dumps(t, separators=(",", ":"), ensure_ascii=False),
                    orjson.dumps,
                ]
            )
            encoded = encode({"k": text, "v\\": [text]})
            texts.append(encoded.decode() if isinstance(encoded, bytes) else encoded)
        assert _json_unescape_many(texts) == [_json_unescape(text) for text in texts], texts
        assert _json_unescape_many(texts) == [json_text_decoded(text) for text in texts], texts


def json_text_decoded(text: str) -> str:
    """What decoding every escape of valid JSON text gives, from a JSON parser."""
    value = json.loads(text)
    return '{"k":"%s","v\\":["%s"]}' % (value["k"], value["v\\"][0])  # noqa: UP031


API_AGENT_KEY = f"vllm{CANARY}token"  # no pattern knows it: only its value can mask it


def test_the_key_of_an_agent_made_through_the_api_is_masked_by_value_within_the_refresh(db, monkeypatch):
    """Agents made through the API have no definition file: the variable their api_key_env
    names is read from the agents table, again every SECRETS_REFRESH_SECONDS."""
    from training_export.services import redaction

    monkeypatch.setenv("API_ONLY_PROVIDER_API_KEY", API_AGENT_KEY)
    assert API_AGENT_KEY not in redaction.configured_secret_values(refresh=True)
    AgentFactory(api_key_env="API_ONLY_PROVIDER_API_KEY")
    assert API_AGENT_KEY not in redaction.configured_secret_values(), "read again only after the interval"
    monkeypatch.setattr(redaction, "SECRETS_REFRESH_SECONDS", 0.0)
    assert API_AGENT_KEY in redaction.configured_secret_values()
    assert current_redactor().text(f"401 for key {API_AGENT_KEY}.") == f"401 for key {MASK}."


def test_when_the_agents_table_cannot_be_read_its_names_as_last_read_are_kept(db, monkeypatch):
    from django.db import ProgrammingError

    from training_export.services import redaction

    monkeypatch.setenv("API_ONLY_PROVIDER_API_KEY", API_AGENT_KEY)
    AgentFactory(api_key_env="API_ONLY_PROVIDER_API_KEY")
    assert API_AGENT_KEY in redaction.configured_secret_values(refresh=True)

    # A real failed read on PostgreSQL (the table gone, as before its migration ran).
    monkeypatch.setattr("orchestration.models.Agent._meta.db_table", "no_such_table")
    with pytest.raises(ProgrammingError):
        redaction.table_key_env_names()
    assert API_AGENT_KEY in redaction.configured_secret_values(refresh=True)


def test_reading_the_agents_table_inside_a_failed_savepoint_leaves_the_transaction_usable(db, monkeypatch):
    """The relay and the exporter ask for the redactor inside their transactions."""
    from django.db import connection, transaction

    from training_export.services import redaction

    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        monkeypatch.setattr("orchestration.models.Agent._meta.db_table", "no_such_table")
        redaction.configured_secret_values(refresh=True)  # the read fails in its savepoint
        monkeypatch.undo()
        assert TaskExecution.objects.count() == 0, "the transaction goes on"


def authorization_fragments() -> list[str]:
    """Pieces of Authorization headers in every shape the default pattern knows, and of the
    texts around them; nothing another default pattern matches."""
    return [
        "Authorization",
        "authorization",
        "Proxy-",
        "HTTP_",
        '"',
        "'",
        "b'",
        "(",
        "]",
        ": ",
        ":",
        "=",
        ", ",
        " ",
        "\t",
        "\n",
        "\r\n",
        "Basic ",
        "Digest ",
        'realm="x"',
        "dXNlcjpw",
        "==",
        "\\",
        "{",
        "[",
        ";",
        "&",
        "é",
        "",
        # (a pair's bare key, an XML element, print arguments, a YAML value on the next line)
        "<",
        "</",
        ">",
        ">-",
        "|",
        "  ",
        ")",
        "k3y.",
        "- ",
    ]


@pytest.mark.parametrize("seed", range(4))
def test_the_batch_check_finds_authorization_credentials_and_clears_only_unchanged_records(settings, seed):
    """The Authorization pattern keeps the batch check on: it is joinable, and it is searched
    only where its literal prefix stands. A record it clears is unchanged by the full redaction;
    the records holding a header are found."""
    redactor = build_redactor(settings.REDACT_KEYS, settings.REDACT_PATTERNS, [CANARY])
    assert redactor.joinable
    (scan,) = [scan for scan in redactor.pattern_scans if scan.prefixes == ("authorization",)]
    assert scan.needed == (("authorization",),)
    rng = random.Random(seed)
    pieces = authorization_fragments()
    texts, json_texts, values = [], [], []
    for _ in range(400):
        texts.append(["".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))])
        value = {"note": "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))}
        values.append([value])
        encode = json.dumps if rng.random() < 0.5 else (lambda v: orjson.dumps(v).decode())
        json_texts.append([encode(value)])
    dirty = redactor.dirty(texts, json_texts, values)
    changed = {
        index
        for index in range(400)
        if redactor.text(texts[index][0]) != texts[index][0] or redactor.value(values[index][0]) != values[index][0]
    }
    assert changed, "the fragments make headers"
    assert changed <= dirty < set(range(400))
    # A header in a text, prose around the word, a header in a JSON text (its quotes escaped).
    records = [
        ['GET / HTTP/1.1\r\nAuthorization: Digest username="bob", response="abc"'],
        ["the authorization step failed; basic arithmetic"],
        [],
    ]
    header = {"dump": 'Proxy-Authorization: Digest response="abc"'}
    assert redactor.dirty(records, [[], [], [json.dumps(header)]], [[], [], [header]]) == {0, 2}


def test_the_batch_check_finds_the_pair_xml_print_and_yaml_shapes(settings):
    """A record holding a header in one of these shapes is found (redaction changes it); the
    prose and code around the word are cleared."""
    redactor = build_redactor(settings.REDACT_KEYS, settings.REDACT_PATTERNS, [CANARY])
    assert redactor.joinable
    found = [
        'headers=[("Authorization", "k3yvalue0a1b2c")]',
        "<Authorization>Basic dXNlcjpw</Authorization>",
        'print("Authorization:", "k3yvalue0a1b2c")',
        "headers:\n  Authorization:\n    Basic dXNlcjpw\n",
        "authorization: >-\n  k3yvalue0a1b2c",
    ]
    kept = ['("authorization", "content-type")', "    if not authorization:\n        return None", "<authorization>"]
    # (the kept first: a match found in the joined text may run on into the records after it)
    texts = [[text] for text in kept + found]
    values = [{"note": text} for text in kept + found]
    for text in found:
        assert redactor.text(text) != text
    for text in kept:
        assert redactor.text(text) == text
    expected = set(range(len(kept), len(texts)))
    assert redactor.dirty(texts, [[]] * len(texts), [[]] * len(texts)) == expected
    json_texts = [[json.dumps(value)] for value in values]
    assert redactor.dirty([[]] * len(values), json_texts, [[value] for value in values]) == expected
