"""API keys sent as `Authorization: Bearer al_<prefix>_<secret>`."""

from __future__ import annotations

from typing import Any

from django.db.models import OuterRef
from django.utils import timezone
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.request import Request

from orchestration.api.permissions import ADMIN, role_subquery
from orchestration.models import ApiKey
from orchestration.services.access import api_key_mark_used, api_key_matches, api_key_parse


class ApiKeyAuthentication(BaseAuthentication):
    keyword = b"bearer"

    def authenticate(self, request: Request) -> tuple[Any, ApiKey] | None:
        header = get_authorization_header(request).split()
        if not header or header[0].lower() != self.keyword:
            return None
        if len(header) != 2:
            raise AuthenticationFailed("The Authorization header must be 'Bearer <API key>'.")
        try:
            key = header[1].decode("ascii")
        except UnicodeDecodeError:
            raise AuthenticationFailed("The API key is malformed.") from None
        parsed = api_key_parse(key)
        if parsed is None:
            raise AuthenticationFailed("The API key is malformed (expected al_<prefix>_<secret>).")
        prefix, secret = parsed
        api_key = (
            ApiKey.objects.select_related("owner")
            .annotate(owner_role=role_subquery(OuterRef("owner_id")))
            .filter(prefix=prefix)
            .first()
        )
        # The same answer for an unknown prefix and a wrong secret: nothing to probe.
        if api_key is None or not api_key_matches(api_key, secret):
            raise AuthenticationFailed("Invalid API key.")
        now = timezone.now()
        if api_key.revoked_at is not None:
            raise AuthenticationFailed("This API key has been revoked.")
        if api_key.expires_at is not None and api_key.expires_at <= now:
            raise AuthenticationFailed("This API key has expired.")
        if not api_key.owner.is_active:
            raise AuthenticationFailed("The owner of this API key is inactive.")
        api_key_mark_used(api_key=api_key, now=now)
        owner = api_key.owner
        owner._api_role = ADMIN if owner.is_superuser else api_key.owner_role
        return owner, api_key

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="api"'
