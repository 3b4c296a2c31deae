"""Writes for access control: API keys.

A key reads `al_<prefix>_<secret>`. The prefix (8 hex characters) finds the row; only a
SHA-256 digest of the secret is stored. The secret carries 256 random bits, so a fast hash
is enough (a slow password hash would only cost time on every request) and is compared in
constant time.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import Q

from orchestration.errors import SpecError
from orchestration.event_types import EntityType, EventType
from orchestration.models import ApiKey
from orchestration.roles import PERMISSIONS, ROLES, user_role
from orchestration.services.events import Actor, event_record

KEY_SCHEME = "al"
# Seed 004 has no name for creating, changing and deactivating agents; only the admin's
# "*" grants it. A key may still be narrowed to it.
AGENT_MANAGE = "agent:manage"
# Training-data exports (every user's data): admins only, through "*".
EXPORT_READ = "export:read"
EXPORT_CREATE = "export:create"
KNOWN_PERMISSIONS = (*sorted(PERMISSIONS), AGENT_MANAGE)
LAST_USED_RESOLUTION = dt.timedelta(minutes=1)


@dataclass(frozen=True)
class NewApiKey:
    api_key: ApiKey
    key: str  # the full key; shown once, never stored


def api_key_secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def api_key_parse(key: str) -> tuple[str, str] | None:
    """(prefix, secret) of a well-formed key, else None."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_SCHEME or len(parts[1]) != 8 or not parts[2]:
        return None
    if parts[1].strip("0123456789abcdef"):
        return None  # a prefix is token_hex(4): anything else (a NUL, say) is no key of ours
    return parts[1], parts[2]


def api_key_matches(api_key: ApiKey, secret: str) -> bool:
    return hmac.compare_digest(api_key.secret_hash, api_key_secret_hash(secret))


def _beyond_role(owner: Any, permissions: set[str]) -> str | None:
    """The problem with listing `permissions` on a key of `owner`, if their role does not grant
    some of them (None if it grants all, or none are listed)."""
    if not permissions:
        return None
    role = user_role(owner)
    if role is None:
        return (
            f"permissions: {owner} has no role (admin, developer or viewer), so the key could not "
            f"grant {', '.join(sorted(permissions))}; give them a role first"
        )
    granted = ROLES[role]
    if "*" in granted:
        return None
    missing = sorted(p for p in permissions if p not in granted)
    if not missing:
        return None
    return (
        f"permissions: {owner}'s role ({role}) does not grant {', '.join(missing)}, so the key never "
        f"could (the role grants {', '.join(sorted(granted))})"
    )


def api_key_create(
    *,
    owner: Any,
    name: str,
    expires_at: dt.datetime | None = None,
    permissions: list[str] | None = None,
    now: dt.datetime | None = None,
    actor: Actor | None = None,
    rotated_from: ApiKey | None = None,
) -> NewApiKey:
    """Create a key for `owner` and return it with its full text, which exists only here.

    `permissions` (seed 004 names) narrows the key below the owner's role; empty means the
    role's permissions. Raises SpecError naming each problem (blank or duplicate name,
    expiry in the past, unknown permission, one the owner's role does not grant). An
    api_key_created event names it (never its secret) and `actor`, who made it.
    """
    problems = []
    name = (name or "").strip()
    if not name:
        problems.append("name must not be empty")
    elif len(name) > ApiKey._meta.get_field("name").max_length:
        problems.append("name is longer than 100 characters")
    if expires_at is not None:
        try:
            # In UTC, as the column stores it: a moment past 9999-12-31 UTC would be stored,
            # and then no query could read the row back (the key, the console's key list).
            expires_at = expires_at.astimezone(dt.UTC)
        except OverflowError:
            problems.append(f"expires_at {expires_at.isoformat()} is after 9999-12-31 UTC")
            expires_at = None
    if expires_at is not None and expires_at <= (now or dt.datetime.now(dt.UTC)):
        problems.append(f"expires_at {expires_at.isoformat()} is in the past")
    unknown = sorted(set(permissions or []) - set(KNOWN_PERMISSIONS))
    if unknown:
        problems.append(f"permissions: unknown {', '.join(unknown)} (known: {', '.join(KNOWN_PERMISSIONS)})")
    # A key grants only what its owner's role grants too: it could never be used for these. A
    # rotation keeps the key as it was (its owner's role may have narrowed since): replacing a
    # leaked key must not be refused.
    beyond = _beyond_role(owner, set(permissions or []) - set(unknown)) if rotated_from is None else None
    if beyond:
        problems.append(beyond)
    if name and ApiKey.objects.filter(owner=owner, name=name).exists():
        problems.append(f"name: {owner} already has a key named {name!r}")
    if problems:
        raise SpecError(problems)
    secret = secrets.token_urlsafe(32)
    for _ in range(5):
        prefix = secrets.token_hex(4)
        try:
            with transaction.atomic():
                api_key = ApiKey.objects.create(
                    prefix=prefix,
                    secret_hash=api_key_secret_hash(secret),
                    name=name,
                    owner=owner,
                    permissions=sorted(set(permissions or [])),
                    expires_at=expires_at,
                )
                api_key_event(
                    api_key,
                    EventType.API_KEY_CREATED,
                    actor,
                    **({"rotated_from": rotated_from.prefix} if rotated_from else {}),
                )
        except IntegrityError:
            if ApiKey.objects.filter(owner=owner, name=name).exists():
                raise SpecError([f"name: {owner} already has a key named {name!r}"]) from None
            continue  # prefix collision (1 in 4 billion per key): draw another
        return NewApiKey(api_key=api_key, key=f"{KEY_SCHEME}_{prefix}_{secret}")
    raise RuntimeError("could not draw an unused API key prefix")


def api_key_mark_used(*, api_key: ApiKey, now: dt.datetime) -> bool:
    """Record that the key was used, at most once per LAST_USED_RESOLUTION: a conditional
    UPDATE, so concurrent requests write once and most requests do not write at all."""
    if api_key.last_used_at is not None and now - api_key.last_used_at < LAST_USED_RESOLUTION:
        return False
    stale = Q(last_used_at__isnull=True) | Q(last_used_at__lt=now - LAST_USED_RESOLUTION)
    changed = ApiKey.objects.filter(stale, pk=api_key.pk).update(last_used_at=now)
    api_key.last_used_at = now
    return changed == 1


@transaction.atomic
def api_key_revoke(
    *, api_key_ids: Iterable[int], now: dt.datetime, actor: Actor | None = None, rotated_to: ApiKey | None = None
) -> list[int]:
    """Revoke the given keys that are not revoked yet and return their ids; each gets an
    api_key_revoked event naming `actor`.

    A key revoked before keeps its original revoked_at. Expired keys are revoked too, so
    that extending expires_at later cannot bring them back. The rows are locked first, so
    two concurrent revocations report each key once.
    """
    revoked = list(
        ApiKey.objects.select_for_update()
        .select_related("owner")
        .filter(pk__in=list(api_key_ids), revoked_at__isnull=True)
        .order_by("pk")
    )
    ApiKey.objects.filter(pk__in=[key.pk for key in revoked]).update(revoked_at=now)
    for api_key in revoked:
        extra = {"rotated_to": rotated_to.prefix} if rotated_to else {}
        api_key_event(api_key, EventType.API_KEY_REVOKED, actor, **extra)
    return [key.pk for key in revoked]


@transaction.atomic
def api_key_rotate(*, api_key_id: int, now: dt.datetime, actor: Actor | None = None) -> NewApiKey:
    """Replace a key: a new key for the same owner, permissions and expiry, named after the
    old one, and the old one revoked, in one transaction."""
    old = ApiKey.objects.select_for_update().select_related("owner").get(pk=api_key_id)
    if old.revoked_at is not None:
        raise SpecError([f"key {old.prefix} is revoked; create a new key instead"])
    if old.expires_at is not None and old.expires_at <= now:
        raise SpecError([f"key {old.prefix} has expired; create a new key instead"])
    suffix = f" (rotated {now:%Y-%m-%d %H:%M:%S})"
    name = old.name[: ApiKey._meta.get_field("name").max_length - len(suffix)] + suffix
    created = api_key_create(
        owner=old.owner,
        name=name,
        expires_at=old.expires_at,
        permissions=old.permissions,
        now=now,
        actor=actor,
        rotated_from=old,
    )
    api_key_revoke(api_key_ids=[old.pk], now=now, actor=actor, rotated_to=created.api_key)
    return created


def api_key_event(api_key: ApiKey, event_type: EventType, actor: Actor | None, **extra: Any) -> None:
    event_record(
        event_type=event_type,
        entity_type=EntityType.API_KEY,
        entity_id=str(api_key.pk),
        payload={
            "prefix": api_key.prefix,
            "name": api_key.name,
            "owner": api_key.owner.get_username() if api_key.owner_id else None,
            "permissions": api_key.permissions,
            "expires_at": api_key.expires_at.isoformat() if api_key.expires_at else None,
            **extra,
            **(actor or {}),
        },
    )
