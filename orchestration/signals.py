"""post_migrate hook: keeps the role groups exact once every app's permissions exist.

The data migration creates the groups; permissions of apps migrated later (and new models)
only exist after their own post_migrate, so the admin role's `*` is re-synced here.
"""

from typing import Any


def sync_roles_after_migrate(sender: Any, using: str = "default", **kwargs: Any) -> None:
    if sender.name != "orchestration":
        return
    from django.contrib.auth.models import Group, Permission

    from orchestration.roles import roles_sync

    roles_sync(group_model=Group, permission_model=Permission)
