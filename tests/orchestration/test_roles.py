"""Roles admin / developer / viewer (seed 004's roles.json) as groups after migrate."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group, Permission

from orchestration.roles import django_permissions_for
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

DEVELOPER = {
    # workflow:create
    "orchestration.add_workflow",
    # workflow:read
    "orchestration.view_workflow",
    "orchestration.view_taskexecution",
    "orchestration.view_taskattempt",
    "orchestration.view_event",
    "orchestration.view_agentinteraction",
    # agent:execute
    "orchestration.execute_agent",
    "orchestration.add_agentplaygroundmessage",
    "orchestration.view_agentplaygroundmessage",
}
VIEWER = {
    # workflow:read
    "orchestration.view_workflow",
    "orchestration.view_taskexecution",
    "orchestration.view_taskattempt",
    "orchestration.view_event",
    "orchestration.view_agentinteraction",
    # agent:list
    "orchestration.view_agent",
}


def group_permissions(name: str) -> set[str]:
    permissions = Group.objects.get(name=name).permissions.values_list("content_type__app_label", "codename")
    return {f"{app_label}.{codename}" for app_label, codename in permissions}


def test_role_groups_exist_after_migrate() -> None:
    assert set(Group.objects.values_list("name", flat=True)) >= {"admin", "developer", "viewer"}


@pytest.mark.parametrize(("role", "expected"), [("developer", DEVELOPER), ("viewer", VIEWER)])
def test_role_has_exactly_its_permissions(role: str, expected: set[str]) -> None:
    assert group_permissions(role) == expected
    assert set(django_permissions_for(role)) == expected


def test_admin_has_every_permission() -> None:
    permissions = Group.objects.get(name="admin").permissions

    assert permissions.count() == Permission.objects.count()
    assert set(permissions.values_list("pk", flat=True)) == set(Permission.objects.values_list("pk", flat=True))
    assert {"training_export.add_exportrun", "auth.delete_user", "orchestration.execute_agent"} <= group_permissions(
        "admin"
    )


def test_viewer_can_add_change_or_delete_nothing() -> None:
    viewer = UserFactory(role="viewer")
    writes = Permission.objects.exclude(codename__startswith="view_")
    names = [
        f"{app_label}.{codename}" for app_label, codename in writes.values_list("content_type__app_label", "codename")
    ]

    assert len(names) == Permission.objects.count() - Permission.objects.filter(codename__startswith="view_").count()
    assert [name for name in names if viewer.has_perm(name)] == []
    assert viewer.has_perm("orchestration.view_workflow")


def test_developer_can_submit_workflows_and_run_agents_but_not_change_them() -> None:
    developer = UserFactory(role="developer")

    assert developer.has_perms(["orchestration.add_workflow", "orchestration.execute_agent"])
    assert not developer.has_perm("orchestration.change_workflow")
    assert not developer.has_perm("orchestration.delete_taskexecution")
    assert not developer.has_perm("orchestration.view_agent")
