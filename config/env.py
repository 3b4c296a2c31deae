"""The one place that reads the process environment.

Every setting comes through these typed getters. A value that is present but malformed
raises ImproperlyConfigured naming the variable, so a typo fails the process at start-up
instead of silently falling back to a default.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
DEFAULT_PORTS = {"http": 80, "https": 443}
# RFC 3986's appendix B, anchored: scheme://authority, then path, query and fragment.
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)([^?#]*)(\?[^#]*)?(#.*)?\Z", re.DOTALL)
_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?\Z")


@dataclass(frozen=True)
class Origin:
    """Where a request goes: scheme, host (lower case, no trailing dot, an IPv6 address
    compressed and without brackets) and port (the scheme's default when not written)."""

    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def host_normalize(host: str) -> str:
    """A host as origins compare it: case and a trailing dot do not count, nor how an IPv6
    address is spelt (`0:0::1` is `::1`)."""
    host = host.rstrip(".").lower()
    try:
        return ipaddress.IPv6Address(host).compressed
    except ValueError:
        return host


def origin_parse(entry: str) -> Origin:
    """The origin an entry names: `scheme://host[:port]` (http or https, a lone trailing "/"
    allowed), or a bare host name or IP address, which stands for https on port 443. Anything
    else (a path, a query, userinfo, another scheme, a port without a scheme) raises
    ValueError saying what is wrong."""
    bare = "://" not in entry
    match = _URL.match(f"https://{entry}" if bare else entry)
    if match is None:
        raise ValueError("is not a host name or an origin (http://HOST:PORT, https://HOST[:PORT])")
    scheme, authority, path, query, fragment = match.groups()
    scheme = scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"has the scheme {scheme}://; only http:// and https:// are allowed")
    if "@" in authority:
        raise ValueError("has userinfo (user@ or user:password@); list the origin alone")
    if path not in ("", "/") or query is not None or fragment is not None:
        part = "a path" if path not in ("", "/") else "a query" if query is not None else "a fragment"
        raise ValueError(f"has {part}; list the origin alone (scheme://HOST[:PORT])")
    if authority.startswith("["):
        literal, bracket, port = authority[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            raise ValueError("is not a host name or an origin (http://HOST:PORT, https://HOST[:PORT])")
        host, port = _ipv6(literal), port[1:] if port else None
    elif bare and authority.count(":") > 1:  # an IPv6 address without brackets ("::1")
        host, port = _ipv6(authority), None
    else:
        host, colon, port = authority.partition(":")
        if ":" in port:
            raise ValueError("has more than one ':' (an IPv6 address is written in brackets: [ADDRESS])")
        port = port if colon else None
        if not host.isascii():
            raise ValueError("has a host name that is not ASCII; write it in its xn-- form")
        if not _HOST_NAME.match(host.lower()):
            raise ValueError("has no host" if not host else "has a host that is not a host name or an IP address")
        host = host_normalize(host)
    if port is not None and bare:
        raise ValueError("has a port but no scheme: write http://HOST:PORT or https://HOST:PORT")
    if port is not None and not (port.isdigit() and port.isascii() and 1 <= int(port) <= 65535):
        raise ValueError("has a port that is not a number from 1 to 65535")
    return Origin(scheme, host, int(port) if port is not None else DEFAULT_PORTS[scheme])


def _ipv6(literal: str) -> str:
    try:
        address = ipaddress.IPv6Address(literal)
    except ValueError:
        raise ValueError("has a host that is not a host name or an IP address") from None
    if address.scope_id:
        raise ValueError("has an IPv6 zone (%...), which a request's host never matches")
    return address.compressed


def _shown(entry: str) -> str:
    """An entry for an error message, without what may be a secret: userinfo, query, fragment."""
    head, sep, rest = entry.partition("://")
    head, rest = (head + sep, rest) if sep else ("", entry)
    authority, tail = re.match(r"([^/?#]*)(.*)", rest, re.DOTALL).groups()
    if "@" in authority:
        authority = "***@" + authority.rpartition("@")[2]
    return head + authority + re.sub(r"[?#].*", lambda m: m[0][0] + "***", tail, flags=re.DOTALL)


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

    def origin_list(self, name: str, default: list[str] | None = None) -> list[str]:
        """A comma-separated list of origins as `origin_parse` reads them (`http://HOST:PORT`,
        `https://HOST[:PORT]`, or a bare host for https on 443), returned as written; an entry
        it refuses stops the process, named (without userinfo or query) with its fault."""
        entries = self.list(name, default)
        for entry in entries:
            try:
                origin_parse(entry)
            except ValueError as exc:
                raise ImproperlyConfigured(f"{name}: {_shown(entry)!r} {exc}") from None
        return entries

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
