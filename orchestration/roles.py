"""Roles: seed 004's roles.json, mapped onto Django groups and permissions.

Each role's seed permission names map onto Django model permissions. `*` (admin) means
every permission that exists; `roles_sync` is idempotent and runs from the data migration
and after every `migrate`, so the admin group also covers permissions of apps added later.
"""

from __future__ import annotations

from typing import Any

ROLES: dict[str, list[str]] = {
    "admin": ["*"],
    "developer": ["agent:execute", "workflow:create", "workflow:read"],
    "viewer": ["workflow:read", "agent:list"],
}

# The strongest first: a user in several role groups has the first of them.
ROLE_ORDER = ("admin", "developer", "viewer")
ADMIN = "admin"


def user_role(user: Any) -> str | None:
    """The user's role: the strongest of their role groups (a superuser is admin), None for
    none; cached on the user object (for the request, or the key being made)."""
    if not getattr(user, "is_authenticated", False):
        return None
    if not hasattr(user, "_api_role"):
        if user.is_superuser:
            role = ADMIN
        else:
            names = set(user.groups.filter(name__in=ROLE_ORDER).values_list("name", flat=True))
            role = next((r for r in ROLE_ORDER if r in names), None)
        user._api_role = role
    return user._api_role


# seed permission -> Django permissions as "app_label.codename"
PERMISSIONS: dict[str, list[str]] = {
    "workflow:read": [
        "orchestration.view_workflow",
        "orchestration.view_taskexecution",
        "orchestration.view_taskattempt",
        "orchestration.view_event",
        "orchestration.view_agentinteraction",
    ],
    "workflow:create": ["orchestration.add_workflow"],
    "agent:list": ["orchestration.view_agent"],
    "agent:execute": [
        "orchestration.execute_agent",
        "orchestration.add_agentplaygroundmessage",
        "orchestration.view_agentplaygroundmessage",
    ],
    # Exports hold every user's data: no role but admin's "*" grants these (a key may be
    # narrowed to them). Listed so the admin console's permissions match the API's.
    "export:read": ["training_export.view_exportrun"],
    "export:create": ["training_export.add_exportrun"],
}


def django_permissions_for(role: str) -> list[str] | None:
    """The Django permissions of a role; None means all of them."""
    seed_permissions = ROLES[role]
    if "*" in seed_permissions:
        return None
    names: list[str] = []
    for seed_permission in seed_permissions:
        names.extend(PERMISSIONS[seed_permission])
    return sorted(set(names))


def roles_sync(*, group_model: Any, permission_model: Any) -> None:
    """Create the role groups and set their permissions to exactly what ROLES says."""
    for role in ROLES:
        group, _ = group_model.objects.get_or_create(name=role)
        names = django_permissions_for(role)
        if names is None:
            permissions = list(permission_model.objects.all())
        else:
            permissions = []
            for name in names:
                app_label, codename = name.split(".", 1)
                permissions.append(permission_model.objects.get(content_type__app_label=app_label, codename=codename))
        group.permissions.set(permissions)
