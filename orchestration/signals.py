"""post_migrate hook: keeps the role groups exact once every app's permissions exist, and the
SQLite triggers in place.

The data migration creates the groups; permissions of apps migrated later (and new models)
only exist after their own post_migrate, so the admin role's `*` is re-synced here.
"""

from typing import Any


def _last_app_with_models() -> str:
    from django.apps import apps

    return [c.label for c in apps.get_app_configs() if c.models_module is not None][-1]


def sync_roles_after_migrate(sender: Any, using: str = "default", **kwargs: Any) -> None:
    """After the last app's post_migrate every app's permissions exist: sync the roles then.
    On SQLite, also re-install the triggers a table rebuild may have dropped."""
    if sender.label != _last_app_with_models():
        return
    from django.contrib.auth.models import Group, Permission
    from django.db import connections

    from orchestration.roles import roles_sync
    from orchestration.sqlite_rules import sqlite_rules_install

    roles_sync(group_model=Group, permission_model=Permission)
    connection = connections[using]
    if connection.vendor == "sqlite":
        sqlite_rules_install(connection)
