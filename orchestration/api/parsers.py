"""Request body parsing with the size limit enforced.

Django checks DATA_UPLOAD_MAX_MEMORY_SIZE only when `request.body` is read; DRF reads the
stream instead, so without this a body of any size would be parsed.
"""

from __future__ import annotations

import codecs
import io
import json
import math
import re
from collections.abc import Iterator
from typing import Any

from django.conf import settings
from rest_framework.exceptions import ParseError, ValidationError
from rest_framework.parsers import JSONParser, get_encoding
from rest_framework.utils.json import strict_constant

from orchestration.api.exceptions import RequestTooLarge
from orchestration.services.specs import json_object_without_duplicates


def _scalar_problem(item: Any) -> str | None:
    if isinstance(item, str):
        if "\x00" in item:
            return "contains a NUL character (\\u0000)"
        try:
            item.encode("utf-8")
        except UnicodeEncodeError:
            return "contains an unpaired UTF-16 surrogate"
    elif isinstance(item, float) and not math.isfinite(item):
        return "is a number out of range (JSON has no infinities)"
    return None


def unstorable_text(value: Any) -> str | None:
    """Why a value in `value` cannot be stored in PostgreSQL (text and jsonb take neither
    NUL characters nor unpaired UTF-16 surrogates; jsonb no infinities, which a JSON number
    too large for a float, 1e400, parses to), or None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif problem := _scalar_problem(item):
            return problem
    return None


def _entries(item: dict | list) -> Iterator[tuple[str | int | None, Any]]:
    """(step, child) of a JSON object or array, in document order: a key (its step None) before
    its value (its step the key), an element with its index."""
    if isinstance(item, dict):
        for key, child in item.items():
            yield None, key
            yield key, child
    else:
        yield from enumerate(item)


def _path(steps: list[str | int | None]) -> str:
    path = ""
    for step in steps:
        if step is None:
            path = f"{path} (a key)" if path else "(a key)"
        elif isinstance(step, int):
            path += f"[{step}]"
        else:
            path = f"{path}.{step}" if path else step
    return path


def unstorable_field(value: Any) -> tuple[str, str]:
    """The path (`tasks[0].input.text`, as a validation error names a field) of the first value
    in `value` that unstorable_text refuses, and why. Walked again, with paths, only once a
    body is known to hold one: naming every value of every body would cost for nothing. The
    walk holds one step per level, the path is spelled for the value refused alone: a path
    per value, each repeating its parents', took memory of the values times the depth (a body
    of 2.4 MB took 3.5 GB)."""
    if not isinstance(value, dict | list):
        return "", _scalar_problem(value) or "cannot be stored"
    steps: list[str | int | None] = []
    walk = [_entries(value)]
    while walk:
        for step, child in walk[-1]:
            if isinstance(child, dict | list):
                steps.append(step)
                walk.append(_entries(child))
                break
            if problem := _scalar_problem(child):
                return _path([*steps, step]), problem
        else:
            walk.pop()
            if steps:
                steps.pop()
    return "", "cannot be stored"


# Python's error for an integer of more digits than it reads tells how to raise its limit
# (sys.set_int_max_str_digits), a setting of the server's interpreter, not the client's.
_LONG_INTEGER = re.compile(r"^Exceeds the limit \((\d+) digits\) for integer string conversion: value has (\d+) digits")


def _in_clients_terms(exc: ValueError) -> str:
    if match := _LONG_INTEGER.match(str(exc)):
        return f"a number has {match[2]} digits; at most {match[1]} are read"
    return str(exc)


class LimitedJSONParser(JSONParser):
    """JSON with the body size limit enforced, a name given twice in one object and text
    PostgreSQL cannot store refused (but in a workflow spec, a view's `body_is_spec`, whose
    validation names it among every other problem of the spec)."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: dict | None = None) -> Any:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        data = stream.read(limit + 1) if stream is not None else b""
        if len(data) > limit:
            raise RequestTooLarge(f"The request body exceeds the limit of {limit} bytes.")
        # DRF's parse, with a name given twice in one object refused (json keeps the last).
        try:
            parsed = json.load(
                codecs.getreader(get_encoding(parser_context or {}))(io.BytesIO(data)),
                parse_constant=strict_constant if self.strict else None,
                object_pairs_hook=json_object_without_duplicates,
            )
        except ValueError as exc:
            raise ParseError(f"JSON parse error - {_in_clients_terms(exc)}") from None
        except RecursionError:
            raise ParseError("JSON parse error - the document is nested too deeply.") from None
        if getattr((parser_context or {}).get("view"), "body_is_spec", False):
            # A workflow spec: spec_validate names such text among the spec's other problems.
            return parsed
        if unstorable_text(parsed):
            field, problem = unstorable_field(parsed)
            raise ValidationError({field: [problem]} if field else [f"The request body {problem}."])
        return parsed
