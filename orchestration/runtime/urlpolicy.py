"""Where agents may send requests (SSRF policy).

A URL taken from an agent definition is checked before any byte is sent: http or https
only, no credentials in it, the host in AGENT_HTTP_ALLOWED_HOSTS when that list is set, and
every address the host resolves to globally routable (no loopback, private, link-local such
as the 169.254.169.254 metadata service, site-local, multicast, reserved or unspecified
address, IPv4 or IPv6, IPv4-mapped included) unless AGENT_HTTP_ALLOW_PRIVATE is true. The
caller then connects to one of the checked addresses itself (see http_agent.post_json), so a
second DNS answer cannot swap in another address between the check and the connection.

`url_check` is the one place these rules live: the runtime calls it before each request,
and load_agents, the API and the console call it with `resolve=False` to refuse an agent
whose URL could never be used, offline (no DNS lookup): a host that is an address (or
`localhost`) is checked as the request would check it; a name is resolved at request time
only, where its answer may have changed.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from django.conf import settings

from orchestration.errors import PermanentError, RetryableError

if TYPE_CHECKING:
    import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Target:
    """A checked URL and the addresses its host resolved to, in resolver order."""

    url: httpx.URL
    hostname: str
    addresses: tuple[str, ...]


def address_refusal(ip: IPAddress) -> str | None:
    """Why an address may not be reached (None if it is globally routable)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            reason = address_refusal(ip.ipv4_mapped)
            return f"IPv4-mapped {reason}" if reason else None
        if ip.sixtofour is not None and (reason := address_refusal(ip.sixtofour)):
            return f"6to4 {reason}"
        if ip.is_site_local:
            # fec0::/10, IPv6's first private range: deprecated, still routed by networks that
            # use it, and neither private nor reserved to the ipaddress module.
            return "site-local address"
    checks = (
        ("is_unspecified", "unspecified address"),
        ("is_loopback", "loopback address"),
        ("is_link_local", "link-local address (incl. cloud metadata services)"),
        ("is_multicast", "multicast address"),
        ("is_reserved", "reserved address"),
        ("is_private", "private address"),
    )
    for attribute, reason in checks:
        if getattr(ip, attribute):
            return reason
    if not ip.is_global:
        return "address that is not globally routable"
    return None


def _resolve(hostname: str, port: int) -> list[str]:
    # The system resolver applies its own timeout and attempts (resolv.conf).
    infos = socket.getaddrinfo(hostname, port, type=socket.SOCK_STREAM)
    addresses: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        address = str(sockaddr[0]).split("%", 1)[0]
        if address not in addresses:
            addresses.append(address)
    return addresses


def url_check(url: str, *, always_allowed_hosts: Iterable[str] = (), resolve: bool = True) -> Target:
    """Check `url` against the policy and resolve its host; PermanentError names the URL and
    the reason. `always_allowed_hosts` bypass the allow-list (built-in provider endpoints),
    never the address check.

    With `resolve=False` only what the URL itself says is checked (http or https, no
    credentials, a host, and a host that is an IP address or `localhost` against
    AGENT_HTTP_ALLOW_PRIVATE: every request would refuse it), without a DNS lookup, and the
    Target has no addresses: the allow-list and the addresses a name resolves to are applied
    where the request is made."""
    import httpx  # here, not at module level: see http_agent's note on its import

    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise PermanentError(f"agent URL {url!r} is not a valid URL: {exc}") from None
    if parsed.scheme not in ("http", "https"):
        raise PermanentError(f"agent URL {url!r} refused: only http and https are allowed")
    if parsed.userinfo:
        raise PermanentError(
            "agent URL refused: credentials in a URL are not allowed (they would be logged; "
            "an LLM agent names the variable holding its key in api_key_env)"
        )
    # The host as it is sent (Host header, TLS SNI) and looked up: an internationalized name
    # in its xn-- form. httpx's `host` decodes it, and the resolver would encode that again by
    # IDNA 2003, which maps some names onto other domains (faß.de onto fass.de): the request,
    # and an API key with it, would go to that other domain's address.
    hostname = parsed.raw_host.decode("ascii").rstrip(".").lower()
    if not hostname:
        raise PermanentError(f"agent URL {url!r} refused: it has no host")
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        # httpx takes any number; 0 would be checked here as the scheme's default port
        raise PermanentError(f"agent URL {url!r} refused: port {parsed.port} is not a port number (1 to 65535)")
    if not resolve:
        # `localhost` and every name under it: a loopback address wherever it is looked up
        # (RFC 6761; glibc's resolver and systemd-resolved answer 127.0.0.1 for `x.localhost`).
        if hostname == "localhost" or hostname.endswith(".localhost"):
            _address_check(url, hostname, ["127.0.0.1"], literal=True)
        elif (address := _numeric_host(hostname)) is not None:  # else a name: resolved at request time
            _address_check(url, hostname, [str(address)], literal=True)
        return Target(url=parsed, hostname=hostname, addresses=())
    allowed = {_ascii_host(h) for h in settings.AGENT_HTTP_ALLOWED_HOSTS}
    if allowed and hostname not in allowed and hostname not in {h.lower() for h in always_allowed_hosts}:
        raise PermanentError(f"agent URL {url!r} refused: host {hostname!r} is not in AGENT_HTTP_ALLOWED_HOSTS")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        addresses = _resolve(hostname, port)
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_AGAIN:  # the resolver could not answer now: worth another try
            raise RetryableError(f"agent URL {url!r}: resolving {hostname!r} failed for now ({exc})") from None
        raise PermanentError(f"agent URL {url!r} refused: host {hostname!r} does not resolve ({exc})") from None
    except (OSError, UnicodeError) as exc:
        raise PermanentError(f"agent URL {url!r} refused: host {hostname!r} does not resolve ({exc})") from None
    if not addresses:
        raise PermanentError(f"agent URL {url!r} refused: host {hostname!r} has no address")
    _address_check(url, hostname, addresses, literal=False)
    return Target(url=parsed, hostname=hostname, addresses=tuple(addresses))


def _numeric_host(hostname: str) -> IPAddress | None:
    """The address a host spells, as the resolver reads it without asking DNS, or None for a
    name. Besides the usual forms, the resolver takes IPv4's older ones (inet_aton's: `127.1`,
    `2130706433`, `0x7f.1`, `017700000001`), which ipaddress does not: an agent made with one
    of those for 127.0.0.1 was accepted, then refused by every request."""
    try:
        return ipaddress.ip_address(hostname)
    except ValueError:
        pass
    if hostname and hostname[0].isdigit() and all(c in "0123456789abcdefx." for c in hostname):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(hostname))
        except OSError:  # a name made of such characters (`1abc.de`)
            return None
    return None


def _ascii_host(host: str) -> str:
    """An allow-list entry as a URL's host compares with it: lower case, no trailing dot, an
    internationalized name in its xn-- form (encoded as httpx encodes a URL's)."""
    import httpx  # here, not at module level: see url_check

    host = host.rstrip(".").lower()
    try:
        return httpx.URL(scheme="http", host=host).raw_host.decode("ascii")
    except httpx.InvalidURL:  # no URL's host is this entry: it matches none
        return host


def _address_check(url: str, hostname: str, addresses: list[str], *, literal: bool) -> None:
    """PermanentError if one of `addresses` (those `hostname` resolves to, or, `literal`, the
    address it is) may not be reached, unless AGENT_HTTP_ALLOW_PRIVATE."""
    if settings.AGENT_HTTP_ALLOW_PRIVATE:
        return
    for address in addresses:
        reason = address_refusal(ipaddress.ip_address(address))
        if reason:
            host = f"{hostname!r} is" if literal else f"{hostname!r} resolves to {address},"
            raise PermanentError(
                f"agent URL {url!r} refused: {host} a {reason} (set AGENT_HTTP_ALLOW_PRIVATE=true to allow)"
            )
