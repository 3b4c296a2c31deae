"""The idempotent-submission service behind POST /workflows/ (the view only calls it)."""

from __future__ import annotations

import pytest
from rest_framework.exceptions import ValidationError

from orchestration.api.exceptions import Conflict, Unprocessable
from orchestration.api.idempotency import HEADER, workflow_submit_idempotent
from orchestration.api.redis_store import store
from orchestration.models import Workflow
from tests.api.conftest import SPEC


def _fields(error: pytest.ExceptionInfo[ValidationError]) -> list[str]:
    return list(error.value.detail)


def test_without_a_key_every_call_stores_a_workflow(callers):
    owner = callers["developer"].user
    first, created_first = workflow_submit_idempotent(owner=owner, body=dict(SPEC), header_key=None)
    second, created_second = workflow_submit_idempotent(owner=owner, body=dict(SPEC), header_key=None)
    assert created_first and created_second
    assert first.pk != second.pk
    assert first.idempotency_key is None


def test_the_same_key_and_body_return_the_first_workflow(callers):
    owner = callers["developer"].user
    first, created = workflow_submit_idempotent(owner=owner, body=dict(SPEC), header_key="k-1")
    again, created_again = workflow_submit_idempotent(owner=owner, body=dict(SPEC), header_key="k-1")
    in_body, created_in_body = workflow_submit_idempotent(
        owner=owner, body={**SPEC, "idempotency_key": "k-1"}, header_key=None
    )
    assert created and not created_again and not created_in_body
    assert first.pk == again.pk == in_body.pk
    assert first.idempotency_key == "k-1"
    assert Workflow.objects.count() == 1


def test_the_same_key_with_another_body_is_unprocessable(callers):
    owner = callers["developer"].user
    workflow_submit_idempotent(owner=owner, body=dict(SPEC), header_key="k-1")
    with pytest.raises(Unprocessable, match="already used for a different request body"):
        workflow_submit_idempotent(owner=owner, body={**SPEC, "name": "other"}, header_key="k-1")


def test_a_key_in_flight_is_a_conflict(callers):
    owner = callers["developer"].user
    lock = f"idempotency:{owner.pk}:k-1"
    assert store().acquire(lock, "someone-else", 60)
    try:
        with pytest.raises(Conflict, match="still being processed"):
            workflow_submit_idempotent(owner=owner, body=dict(SPEC), header_key="k-1")
    finally:
        store().release(lock, "someone-else")
    assert Workflow.objects.count() == 0


@pytest.mark.parametrize(
    "body, header_key, field",
    [
        ([SPEC], None, "spec"),
        ("text", None, "spec"),
        ({**SPEC, "idempotency_key": 42}, None, "idempotency_key"),
        ({**SPEC, "idempotency_key": "a"}, "b", "idempotency_key"),
        (SPEC, "", HEADER),
        (SPEC, "k" * 256, HEADER),
        (SPEC, "line\nbreak", HEADER),
        # A key given in the body alone is named as the body's field, not as a header the
        # request did not send.
        ({**SPEC, "idempotency_key": "k" * 256}, None, "idempotency_key"),
        ({**SPEC, "idempotency_key": ""}, None, "idempotency_key"),
    ],
    ids=[
        "list",
        "string",
        "key-not-a-string",
        "keys-differ",
        "empty-key",
        "long-key",
        "unprintable-key",
        "long-body-key",
        "empty-body-key",
    ],
)
def test_bad_bodies_and_keys_name_the_field_and_store_nothing(callers, body, header_key, field):
    with pytest.raises(ValidationError) as error:
        workflow_submit_idempotent(owner=callers["developer"].user, body=body, header_key=header_key)
    assert _fields(error) == [field]
    assert Workflow.objects.count() == 0
