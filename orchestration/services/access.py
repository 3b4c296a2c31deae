"""Writes for access control: API keys."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from django.db import transaction

from orchestration.models import ApiKey


@transaction.atomic
def api_key_revoke(*, api_key_ids: Iterable[int], now: dt.datetime) -> list[int]:
    """Revoke the given keys that are not revoked yet and return their ids.

    A key revoked before keeps its original revoked_at. Expired keys are revoked too, so
    that extending expires_at later cannot bring them back. The rows are locked first, so
    two concurrent revocations report each key once.
    """
    revoked = list(
        ApiKey.objects.select_for_update()
        .filter(pk__in=list(api_key_ids), revoked_at__isnull=True)
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    ApiKey.objects.filter(pk__in=revoked).update(revoked_at=now)
    return revoked
