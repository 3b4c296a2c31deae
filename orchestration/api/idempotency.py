"""Idempotent workflow submission (`Idempotency-Key` on POST /workflows/).

- same key, same body: the workflow stored first, again (200);
- same key, different body: 422;
- same key while the first request is still being processed: 409.

The stored workflow keeps the spec as submitted, so the body is compared with that. The
in-flight check is a short Redis lock per (owner, key); the unique (owner, idempotency_key)
constraint remains the last word if a lock ever expires early.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from orchestration.api.exceptions import Conflict, Unprocessable
from orchestration.api.redis_store import store
from orchestration.models import Workflow

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255
LOCK_SECONDS = 60


def canonical(body: dict[str, Any]) -> str:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)


def replay(*, owner: Any, key: str, spec: dict[str, Any]) -> Workflow | None:
    """The workflow already stored under this key, if its spec is this body; raises
    Unprocessable if the key was used for a different body."""
    existing = Workflow.objects.filter(owner=owner, idempotency_key=key).first()
    if existing is None:
        return None
    if canonical(existing.spec) != canonical(json.loads(canonical(spec))):
        raise Unprocessable(
            f"Idempotency-Key {key!r} was already used for a different request body "
            f"(workflow {existing.workflow_id}); use a new key for a new workflow."
        )
    return existing


@contextmanager
def in_flight_guard(*, owner_id: int, key: str, on_busy: Callable[[], Workflow | None]) -> Iterator[Workflow | None]:
    """Hold the (owner, key) lock while the body runs. If another request holds it, yield
    what `on_busy` finds stored (the other request may just have finished) or raise 409."""
    lock_key = f"idempotency:{owner_id}:{key}"
    token = secrets.token_hex(16)
    backend = store()
    if not backend.acquire(lock_key, token, LOCK_SECONDS):
        finished = on_busy()
        if finished is None:
            raise Conflict(f"A request with Idempotency-Key {key!r} is still being processed; retry shortly.")
        yield finished
        return
    try:
        yield None
    finally:
        backend.release(lock_key, token)
