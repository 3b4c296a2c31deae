"""Redaction of secrets and configured PII before anything is written to a training file.

One function, `redact`, is applied to every value the CSV store and the JSONL exporters
write. It masks:

- the whole value under any JSON key (at any depth) containing one of `settings.REDACT_KEYS`
  as whole words of the key, case-insensitively: with `token` configured, `access_token`,
  `X-Auth-Token` and `refreshToken` are masked but `tokens_used` and `max_tokens` are not
  (token counts are training signal, not credentials);
- every match of `settings.REDACT_PATTERNS` inside any string (bearer tokens, API key shapes,
  emails), including strings inside lists and JSON-looking text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from django.conf import settings

MASK = "[REDACTED]"

_WORD_SPLIT = re.compile(r"[^a-z0-9]+")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def _words(key: str) -> tuple[str, ...]:
    return tuple(word for word in _WORD_SPLIT.split(_CAMEL.sub("_", key).lower()) if word)


_CACHE_LIMIT = 50_000


@dataclass(frozen=True)
class Redactor:
    key_words: tuple[tuple[str, ...], ...]
    patterns: tuple[re.Pattern[str], ...]
    # One alternation of all patterns, only to rule out a match in a short string with a single
    # scan; None when it could disagree with the patterns one by one (see _any_pattern).
    gate: re.Pattern[str] | None = None
    # Exports and the consumer see the same keys and short values millions of times.
    _keys: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)
    _short_texts: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def key_is_secret(self, key: str) -> bool:
        cached = self._keys.get(key)
        if cached is None:
            words = _words(key)
            joined = f"_{'_'.join(words)}_"
            # An entry matches as a run of whole words of the key: "api_key" in "openai_api_key".
            cached = bool(words) and any(f"_{'_'.join(needle)}_" in joined for needle in self.key_words)
            if len(self._keys) >= _CACHE_LIMIT:
                self._keys.clear()
            self._keys[key] = cached
        return cached

    def text(self, value: str) -> str:
        cached = self._short_texts.get(value)
        if cached is not None:
            return cached
        if not self.patterns:
            return value
        if len(value) > 64:
            return self._substitute(value)
        # Short strings (ids, names, numbers) are most of the values, and nearly none has
        # anything to mask: one scan of the alternation says so. On long text it is slower than
        # one scan per pattern, each skipping ahead to its literal prefix.
        maybe_secret = self.gate is None or self.gate.search(value) is not None
        cached = self._substitute(value) if maybe_secret else value
        if len(self._short_texts) >= _CACHE_LIMIT:
            self._short_texts.clear()
        self._short_texts[value] = cached
        return cached

    def _substitute(self, value: str) -> str:
        # One pattern at a time, in the configured order: an alternation of them would defeat
        # each one's literal-prefix scan, which is what keeps this cheap on long text.
        for pattern in self.patterns:
            value = pattern.sub(MASK, value)
        return value

    def value(self, value: Any) -> Any:
        kind = type(value)
        if kind is str:
            return self.text(value)
        if kind is dict:
            return self._dict(value)
        if kind is list or kind is tuple:
            return [self.value(item) for item in value]
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return self._dict(value)
        if isinstance(value, list | tuple):
            return [self.value(item) for item in value]
        return value

    def _dict(self, value: dict[Any, Any]) -> dict[Any, Any]:
        # The hot loop of every export and of the consumer: locals and inlined cache lookups.
        keys = self._keys
        texts = self._short_texts
        out = {}
        for key, item in value.items():
            secret = keys.get(key)
            if secret is None:
                secret = self.key_is_secret(str(key))
                keys[key] = secret
            if secret:
                out[key] = MASK if item is not None else None
                continue
            kind = type(item)
            if kind is str:
                cached = texts.get(item)
                out[key] = cached if cached is not None else self.text(item)
            elif kind is dict:
                out[key] = self._dict(item)
            elif item is None or kind in _SCALARS:
                out[key] = item
            else:
                out[key] = self.value(item)
        return out


_SCALARS = frozenset({int, float, bool})


def _any_pattern(patterns: tuple[re.Pattern[str], ...]) -> re.Pattern[str] | None:
    """An alternation that matches a string exactly when one of `patterns` does, or None.

    None when a pattern has a capturing group (its numbered back-references would point at
    another pattern's group inside the alternation) or the alternation does not compile (a
    global inline flag such as `(?i)` is allowed only at the start of a whole expression)."""
    if len(patterns) < 2 or any(pattern.groups or pattern.flags & re.VERBOSE for pattern in patterns):
        return None
    try:
        return re.compile("|".join(f"(?:{pattern.pattern})" for pattern in patterns))
    except re.error:
        return None


def build_redactor(keys: Iterable[str], patterns: Iterable[str]) -> Redactor:
    key_words = tuple(words for words in (_words(key) for key in keys) if words)
    compiled = tuple(re.compile(pattern) for pattern in patterns)
    return Redactor(key_words=key_words, patterns=compiled, gate=_any_pattern(compiled))


@lru_cache(maxsize=8)
def _redactor_for(keys: tuple[str, ...], patterns: tuple[str, ...]) -> Redactor:
    return build_redactor(keys, patterns)


def current_redactor() -> Redactor:
    """The redactor for the current settings (cached per configuration)."""
    return _redactor_for(tuple(settings.REDACT_KEYS), tuple(settings.REDACT_PATTERNS))


def redact(value: Any) -> Any:
    """A copy of `value` (str, JSON-like dict/list, or scalar) with secrets masked."""
    return current_redactor().value(value)


def redact_record(record: dict[str, Any], *, columns_exempt: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Redact a flat record: its values, and values under secret-looking column names (except
    `columns_exempt`, the fixed columns of a schema, which are never credentials by name)."""
    redactor = current_redactor()
    out = {}
    for key, value in record.items():
        if key not in columns_exempt and value is not None and redactor.key_is_secret(key):
            out[key] = MASK
        else:
            out[key] = redactor.value(value)
    return out
