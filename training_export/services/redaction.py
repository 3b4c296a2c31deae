"""Redaction of secrets and configured PII before anything is written to a training file.

One function, `redact`, is applied to every value the CSV store and the JSONL exporters
write. It masks:

- the whole value under any JSON key (at any depth) containing one of `settings.REDACT_KEYS`
  as whole words of the key, case-insensitively: with `token` configured, `access_token`,
  `X-Auth-Token` and `refreshToken` are masked but `tokens_used` and `max_tokens` are not
  (token counts are training signal, not credentials), nor a key whose last word, after the
  configured words, says it names something about a secret (NOT_SECRET_LAST_WORDS:
  `token_count`, `token_type`, `secret_name`, `api_key_env`), except `secret_id` and `token_id`
  (Vault's and Keystone's credentials), a password's hash (crackable), a token's and a secret's
  (a sign-in link's, Cognito's `SECRET_HASH`);
- the configured secret values of this deployment wherever they appear verbatim inside a
  string (SECRET_KEY, the database and Redis passwords, provider API keys: the values the
  log filter masks, `observability.logs.configured_secrets`);
- every match of `settings.REDACT_PATTERNS` inside any string (bearer tokens, Authorization
  header credentials of any scheme, API key shapes, emails), including strings inside lists and
  JSON-looking text.

`Redactor.dirty` rules out, for a whole batch of records with a few scans, that redaction
would change anything, so the writers can skip the per-value walk for the records it clears.
"""

from __future__ import annotations

import logging
import re
import time
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import accumulate
from re import _constants as sre
from re import _parser as sre_parse
from typing import Any

from django.apps import apps
from django.conf import settings
from django.core.signals import setting_changed
from django.db import connection, transaction
from django.dispatch import receiver

MASK = "[REDACTED]"

_WORD_SPLIT = re.compile(r"[^a-z0-9]+")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")

logger = logging.getLogger(__name__)


def _words(key: str) -> tuple[str, ...]:
    return tuple(word for word in _WORD_SPLIT.split(_CAMEL.sub("_", key).lower()) if word)


# The last words of a key that names something about a secret, not the secret itself (the
# default key=value pattern of settings.REDACT_PATTERNS spells the same words).
NOT_SECRET_LAST_WORDS = frozenset(
    {"count", "dir", "env", "field", "fields", "file", "hash", "id", "ids", "kind", "len", "length", "max", "min"}
    | {"name", "names", "path", "size", "type", "uri", "url", "version"}
)
# ...except after these: Vault's AppRole `secret_id` and OpenStack Keystone's `token_id` are the
# credential, a password's hash can be cracked back to the password, a token's hash is what a
# magic link carries to log in with (Supabase's `token_hash`, sent to its verify endpoint), and a
# secret's is one too (AWS Cognito's `SECRET_HASH`, sent with each sign-in).
SECRET_AFTER = {
    "id": {"secret", "token"},
    "ids": {"secret", "token"},
    "hash": {"password", "passwd", "passphrase", "pwd", "token", "secret"},
}
# The configured words the last words apply to: credentials, whose name, count or high-entropy
# hash tells nothing of them. Any other configured word (personal data: `ssn`, `email`) masks
# every key holding it: `ssn_hash` or `email_hash` can be turned back into the value.
CREDENTIAL_WORDS = frozenset(
    {"secret", "password", "passwd", "pwd", "passphrase", "token", "api_key", "apikey", "authorization", "cookie"}
    | {"private_key", "credential", "credentials", "access_key", "accountkey", "sharedaccesskey"}
)


def _names_no_secret(words: tuple[str, ...]) -> bool:
    """Whether a key of these words ends in a word of NOT_SECRET_LAST_WORDS (outside its
    exceptions): only a configured key ending with that word too makes it a secret's."""
    return len(words) > 1 and words[-1] in NOT_SECRET_LAST_WORDS and words[-2] not in SECRET_AFTER.get(words[-1], ())


_CACHE_LIMIT = 50_000


@dataclass(frozen=True)
class _Scan:
    """A pattern as `Redactor.dirty` searches it, with what any match must hold (lower-cased
    literals: one of each tuple; None when unknown) and, when every match starts with one of
    a few literals, those."""

    pattern: re.Pattern[str]
    needed: tuple[tuple[str, ...], ...] | None = None
    prefixes: tuple[str, ...] | None = None

    def ruled_out(self, lowered: str | None) -> bool:
        """Whether the text whose lower-cased form is `lowered` (None unless the text is ASCII,
        where lower() is plain case mapping) cannot hold a match: a needed literal is missing."""
        if lowered is None or self.needed is None:
            return False
        for options in self.needed:
            for literal in options:
                if literal in lowered:
                    break
            else:
                return True
        return False


@dataclass(frozen=True)
class Redactor:
    key_words: tuple[tuple[str, ...], ...]
    patterns: tuple[re.Pattern[str], ...]
    # Configured secret values, longest first (a secret containing another is masked whole).
    secrets: tuple[str, ...] = ()
    # Whether `dirty` may rule out a match by scanning joined texts (see _joinable), and what
    # it scans for: the patterns and the secrets as literals.
    joinable: bool = False
    scans: tuple[_Scan, ...] = ()
    # The patterns' scans alone, in the configured order.
    pattern_scans: tuple[_Scan, ...] = ()
    # One literal alternation (lower-cased) that ASCII text must hold for any pattern to be
    # able to match: one needed tuple per pattern (see _gate). None when a pattern has none.
    gate: re.Pattern[str] | None = None
    # The longest word of each configured key, lower-cased: a key `key_is_secret` names holds
    # one of them as a whole word (see _mark_secret_keys).
    key_word_scan: tuple[str, ...] = ()
    # Exports and the consumer see the same keys and short values millions of times.
    _keys: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)
    _short_texts: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    _safe_keys: set[Any] = field(default_factory=set, compare=False, repr=False)

    def key_is_secret(self, key: str) -> bool:
        cached = self._keys.get(key)
        if cached is None:
            words = _words(key)
            joined = f"_{'_'.join(words)}_"
            # An entry matches as a run of whole words of the key: "api_key" in "openai_api_key";
            # a credential's word at its end only when the key's last word says it is no secret
            # ("token" in "token_count"; "ssn" still in "ssn_hash").
            if _names_no_secret(words):
                cached = any(
                    joined.endswith(f"_{'_'.join(needle)}_")
                    or ("_".join(needle) not in CREDENTIAL_WORDS and f"_{'_'.join(needle)}_" in joined)
                    for needle in self.key_words
                )
            else:
                cached = bool(words) and any(f"_{'_'.join(needle)}_" in joined for needle in self.key_words)
            if len(self._keys) >= _CACHE_LIMIT:
                self._keys.clear()
            self._keys[key] = cached
        return cached

    def text(self, value: str) -> str:
        cached = self._short_texts.get(value)
        if cached is not None:
            return cached
        if not self.patterns and not self.secrets:
            return value
        result = self._substitute(value)
        if len(value) <= 64:
            # Short strings (ids, names, numbers) are most of the values and repeat.
            if len(self._short_texts) >= _CACHE_LIMIT:
                self._short_texts.clear()
            self._short_texts[value] = result
        return result

    def _substitute(self, value: str) -> str:
        masked = self._substitute_once(value)
        if masked == value:
            return value
        # A mask can complete another pattern's match (`https://secret=x/y&:pw@host`: the
        # key=value pattern's mask leaves a credential URL that the URL pattern, tried before
        # it, did not match), so passes repeat while each masks more of the text than the one
        # before (fewer characters outside masks): a pattern that matches inside a mask, or
        # an empty string, cannot make it loop.
        outside = len(masked.replace(MASK, ""))
        while True:
            again = self._substitute_once(masked)
            again_outside = len(again.replace(MASK, ""))
            if again == masked or again_outside >= outside:
                return masked
            masked, outside = again, again_outside

    def _substitute_once(self, value: str) -> str:
        for secret in self.secrets:
            if secret in value:
                value = value.replace(secret, MASK)
        # One pattern at a time, in the configured order (an alternation of them would defeat
        # each one's literal-prefix scan); a pattern is skipped when a literal every match of it
        # holds is missing: a few substring tests instead of a regex scan.
        lowered = value.lower() if value.isascii() else None
        if lowered is not None and self.gate is not None and self.gate.search(lowered) is None:
            return value  # every pattern is ruled out: one scan instead of one test per pattern
        for scan in self.pattern_scans:
            if scan.ruled_out(lowered):
                continue
            replaced = scan.pattern.sub(MASK, value)
            if replaced != value:
                value = replaced
                lowered = value.lower() if value.isascii() else None
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
            name = key
            if type(key) is str:
                # A key is text too (an email or a token used as a key): masked like a value.
                name = texts.get(key)
                if name is None:
                    name = self.text(key)
                if name in out:
                    # Two masked keys, or a masked key and a key that is its mask already
                    # (in either order): keep both values.
                    name = unique_name(name, out)
            if secret:
                out[name] = MASK if item is not None else None
                continue
            kind = type(item)
            if kind is str:
                cached = texts.get(item)
                out[name] = cached if cached is not None else self.text(item)
            elif kind is dict:
                out[name] = self._dict(item)
            elif item is None or kind in _SCALARS:
                out[name] = item
            else:
                out[name] = self.value(item)
        return out

    def dirty(
        self, texts: Sequence[Sequence[str]], json_texts: Sequence[Sequence[str]], json_values: Sequence[Sequence[Any]]
    ) -> set[int]:
        """The indexes of the records redaction might change. Every other record is unchanged
        by `text` on each of its `texts` and by `value` on each of its `json_values` (whose
        valid JSON texts are `json_texts`).

        All records are joined into one text, each string between double quotes (JSON strings,
        their escapes decoded, already are), and each pattern and secret is searched once in
        it: a match inside a string is also a match there, as far as `_joinable` holds. The
        keys of the JSON values are looked at only when all the words of a configured key occur."""
        count = len(texts)
        if not self.joinable:
            return set(range(count))
        dirty: set[int] = set()
        parts = []
        decoded_texts = iter(_json_unescape_many([raw for record in json_texts for raw in record]))
        for index in range(count):
            part = '"'.join(texts[index])
            for _ in json_texts[index]:
                decoded = next(decoded_texts)
                if decoded is None:
                    dirty.add(index)
                    decoded = ""
                part += '"' + decoded
            parts.append(part)
        joined = '"' + '"'.join(parts) + '"'
        starts = []
        position = 1
        for part in parts:
            starts.append(position)
            position += len(part) + 1

        def mark(begin: int, end: int) -> None:
            first = bisect_right(starts, begin) - 1
            last = bisect_right(starts, max(begin, end - 1)) - 1
            dirty.update(range(max(first, 0), last + 1))

        # On ASCII text lower() is plain ASCII case mapping, so a literal every match holds
        # (case-insensitively) must be in the lower-cased text.
        lowered = joined.lower() if joined.isascii() else None
        for scan in self.scans:
            if scan.ruled_out(lowered):
                continue
            if lowered is not None and scan.prefixes is not None:
                # Every match starts at one of these: try there instead of at every position
                # (a case-insensitive pattern gets no literal-prefix scan from the engine).
                # After a match the search resumes at its end, as finditer's does: matches
                # starting inside it would make the scan quadratic ("sk-sk-sk-...").
                for prefix in scan.prefixes:
                    at = lowered.find(prefix)
                    while at >= 0:
                        match = scan.pattern.match(joined, at)
                        if match is not None:
                            mark(*match.span())
                            at = max(at, match.end() - 1)
                        at = lowered.find(prefix, at + 1)
                continue
            for match in scan.pattern.finditer(joined):
                mark(*match.span())
        if self.key_words:
            lowered = lowered if lowered is not None else joined.lower()
            # Key words are ASCII letters and digits, so a key made of them has each of them
            # in the lower-cased text.
            if any(all(word in lowered for word in words) for words in self.key_words):
                self._mark_secret_keys(json_texts, json_values, dirty)
        return dirty

    def _mark_secret_keys(
        self, json_texts: Sequence[Sequence[str]], json_values: Sequence[Sequence[Any]], dirty: set[int]
    ) -> None:
        """Add the records holding a JSON key `key_is_secret` names to `dirty`.

        Most keys are safe and the same in every record, so instead of walking every dict, the
        JSON texts of the batch are joined and searched once per word of `key_word_scan`; only
        the string around a place where the word stands as a whole word of a key is looked at.
        That needs the raw text to show every letter of a key: a text with a \\u escape (which
        may spell a letter) or non-ASCII characters (whose lower-casing may change their length
        or turn into ASCII) is walked value by value instead."""
        if not self.key_word_scan:
            for index, values in enumerate(json_values):
                if index not in dirty and any(self._holds_secret_key(value) for value in values):
                    dirty.add(index)
            return
        parts = ["\n".join(texts) for texts in json_texts]  # a newline is never raw inside a JSON string
        joined = "\n".join(parts)
        if not joined.isascii() or "\\u" in joined:
            # Walk the records the raw text cannot speak for, and blank them out (same length:
            # the positions of the others stay) for the search below.
            for index, part in enumerate(parts):
                if not part.isascii() or "\\u" in part:
                    if index not in dirty and any(self._holds_secret_key(value) for value in json_values[index]):
                        dirty.add(index)
                    parts[index] = " " * len(part)
            joined = "\n".join(parts)
        starts = list(accumulate(map(len, parts), lambda total, length: total + length + 1, initial=0))
        lowered = joined.lower()  # ASCII: the same positions
        # Linear in the text: a record found dirty is skipped to its end, and a string looked
        # at once is skipped to its closing quote (its other hits would get the same answer).
        # Looking at every hit would cost hits x string length: a tool output holding a JSON
        # document as a string repeats `token_type`, `token_count`... thousands of times.
        for word in self.key_word_scan:
            at = lowered.find(word)
            while at >= 0:
                owner = bisect_right(starts, at) - 1
                if owner in dirty:
                    at = lowered.find(word, starts[owner + 1])
                    continue
                if _whole_word(joined, at, at + len(word)):
                    verdict, end = self._key_at(joined, at)
                    if verdict is not False:
                        dirty.add(owner)
                    at = max(at, end)
                at = lowered.find(word, at + 1)

    def _key_at(self, text: str, position: int) -> tuple[bool | None, int]:
        """Whether the JSON string around `position` of valid JSON `text` is a key that
        `key_is_secret` names (False when it is not, or it is a value; None when unsure), and
        where the string ends (its closing quote; `position` when unsure)."""
        # Inside a string no quote is unescaped, so the nearest unescaped ones around a
        # position inside a string are its delimiters.
        begin = _unescaped_quote(text, text.rfind('"', 0, position), backwards=True)
        end = _unescaped_quote(text, text.find('"', position), backwards=False)
        if begin < 0 or end < 0:
            return None, position
        after = end + 1
        while after < len(text) and text[after] in " \t\r\n":
            after += 1
        if after >= len(text) or text[after] != ":":
            return False, end  # a value, not a key
        key = text[begin + 1 : end]
        if "\\" in key:
            key = _json_unescape(key)
            if key is None:
                return None, end
        return self.key_is_secret(key), end

    def _holds_secret_key(self, value: Any) -> bool:
        """Whether a dict anywhere in `value` has a key `key_is_secret` names."""
        safe = self._safe_keys
        pending = [value] if isinstance(value, dict | list | tuple) else []
        while pending:
            item = pending.pop()
            if isinstance(item, dict):
                if not safe.issuperset(item):
                    for key in item:
                        if key not in safe:
                            if self.key_is_secret(str(key)):
                                return True
                            if len(safe) >= _CACHE_LIMIT:
                                safe.clear()
                            safe.add(key)
                item = item.values()
            pending += [
                inner
                for inner in item
                if type(inner) in _CONTAINERS or (type(inner) not in _LEAVES and isinstance(inner, dict | list | tuple))
            ]
        return False


_SCALARS = frozenset({int, float, bool})


def unique_name(name: str, taken: dict[Any, Any]) -> str:
    """`name` with the first free suffix #2, #3, ... among the keys of `taken`: two keys masked
    alike keep both values."""
    number = 2
    while f"{name}#{number}" in taken:
        number += 1
    return f"{name}#{number}"


def _unescaped_quote(text: str, at: int, *, backwards: bool) -> int:
    """The position of the first quote from `at` on (or back from it) that no backslash
    escapes; -1 if there is none."""
    while at >= 0:
        backslashes = 0
        while at - backslashes - 1 >= 0 and text[at - backslashes - 1] == "\\":
            backslashes += 1
        if backslashes % 2 == 0:
            return at
        at = text.rfind('"', 0, at) if backwards else text.find('"', at + 1)
    return -1


_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_LOWER_OR_DIGIT = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
_UPPER = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _whole_word(text: str, begin: int, end: int) -> bool:
    """Whether text[begin:end] (letters and digits) may be a whole word of `_words(key)` for the
    key whose raw JSON text (ASCII, no \\u escapes) holds it: each edge is next to a character
    that is not a letter or digit, at a lower-to-upper case change (the camelCase split), or,
    at the beginning, after a one-letter escape (\\n in the raw text is a line feed)."""
    if end < len(text):
        after = text[end]
        if after in _ALNUM and not (after in _UPPER and text[end - 1] in _LOWER_OR_DIGIT):
            return False
    if begin > 0:
        before = text[begin - 1]
        if before in _ALNUM and not (
            (text[begin] in _UPPER and before in _LOWER_OR_DIGIT)
            or (before in "bfnrt" and begin > 1 and text[begin - 2] == "\\")
        ):
            return False
    return True


def _key_word_scan(key_words: Sequence[tuple[str, ...]]) -> tuple[str, ...]:
    """The longest word of each configured key (ASCII letters and digits, lower-cased), longest
    first: a key that `key_is_secret` names holds one of them as a whole word."""
    return tuple(sorted({max(words, key=len) for words in key_words if words}, key=lambda word: (-len(word), word)))


_CONTAINERS = frozenset({dict, list, tuple})
_LEAVES = frozenset({str, int, float, bool, type(None)})

_JSON_ESCAPE = re.compile(
    r"\\(?:u([dD][89abAB][0-9a-fA-F]{2})\\u([dD][c-fC-F][0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|(.))", re.S
)
_SIMPLE_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


_PIECE_ESCAPES = tuple(("\\" + escape, char) for escape, char in _SIMPLE_ESCAPES.items() if escape != "\\")


class _LoneSurrogate(ValueError):
    pass


def _unescape_one(match: re.Match[str]) -> str:
    high, low, code, simple = match.groups()
    if high:
        return chr(0x10000 + ((int(high, 16) - 0xD800) << 10) + (int(low, 16) - 0xDC00))
    if code:
        if 0xD800 <= int(code, 16) <= 0xDFFF:
            raise _LoneSurrogate(code)
        return chr(int(code, 16))
    return _SIMPLE_ESCAPES[simple]


def _unescape_simple(text: str) -> str:
    """`_json_unescape` of text without \\u escapes nor a raw \\x01 (which valid JSON never holds
    raw): escaped backslashes pair up from the left, as str.replace finds them, and are parked
    as \\x01 while every other backslash is the start of a one-character escape."""
    text = text.replace("\\\\", "\x01")
    for escape, char in _PIECE_ESCAPES:
        text = text.replace(escape, char)
    return text.replace("\x01", "\\")


def _json_unescape_many(texts: list[str]) -> list[str | None]:
    """`_json_unescape` of each text, with one pass of replacements over all of them joined by
    \\x00 (never raw in valid JSON; no escape crosses it, since each text is whole) when none
    holds a \\u escape."""
    joined = "\x00".join(texts)
    if "\\" not in joined:
        return list(texts)
    if "\\u" in joined or "\x01" in joined or joined.count("\x00") != len(texts) - 1:
        return [_json_unescape(text) if "\\" in text else text for text in texts]
    return _unescape_simple(joined).split("\x00")  # type: ignore[return-value]


def _json_unescape(text: str) -> str | None:
    """Valid JSON text with every string escape decoded (None for a lone surrogate)."""
    if "\\u" not in text and "\x01" not in text:
        return _unescape_simple(text)
    if "\\u" not in text:
        # Escapes pair up from the left, so splitting at every escaped backslash leaves pieces
        # whose backslashes each start a one-character escape: no callback per escape.
        pieces = text.split("\\\\")
        for index, piece in enumerate(pieces):
            if "\\" in piece:
                for escape, char in _PIECE_ESCAPES:
                    piece = piece.replace(escape, char)
                pieces[index] = piece
        return "\\".join(pieces)
    try:
        return _JSON_ESCAPE.sub(_unescape_one, text)
    except _LoneSurrogate:
        return None


_QUOTE = ord('"')
_QUOTE_CATEGORIES = frozenset(
    {sre.CATEGORY_NOT_DIGIT, sre.CATEGORY_NOT_SPACE, sre.CATEGORY_NOT_WORD, sre.CATEGORY_NOT_LINEBREAK}
)
_NO_QUOTE_CATEGORIES = frozenset({sre.CATEGORY_DIGIT, sre.CATEGORY_SPACE, sre.CATEGORY_WORD, sre.CATEGORY_LINEBREAK})


def _class_may_hold_quote(items: list[tuple[Any, Any]]) -> bool:
    negate = False
    holds = False
    for op, arg in items:
        if op is sre.NEGATE:
            negate = True
        elif op is sre.LITERAL:
            holds = holds or arg == _QUOTE
        elif op is sre.RANGE:
            holds = holds or arg[0] <= _QUOTE <= arg[1]
        elif op is sre.CATEGORY and arg in _QUOTE_CATEGORIES:
            holds = True
        elif not (op is sre.CATEGORY and arg in _NO_QUOTE_CATEGORIES):
            return True
    return holds != negate


def _joinable_items(items: Any, *, in_lookaround: bool) -> bool:
    for op, arg in items:
        if op is sre.LITERAL:
            if in_lookaround and arg == _QUOTE:
                return False
        elif op is sre.NOT_LITERAL or op is sre.ANY or op is sre.GROUPREF:
            if in_lookaround and not (op is sre.NOT_LITERAL and arg == _QUOTE):
                return False
        elif op is sre.IN:
            if in_lookaround and _class_may_hold_quote(arg):
                return False
        elif op is sre.AT:
            # \B is refused too: on an empty string it never matches, between the two quotes
            # of an empty string in the joined text it does.
            if arg is not sre.AT_BOUNDARY:
                return False
        elif op is sre.ASSERT or op is sre.ASSERT_NOT:
            if not _joinable_items(arg[1], in_lookaround=True):
                return False
        elif op is sre.SUBPATTERN:
            if not _joinable_items(arg[3], in_lookaround=in_lookaround):
                return False
        elif op is sre.BRANCH:
            if not all(_joinable_items(branch, in_lookaround=in_lookaround) for branch in arg[1]):
                return False
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
            if not _joinable_items(arg[2], in_lookaround=in_lookaround):
                return False
        elif op is sre.ATOMIC_GROUP:
            if not _joinable_items(arg, in_lookaround=in_lookaround):
                return False
        else:
            return False
    return True


def _joinable(pattern: re.Pattern[str]) -> bool:
    """Whether every match of `pattern` inside a string is also a match inside any text that
    holds the string between two double quotes: the surroundings of the string may change
    only what assertions see, so `^`, `$`, `\\A`, `\\Z` and `\\B` are refused, `\\b` sees a quote as
    it sees the string's edge (neither is a word character), and a look-around must be unable
    to consume a quote (so reaching past the string's edge fails, as it does at the edge)."""
    return _joinable_items(sre_parse.parse(pattern.pattern, pattern.flags), in_lookaround=False)


def _needed(items: Any) -> list[tuple[str, ...]]:
    """Literals a match of `items` must hold, lower-cased: one of each tuple."""
    needed: list[tuple[str, ...]] = []
    run = ""
    for op, arg in items:
        if op is sre.LITERAL:
            run += chr(arg)
            continue
        if run:
            needed.append((run.lower(),))
            run = ""
        if op is sre.SUBPATTERN:
            needed += _needed(arg[3])
        elif op is sre.ASSERT:
            # What a look-ahead or look-behind must see is in the text too (`(?<=://)`).
            needed += _needed(arg[1])
        elif op is sre.BRANCH:
            choices = [_needed(branch) for branch in arg[1]]
            if all(choices):
                # The longest shortest literal of each branch: one of them is in every match.
                best = [max(choice, key=lambda options: min(map(len, options))) for choice in choices]
                needed.append(tuple(literal for options in best for literal in options))
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT) and arg[0] >= 1:
            needed += _needed(arg[2])
        elif op is sre.ATOMIC_GROUP:
            needed += _needed(arg)
    if run:
        needed.append((run.lower(),))
    return needed


def _prefixes(items: Any) -> tuple[str, ...] | None:
    """Literals (lower-cased) one of which every match of `items` starts with, or None."""
    for index, (op, arg) in enumerate(items):
        if op is sre.LITERAL:
            run = ""
            for next_op, next_arg in items[index:]:
                if next_op is not sre.LITERAL:
                    break
                run += chr(next_arg)
            return (run.lower(),)
        if op is sre.SUBPATTERN:
            return _prefixes(arg[3])
        if op is sre.BRANCH:
            found = [_prefixes(branch) for branch in arg[1]]
            return None if None in found else tuple(prefix for prefixes in found for prefix in prefixes)
        if op is not sre.ASSERT and op is not sre.ASSERT_NOT and op is not sre.AT:
            return None  # zero-width nodes at the start are checked at the match position
    return None


def _scan(pattern: re.Pattern[str]) -> _Scan:
    tree = sre_parse.parse(pattern.pattern, pattern.flags)
    needed = tuple(_needed(tree)) or None
    prefixes = _prefixes(tree)
    literals = [literal for options in needed or () for literal in options] + list(prefixes or ())
    if not all(literal.isascii() for literal in literals):
        # A non-ASCII character may match ASCII text case-insensitively (the long s matches s).
        return _Scan(pattern)
    if prefixes is not None and not (pattern.flags & re.IGNORECASE or "(?i" in pattern.pattern):
        prefixes = None  # a case-sensitive literal prefix is what the engine's own scan is fast at
    return _Scan(pattern, needed=needed, prefixes=prefixes)


def _gate(scans: Sequence[_Scan]) -> re.Pattern[str] | None:
    """A pattern whose absence from lower-cased ASCII text rules out every scan: for each, the
    literals of one needed tuple (the one with the longest shortest literal), any of which a
    match must hold. A text without any of them is ruled out by each scan's `ruled_out`."""
    literals: set[str] = set()
    for scan in scans:
        if not scan.needed:
            return None
        literals.update(max(scan.needed, key=lambda options: min(map(len, options))))
    if not literals:
        return None
    return re.compile("|".join(re.escape(literal) for literal in sorted(literals, key=lambda lit: (-len(lit), lit))))


def build_redactor(keys: Iterable[str], patterns: Iterable[str], secrets: Iterable[str] = ()) -> Redactor:
    key_words = tuple(words for words in (_words(key) for key in keys) if words)
    compiled = tuple(re.compile(pattern) for pattern in patterns)
    secret_values = tuple(sorted({secret for secret in secrets if secret}, key=lambda value: (-len(value), value)))
    literals = tuple(re.compile(re.escape(secret)) for secret in secret_values)
    scans = tuple(_scan(pattern) for pattern in compiled) + tuple(
        _Scan(literal, needed=((secret.lower(),),)) for literal, secret in zip(literals, secret_values, strict=True)
    )
    return Redactor(
        key_words=key_words,
        patterns=compiled,
        secrets=secret_values,
        joinable=all(_joinable(pattern) for pattern in compiled),
        scans=scans,
        pattern_scans=scans[: len(compiled)],
        gate=_gate(scans[: len(compiled)]),
        key_word_scan=_key_word_scan(key_words),
    )


@lru_cache(maxsize=8)
def _redactor_for(keys: tuple[str, ...], patterns: tuple[str, ...], secrets: tuple[str, ...]) -> Redactor:
    return build_redactor(keys, patterns, secrets)


# Seconds between two readings of the secret values: an agent created or changed through the
# API may name a variable no definition file names, and is masked by value within this long.
SECRETS_REFRESH_SECONDS = 60.0

_secret_values: tuple[str, ...] | None = None
_secret_values_read_at = 0.0
_table_env_names: tuple[str, ...] = ()  # the agents table's api_key_env names, as last read


def table_key_env_names() -> tuple[str, ...]:
    """The `api_key_env` names in the agents table (agents made through the API have no file).
    Inside a transaction, in a savepoint, so that a failure leaves the transaction usable.
    Empty before the apps are loaded."""
    if not apps.ready:
        return ()
    from orchestration.models import Agent

    names = Agent.objects.exclude(api_key_env="").values_list("api_key_env", flat=True).distinct()
    if not connection.in_atomic_block:
        return tuple(sorted(names))
    with transaction.atomic():
        return tuple(sorted(names))


def configured_secret_values(*, refresh: bool = False) -> tuple[str, ...]:
    """This deployment's secret values, as the log filter masks them, and the values of the
    variables that agents of the agents table name: read again every SECRETS_REFRESH_SECONDS,
    after a settings change, or when `refresh` (the consumer, meeting rows made under other
    settings). When the table cannot be read, its names as last read are used."""
    global _secret_values, _secret_values_read_at, _table_env_names
    now = time.monotonic()
    if _secret_values is None or refresh or now - _secret_values_read_at >= SECRETS_REFRESH_SECONDS:
        from observability.logs import configured_secrets

        try:
            _table_env_names = table_key_env_names()
        except Exception:  # unreachable, not migrated, no database in this process: the names read before
            logger.debug("the agents table's api_key_env names could not be read", exc_info=True)
        _secret_values = tuple(sorted(configured_secrets(_table_env_names)))
        _secret_values_read_at = now
    return _secret_values


@receiver(setting_changed)
def _forget_secret_values(**kwargs: Any) -> None:
    global _secret_values
    _secret_values = None


def current_redactor() -> Redactor:
    """The redactor for the current settings (cached per configuration)."""
    return _redactor_for(tuple(settings.REDACT_KEYS), tuple(settings.REDACT_PATTERNS), configured_secret_values())


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


def secrets_masked(value: Any) -> Any:
    """A copy of `value` with only this deployment's configured secret values masked (not the
    patterns nor the keys `redact` masks): what the API answers users about their own records,
    which hold their own e-mail addresses and tokens as they wrote them, but never the
    deployment's credentials."""
    return _redactor_for((), (), configured_secret_values()).value(value)
