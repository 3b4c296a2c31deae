"""The batch check of JSON keys (`Redactor.dirty`) finds every record holding a key that
`key_is_secret` names (the full walk's answer), whatever the encoder's escapes, case changes or
non-ASCII characters; a record it clears is unchanged by the full redaction."""

from __future__ import annotations

import json
import random

import orjson
import pytest

from training_export.services.redaction import Redactor, build_redactor

KEY_FRAGMENTS = ["token", "Token", "TOKEN", "tokens", "my", "_", "-", "\n", "\t", "\\", '"', "é", "api", "Key"]
KEY_FRAGMENTS += ["key", "x", "1", "\u212a", "/", "s", "pass", "word", "Password", "credential", "credentials", " "]
KEY_FRAGMENTS += ["_count", "Type", "_id", "Id", "hash", "secret", "_env"]  # last words that make a key no secret's


def random_key(rng: random.Random) -> str:
    return "".join(rng.choice(KEY_FRAGMENTS) for _ in range(rng.randint(0, 5)))


def random_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randint(0, 4 if depth < 3 else 1)
    if kind == 0:
        return random_key(rng)
    if kind == 1:
        return rng.choice([1, None, True, 2.5])
    if kind == 2:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {random_key(rng): random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


@pytest.mark.parametrize("seed", range(3))
def test_every_record_holding_a_secret_key_is_dirty(settings, seed):
    redactor = build_redactor(settings.REDACT_KEYS, settings.REDACT_PATTERNS)
    rng = random.Random(seed)
    for _ in range(40):
        values = [random_value(rng) for _ in range(50)]
        encoders = [json.dumps, lambda v: json.dumps(v, ensure_ascii=False), lambda v: orjson.dumps(v).decode()]
        texts = [[rng.choice(encoders)(value)] for value in values]
        dirty = redactor.dirty([[] for _ in values], texts, [[value] for value in values])
        holding = {index for index, value in enumerate(values) if redactor._holds_secret_key(value)}
        assert holding <= dirty
        for index in set(range(len(values))) - dirty:
            assert redactor.value(values[index]) == values[index]


def test_keys_are_found_through_escapes_and_case_changes_and_values_are_not_keys(settings):
    # Keys alone: the default key=value pattern masks `"token": 1` inside a string's text.
    redactor = build_redactor(settings.REDACT_KEYS, [])
    values = [
        {"a\ntoken": 1},  # \n in the raw text: the word starts after the escape
        {"x": {"myToken": 2}},  # camelCase
        {"X-Auth-TOKEN": 3},
        {"list": [{"deep": {"API_KEY": 4}}]},
        {'quoted "password"': 5},
        {"tokens_used": 6, "max_tokens": 7, "note": "token", "tokenizer": "bpe"},  # none of them
        {"note": 'a value: {"token": 1}'},  # a key only in a string's text: not a key
    ]
    texts = [[orjson.dumps(value).decode()] for value in values]
    assert redactor.dirty([[] for _ in values], texts, [[value] for value in values]) == {0, 1, 2, 3, 4}


def test_a_string_is_looked_at_once_however_often_it_holds_a_key_word(settings, monkeypatch):
    """A tool output holding a JSON document as a string repeats `token_type` thousands of
    times; looking at each hit would cost hits x string length (minutes for 200 KB)."""
    redactor = build_redactor(settings.REDACT_KEYS, settings.REDACT_PATTERNS)
    calls = []
    original = Redactor._key_at

    def counting(self, text, position):
        calls.append(position)
        return original(self, text, position)

    monkeypatch.setattr(Redactor, "_key_at", counting)
    document = json.dumps([{"id": i, "token_type": "bearer", "expires_in": 3600} for i in range(3000)])
    values = [{"output_result": document}, {"note": "the token " * 5000}, {"access_token": "x"}]
    texts = [[json.dumps(value)] for value in values]
    dirty = redactor.dirty([[] for _ in values], texts, [[value] for value in values])
    assert dirty == {2}
    assert len(calls) <= 2 * len(values)  # at most once per string and key word


def test_overlapping_pattern_hits_still_mark_their_record(settings):
    redactor = build_redactor(settings.REDACT_KEYS, settings.REDACT_PATTERNS)
    values = ["plain", "sk-" * 20_000, "plain too"]
    dirty = redactor.dirty([[value] for value in values], [[] for _ in values], [[] for _ in values])
    assert dirty == {1}
    assert redactor.text(values[1]) != values[1]
