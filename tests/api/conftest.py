"""Fixtures for the REST API tests: a user per role, each with an API key, and clients."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from django.core.management import call_command
from rest_framework.test import APIClient

from orchestration.services.access import api_key_create
from tests.engine import flush_redis
from tests.factories import UserFactory
from tests.orchestration.conftest import engine  # noqa: F401  (real Celery workers)

ROLES = ("admin", "developer", "viewer")


@dataclass
class Caller:
    user: Any
    key: str
    client: APIClient


def make_caller(username: str, role: str | None, **key_kwargs: Any) -> Caller:
    user = UserFactory(username=username, role=role)
    key = api_key_create(owner=user, name="tests", **key_kwargs).key
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return Caller(user=user, key=key, client=client)


@pytest.fixture(autouse=True)
def clean_redis() -> Iterator[None]:
    """Rate-limit counters and idempotency locks live in Redis: start each test empty."""
    flush_redis()
    yield
    flush_redis()


@pytest.fixture
def agents(db: None) -> None:
    call_command("load_agents", stdout=io.StringIO())


@pytest.fixture
def callers(db: None, agents: None) -> dict[str, Caller]:
    """admin, developer, viewer, a second developer ("other") and a user with no role."""
    return {
        "admin": make_caller("alice", "admin"),
        "developer": make_caller("dev", "developer"),
        "viewer": make_caller("vic", "viewer"),
        "other": make_caller("eve", "developer"),
        "norole": make_caller("nobody", None),
    }


@pytest.fixture
def anonymous() -> APIClient:
    return APIClient()


SPEC = {"name": "api test", "tasks": [{"name": "a", "agent": "echo", "input": {"text": "hi"}}]}


@pytest.fixture
def submit() -> Callable[..., Any]:
    """Submit SPEC (or a given spec) as a caller, through the API."""

    def _submit(caller: Caller, spec: dict | None = None, **headers: str) -> Any:
        return caller.client.post("/api/v1/workflows/", spec or SPEC, format="json", **headers)

    return _submit
