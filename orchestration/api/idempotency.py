"""Idempotent workflow submission (`Idempotency-Key` on POST /workflows/, or the body's
`idempotency_key`).

- same key, same body: the workflow stored first, again (200);
- same key, different body: 422;
- same key while the first request is still being processed: 409, with Retry-After.

The stored workflow keeps the spec as submitted, so the body is compared with that. The
in-flight check is a short Redis lock per (owner, key); the unique (owner, idempotency_key)
constraint remains the last word if a lock ever expires early.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rest_framework.exceptions import ValidationError

from orchestration.api.exceptions import Conflict, Unprocessable
from orchestration.api.parsers import unstorable_field, unstorable_text
from orchestration.api.redis_store import store
from orchestration.errors import IdempotencyKeyReused
from orchestration.models import Workflow
from orchestration.services.specs import spec_validate
from orchestration.services.workflows import workflow_spec_is, workflow_submit

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255
LOCK_SECONDS = 60


class StillInFlight(Conflict):
    # Retry-After: a submission is one transaction, done well within a second; LOCK_SECONDS
    # bounds only one that hangs, and a client told to wait that long for the usual case would
    # wait a minute for a workflow stored long before. A retry that comes too soon is this
    # answer again, and as cheap.
    wait = 1


def replay(*, owner: Any, key: str, spec: dict[str, Any]) -> Workflow | None:
    """The workflow already stored under this key, if its spec is this body; raises
    Unprocessable if the key was used for a different body."""
    existing = Workflow.objects.filter(owner=owner, idempotency_key=key).first()
    if existing is None:
        return None
    if not workflow_spec_is(existing, spec):
        raise _reused(key, existing.workflow_id)
    return existing


def _reused(key: str, workflow_id: str) -> Unprocessable:
    return Unprocessable(
        f"Idempotency-Key {key!r} was already used for a different request body "
        f"(workflow {workflow_id}); use a new key for a new workflow."
    )


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
            raise StillInFlight(f"A request with Idempotency-Key {key!r} is still being processed; retry shortly.")
        yield finished
        return
    try:
        yield None
    finally:
        backend.release(lock_key, token)


def workflow_submit_idempotent(*, owner: Any, body: Any, header_key: str | None) -> tuple[Workflow, bool]:
    """Submit the request body `body` as a workflow of `owner`; returns (workflow, created).

    Without a key (the Idempotency-Key header, `header_key`, or the body's
    `idempotency_key`) every call stores a new workflow. With one, the workflow already
    stored under the key is returned (created False) if its spec is this body; a key used
    for another body raises Unprocessable, and one whose first request is still in flight
    raises Conflict. Raises ValidationError naming the field for a body that is not an
    object, a malformed key, or a body key that differs from the header's."""
    if not isinstance(body, dict):
        raise ValidationError({"spec": ["must be a JSON object with at least 'name' and 'tasks'"]})
    if unstorable_text(body):
        # Not to be looked up, nor stored: the spec's problems, this among them, all at once.
        spec_validate(body)
        field, problem = unstorable_field(body)  # (spec_validate names it: never reached)
        raise ValidationError({field: [problem]} if field else [f"The request body {problem}."])
    if "idempotency_key" in body and not isinstance(body["idempotency_key"], str):
        raise ValidationError({"idempotency_key": ["must be a string"]})
    key = header_key if header_key is not None else body.get("idempotency_key")
    if key is None:
        return workflow_submit(spec=body, owner=owner)
    if header_key is not None and not header_key.isascii():
        # The server hands a header's bytes over as Latin-1 (WSGI), whatever the client meant
        # by them: `é` sent as UTF-8 would be stored as `Ã©`, and the same key sent in the body
        # would not match it. Keys beyond ASCII go in the body, which is UTF-8 by definition.
        problem = f"must be 1 to {MAX_KEY_LENGTH} printable ASCII characters (others go in the body's idempotency_key)"
        raise ValidationError({HEADER: [problem]})
    if not 1 <= len(key) <= MAX_KEY_LENGTH or not key.isprintable():
        # Named as the request gave it: the header, or the body's field.
        field = HEADER if header_key is not None else "idempotency_key"
        raise ValidationError({field: [f"must be 1 to {MAX_KEY_LENGTH} printable characters"]})
    if body.get("idempotency_key") not in (None, key):
        raise ValidationError({"idempotency_key": ["differs from the Idempotency-Key header"]})
    spec = {**body, "idempotency_key": key}
    existing = replay(owner=owner, key=key, spec=spec)
    if existing is not None:
        return existing, False

    def stored() -> Workflow | None:
        return replay(owner=owner, key=key, spec=spec)

    with in_flight_guard(owner_id=owner.pk, key=key, on_busy=stored) as finished:
        if finished is not None:
            return finished, False
        try:
            # Stored meanwhile by a request whose lock had expired: still the same key, so the
            # same rules (workflow_submit compares the specs).
            return workflow_submit(spec=spec, owner=owner)
        except IdempotencyKeyReused as exc:
            raise _reused(key, exc.workflow_id) from None
