"""A user message posted through the API is stored as it was written, within the configured
limit. (Found by an audit and failing before its fix.)"""

from __future__ import annotations

from orchestration.models import AgentPlaygroundMessage


def test_a_posted_message_is_stored_as_written_whitespace_included(callers):
    """DRF's CharField trims by default: the first line of an indented code block lost its
    indentation, and trailing newlines went, so the thread (and the history the agent got,
    and the chat export) held a message the user did not write."""
    dev = callers["developer"].client
    text = "    def f():\n        return 1\n\n"
    posted = dev.post("/api/v1/conversations/code/messages/", {"agent": "echo", "content": text}, format="json")
    assert posted.status_code == 202, posted.json()
    stored = AgentPlaygroundMessage.objects.get(pk=posted.json()["message_id"])
    assert stored.content == text
    listed = dev.get("/api/v1/conversations/code/messages/").json()["results"]
    assert listed[0]["content"] == text


def test_the_message_size_limit_is_the_configured_one(callers, settings):
    """The serializer capped a message at 100 000 characters whatever
    CONVERSATION_MAX_MESSAGE_CHARS (up to 1 000 000) allowed, with another message."""
    settings.CONVERSATION_MAX_MESSAGE_CHARS = 150_000
    dev = callers["developer"].client
    url = "/api/v1/conversations/big/messages/"
    posted = dev.post(url, {"agent": "echo", "content": "a" * 120_000}, format="json")
    assert posted.status_code == 202, posted.json()
    too_big = dev.post(
        "/api/v1/conversations/bigger/messages/", {"agent": "echo", "content": "a" * 150_001}, format="json"
    )
    assert too_big.status_code == 400
    assert too_big.json()["errors"][0]["field"] == "content"
    assert "the limit is 150000" in too_big.json()["errors"][0]["detail"]
    assert not AgentPlaygroundMessage.objects.filter(instance_id="bigger").exists()


def test_a_refused_message_names_its_field_once_as_the_other_validation_errors_do(callers):
    """The service's message begins with the field it names: the answer said it twice
    ("content: content: 40000 characters; …"), unlike every other validation error."""
    dev = callers["developer"].client
    refused = dev.post("/api/v1/conversations/c%20x/messages/", {"agent": "echo", "content": "hi"}, format="json")
    assert refused.status_code == 400
    (error,) = refused.json()["errors"]
    assert error["field"] == "instance_id"
    assert error["detail"].startswith("use 1-255 letters")
    assert refused.json()["detail"] == f"instance_id: {error['detail']}"
    assert not AgentPlaygroundMessage.objects.exists()
