"""Roles (seed 004) as DRF permission classes.

A user's role is the strongest of their role groups (a superuser is admin). An API key may
narrow it: a key with `permissions` set grants only those of its owner's permissions.
Ownership is enforced by the views' querysets (another user's object is a 404).
"""

from __future__ import annotations

from typing import Any

from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from orchestration.models import ApiKey
from orchestration.roles import ADMIN, ROLES, user_role
from orchestration.services.access import KNOWN_PERMISSIONS


def request_role(request: Request) -> str | None:
    return user_role(request.user)


def is_admin(request: Request) -> bool:
    return request_role(request) == ADMIN


def has_permission(request: Request, permission: str) -> bool:
    role = request_role(request)
    if role is None:
        return False
    granted = ROLES[role]
    if "*" not in granted and permission not in granted:
        return False
    api_key = request.auth if isinstance(request.auth, ApiKey) else None
    if api_key is not None and api_key.permissions:
        return "*" in api_key.permissions or permission in api_key.permissions
    return True


def effective_permissions(request: Request) -> list[str]:
    role = request_role(request)
    if role is None:
        return []
    names = KNOWN_PERMISSIONS if "*" in ROLES[role] else sorted(ROLES[role])
    return [name for name in names if has_permission(request, name)]


class HasRole(BasePermission):
    """Any of the three roles (agents list/retrieve, `me`)."""

    message = "Your account has no role (admin, developer or viewer); ask an administrator for one."

    def has_permission(self, request: Request, view: Any) -> bool:
        return request_role(request) is not None


def _action(request: Request, view: Any) -> str | None:
    """The action a request runs: a viewset's (None for a method it does not map), else the
    handler's method name. HEAD is GET without the body, so it needs what GET needs: Django
    gives an APIView a `head` that is its `get`, which no `required_permissions` names. An
    OPTIONS answer (DRF's metadata) asks the permission of each method it would list with a
    copy of the request under that method: the action that method maps to."""
    method = "get" if request.method == "HEAD" else request.method.lower()
    if not hasattr(view, "action"):
        return method if hasattr(view, method) else None
    if view.action == "metadata" and request.method != "OPTIONS":
        return getattr(view, "action_map", {}).get(method)
    return view.action


class ActionPermission(BasePermission):
    """The seed permission a view names for the current action in `required_permissions`
    ({action: permission}); an action the mapping does not name is refused."""

    def has_permission(self, request: Request, view: Any) -> bool:
        role = request_role(request)
        if role is None:
            self.message = HasRole.message
            return False
        action = _action(request, view)
        if action is None:
            return True  # no handler for this method: the view answers 405
        if action in ("options", "metadata"):
            return True
        required = view.required_permissions.get(action)
        if required is None:
            return False
        if has_permission(request, required):
            return True
        self.message = f"Your role ({role}) does not grant {required}, which this operation needs."
        role_grants = "*" in ROLES[role] or required in ROLES[role]
        if role_grants and isinstance(request.auth, ApiKey) and request.auth.permissions:
            self.message = f"This API key does not grant {required}, which this operation needs."
        return False
