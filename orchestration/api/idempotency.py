"""Idempotent workflow submission (`Idempotency-Key` on POST /workflows/, or the body's
`idempotency_key`) and message posts (`Idempotency-Key` on POST
/conversations/{instance_id}/messages/).

- same key, same body: the workflow stored first, again (200); the message posted first, its
  answer again (202, same message and reply task: nothing is queued);
- same key, different body: 422;
- same key while the first request is still being processed: 409, with Retry-After.

The stored workflow keeps the spec as submitted, so the body is compared with that; a stored
message keeps its thread, agent and content, the whole request. The in-flight check is a
short Redis lock per (owner, key); the unique (owner, idempotency_key) constraint remains the
last word if a lock ever expires early. Workflows and messages are separate key spaces.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import redis
from django.db import IntegrityError
from rest_framework.exceptions import ValidationError

from orchestration.api.exceptions import Conflict, Unprocessable
from orchestration.api.parsers import unstorable_field, unstorable_text
from orchestration.api.redis_store import store
from orchestration.errors import IdempotencyKeyReused
from orchestration.models import Agent, AgentPlaygroundMessage, Workflow
from orchestration.services.conversations import conversation_message_post
from orchestration.services.specs import spec_validate
from orchestration.services.workflows import workflow_spec_is, workflow_submit

logger = logging.getLogger(__name__)

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255
LOCK_SECONDS = 60
WORKFLOWS = "idempotency"
MESSAGES = "idempotency:messages"

Stored = TypeVar("Stored")


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


def header_key_check(key: str, *, body_field: bool = False) -> None:
    """ValidationError naming the header unless `key` can be an Idempotency-Key header
    (`body_field`: the request may give keys beyond ASCII in the body's idempotency_key)."""
    if not key.isascii():
        # The server hands a header's bytes over as Latin-1 (WSGI), whatever the client meant
        # by them: `é` sent as UTF-8 would be stored as `Ã©`, and the same key sent in the body
        # would not match it. Keys beyond ASCII go in the body, which is UTF-8 by definition.
        others = " (others go in the body's idempotency_key)" if body_field else ""
        raise ValidationError({HEADER: [f"must be 1 to {MAX_KEY_LENGTH} printable ASCII characters{others}"]})
    if not 1 <= len(key) <= MAX_KEY_LENGTH or not key.isprintable():
        raise ValidationError({HEADER: [f"must be 1 to {MAX_KEY_LENGTH} printable characters"]})


@contextmanager
def in_flight_guard(
    *, owner_id: int, key: str, on_busy: Callable[[], Stored | None], namespace: str = WORKFLOWS
) -> Iterator[Stored | None]:
    """Hold the (owner, key) lock of `namespace` while the body runs. If another request
    holds it, yield what `on_busy` finds stored (the other request may just have finished)
    or raise 409."""
    lock_key = f"{namespace}:{owner_id}:{key}"
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
        try:
            backend.release(lock_key, token)
        except redis.RedisError as exc:
            # Redis went away while the body ran: the workflow may be committed by now, and a
            # client answered 500 for it would send it again. The lock expires by itself (a
            # request with the key meanwhile is answered from what is stored, by on_busy).
            logger.warning("idempotency lock %s not released, Redis did not answer: %s", lock_key, exc)


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
    if header_key is not None:
        header_key_check(header_key, body_field=True)
    elif not 1 <= len(key) <= MAX_KEY_LENGTH or not key.isprintable():
        raise ValidationError({"idempotency_key": [f"must be 1 to {MAX_KEY_LENGTH} printable characters"]})
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


def message_replay(
    *, owner: Any, key: str, instance_id: str, agent: Agent, content: str
) -> AgentPlaygroundMessage | None:
    """The message `owner` already posted under this key, if it was this request (thread,
    agent and content); raises Unprocessable if the key was used for another."""
    existing = AgentPlaygroundMessage.objects.filter(owner=owner, idempotency_key=key).first()
    if existing is None:
        return None
    if (existing.instance_id, existing.agent_id, existing.content) != (instance_id, agent.pk, content):
        raise Unprocessable(
            f"Idempotency-Key {key!r} was already used for a different request (message {existing.message_id} "
            f"of conversation {existing.instance_id!r}); use a new key for a new message."
        )
    return existing


def conversation_message_post_idempotent(
    *, owner: Any, agent: Agent, instance_id: str, content: str, header_key: str | None
) -> tuple[AgentPlaygroundMessage, bool]:
    """Post `content` to the thread `instance_id` as `owner`; returns (message, created).

    Without a key (the Idempotency-Key header, `header_key`) every call posts a message. With
    one, the message already posted under the key is returned (created False: nothing is
    stored or queued, whatever became of its reply) if it was this request; a key used for
    another raises Unprocessable, and one whose first request is still in flight raises
    Conflict. Raises ValidationError naming the header for a malformed key."""
    if header_key is None:
        return conversation_message_post(agent=agent, instance_id=instance_id, content=content, owner=owner), True
    header_key_check(header_key)

    def stored() -> AgentPlaygroundMessage | None:
        return message_replay(owner=owner, key=header_key, instance_id=instance_id, agent=agent, content=content)

    existing = stored()
    if existing is not None:
        return existing, False
    with in_flight_guard(owner_id=owner.pk, key=header_key, on_busy=stored, namespace=MESSAGES) as finished:
        if finished is None:
            # Committed by the request that held the lock until just now: its reply pending,
            # the post below would be refused as busy.
            finished = stored()
        if finished is not None:
            return finished, False
        try:
            return conversation_message_post(
                agent=agent, instance_id=instance_id, content=content, owner=owner, idempotency_key=header_key
            ), True
        except IntegrityError:
            # Stored meanwhile under the key by a request whose lock had expired (the unique
            # (owner, idempotency_key) index): the same rules.
            finished = stored()
            if finished is None:
                raise
            return finished, False
