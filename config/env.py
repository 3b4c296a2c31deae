"""The one place that reads the process environment.

Every setting comes through these typed getters. A value that is present but malformed
raises ImproperlyConfigured naming the variable, so a typo fails the process at start-up
instead of silently falling back to a default.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping
from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class Env:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ
        self._configuration: set[str] = set()

    def raw(self, name: str) -> str | None:
        self._configuration.add(name)
        return self._value(name)

    def configuration_names(self) -> frozenset[str]:
        """The variables the platform's own configuration has read (every getter but
        `agent_secret`): no agent may name one of them as its key's variable."""
        return frozenset(self._configuration)

    def agent_secret(self, name: str) -> str | None:
        """The value of a variable an agent definition names (its API key), unset or blank as
        None; not counted among the platform's configuration."""
        return self._value(name)

    def _value(self, name: str) -> str | None:
        value = self._environ.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def is_set(self, name: str) -> bool:
        return self.raw(name) is not None

    def str(self, name: str, default: str | None = None, *, required: bool = False) -> str:
        value = self.raw(name)
        if value is None:
            if required or default is None:
                raise ImproperlyConfigured(f"{name} must be set")
            return default
        return value

    def optional_str(self, name: str) -> str | None:
        return self.raw(name)

    def bool(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ImproperlyConfigured(
            f"{name}={value!r} is not a boolean (use one of: true, false, 1, 0, yes, no, on, off)"
        )

    def int(
        self,
        name: str,
        default: int,
        *,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int:
        value = self.raw(name)
        if value is None:
            result = default
        else:
            try:
                result = int(value)
            except ValueError:
                raise ImproperlyConfigured(f"{name}={value!r} is not an integer") from None
        if minimum is not None and result < minimum:
            raise ImproperlyConfigured(f"{name}={result} is below the minimum of {minimum}")
        if maximum is not None and result > maximum:
            raise ImproperlyConfigured(f"{name}={result} is above the maximum of {maximum}")
        return result

    def list(self, name: str, default: list[str] | None = None) -> list[str]:
        value = self.raw(name)
        if value is None:
            return list(default or [])
        return [item.strip() for item in value.split(",") if item.strip()]

    def json_str_list(self, name: str, default: list[str]) -> list[str]:
        """A JSON array of strings (for values that may themselves contain commas, e.g. regexes)."""
        value = self.raw(name)
        if value is None:
            return list(default)
        try:
            parsed = json.loads(value)
        except ValueError as exc:
            raise ImproperlyConfigured(f"{name} is not valid JSON ({exc}); expected an array of strings") from None
        if not isinstance(parsed, list) or not all(isinstance(item, str) for item in parsed):
            raise ImproperlyConfigured(f"{name} must be a JSON array of strings")
        return parsed

    def url(self, name: str, default: str | None, *, schemes: Collection[str]) -> str | None:
        """A URL with one of `schemes` (None when unset without a default); `a+b://` is kombu's
        transport-plus-URL form, checked by its `a`. Errors name the part at fault, never the
        value: it may hold a password."""
        value = self.raw(name) or default
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme.split("+", 1)[0] not in schemes:
            allowed = ", ".join(f"{scheme}://" for scheme in sorted(schemes))
            raise ImproperlyConfigured(f"{name} must be a URL starting with one of: {allowed}")
        try:
            parts.port  # noqa: B018 - parsed on access
        except ValueError:
            raise ImproperlyConfigured(f"{name} has a port that is not a number from 0 to 65535") from None
        database = parts.path.strip("/")
        if parts.scheme in ("redis", "rediss") and database and not database.isdigit():
            # redis-py would quietly use database 0.
            raise ImproperlyConfigured(f"{name} names Redis database {database!r}; use a number (redis://HOST:6379/0)")
        return value

    def choice(self, name: str, default: str, choices: set[str] | list[str]) -> str:
        value = self.raw(name) or default
        if value not in choices:
            allowed = ", ".join(sorted(choices))
            raise ImproperlyConfigured(f"{name}={value!r} is not one of: {allowed}")
        return value


env = Env()
