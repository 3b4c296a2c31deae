"""Request body parsing with the size limit enforced.

Django checks DATA_UPLOAD_MAX_MEMORY_SIZE only when `request.body` is read; DRF reads the
stream instead, so without this a body of any size would be parsed.
"""

from __future__ import annotations

import io
import math
from typing import Any

from django.conf import settings
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

from orchestration.api.exceptions import RequestTooLarge


def unstorable_text(value: Any) -> str | None:
    """Why a value in `value` cannot be stored in PostgreSQL (text and jsonb take neither
    NUL characters nor unpaired UTF-16 surrogates; jsonb no infinities, which a JSON number
    too large for a float, 1e400, parses to), or None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return "contains a NUL character (\\u0000)"
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "contains an unpaired UTF-16 surrogate"
        elif isinstance(item, float) and not math.isfinite(item):
            return "contains a number out of range (JSON has no infinities)"
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


class LimitedJSONParser(JSONParser):
    """JSON with the body size limit enforced and text PostgreSQL cannot store refused."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: dict | None = None) -> Any:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        data = stream.read(limit + 1) if stream is not None else b""
        if len(data) > limit:
            raise RequestTooLarge(f"The request body exceeds the limit of {limit} bytes.")
        try:
            parsed = super().parse(io.BytesIO(data), media_type, parser_context)
        except RecursionError:
            raise ParseError("JSON parse error - the document is nested too deeply.") from None
        problem = unstorable_text(parsed)
        if problem:
            raise ParseError(f"The request body {problem}.")
        return parsed
