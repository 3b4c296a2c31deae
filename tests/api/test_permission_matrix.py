"""`_action` (HEAD as GET, OPTIONS' per-method checks) changes no outcome of the other
methods: for every API endpoint, method, role and a narrowed key, a request is refused (403)
exactly when the action mapping before it refused it."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.urls import URLPattern, URLResolver, get_resolver
from rest_framework.test import APIClient

from orchestration.api import permissions
from tests.factories import ApiKeyFactory, UserFactory

METHODS = ("get", "post", "put", "patch", "delete")


def _previous_action(request: Any, view: Any) -> str | None:
    if hasattr(view, "action"):
        return view.action
    return request.method.lower() if hasattr(view, request.method.lower()) else None


def _paths(patterns: list[Any], prefix: str = "") -> list[str]:
    found = []
    for entry in patterns:
        route = prefix + str(entry.pattern)
        if isinstance(entry, URLResolver):
            found += _paths(entry.url_patterns, route)
        elif isinstance(entry, URLPattern) and "format" not in route:
            path = re.sub(r"\(\?P<\w+>[^)]*\)", "x1", route)
            path = re.sub(r"<(?:\w+:)?\w+>", "x1", path)
            found.append("/" + path.replace("^", "").replace("$", "").replace("\\", ""))
    return sorted({p for p in found if p.startswith("/api/")})


@pytest.fixture
def clients(db) -> dict[str, APIClient]:
    out = {}
    for role in ("admin", "developer", "viewer"):
        client = APIClient()
        client.force_authenticate(UserFactory(role=role))
        out[role] = client
    narrowed = UserFactory(role="developer")
    key = ApiKeyFactory(owner=narrowed, permissions=["view_workflows"])
    client = APIClient()
    client.force_authenticate(narrowed, token=key)
    out["narrowed key"] = client
    out["no role"] = APIClient()
    out["no role"].force_authenticate(UserFactory())
    return out


def _matrix(clients: dict[str, APIClient]) -> dict[tuple[str, str, str], bool]:
    matrix = {}
    for path in _paths(get_resolver().url_patterns):
        for method in METHODS:
            for who, client in clients.items():
                response = getattr(client, method)(path, {}, format="json")
                matrix[path, method, who] = response.status_code == 403
    return matrix


def test_no_get_post_put_patch_delete_outcome_changes(clients, monkeypatch, settings):
    # Two walks of every path and method: a refused request counts against the rate limit too.
    settings.API_RATE_LIMITS = dict.fromkeys(settings.API_RATE_LIMITS, 10_000)
    settings.API_RATE_LIMIT_ANONYMOUS = 10_000  # the account without a role's budget
    after = _matrix(clients)
    assert len({path for path, _m, _w in after}) > 10  # the walk found the API
    monkeypatch.setattr(permissions, "_action", _previous_action)
    before = _matrix(clients)
    changed = {cell: (before[cell], after[cell]) for cell in after if before[cell] != after[cell]}
    assert changed == {}


def test_the_matrix_refuses_something_to_each_narrower_caller(clients):
    refused = {who for (_p, _m, who), is_refused in _matrix(clients).items() if is_refused}
    assert refused == {"developer", "viewer", "narrowed key", "no role"}
