"""Leaving the group: when the stream disappeared under the consumer, and when another process
of the same name reads meanwhile."""

from __future__ import annotations

import uuid
from pathlib import Path

import redis
from django.conf import settings

from training_export.services.store import TrainingDataStore
from training_export.services.synapse import SynapseConsumer


def test_leaving_a_stream_deleted_meanwhile_is_not_an_error(tmp_path: Path):
    """Its stream (and group) gone when the consumer leaves: the check and the removal run as
    one script, which finds no group."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    consumer = SynapseConsumer(
        client=client,
        store=TrainingDataStore(tmp_path),
        stream=f"gone-{uuid.uuid4().hex}",
        group="g",
        consumer="c",
    )
    assert consumer.leave() is False


class SameNameReadsAfterFirstCommand(redis.Redis):
    """Another process under the same consumer name (a restarted `consume_events --processes N
    --consumer NAME` beside the children its killed predecessor left finishing their batch)
    reads an entry right after the leaving consumer's first command."""

    other: redis.Redis
    stream: str

    def execute_command(self, *args, **options):
        reply = super().execute_command(*args, **options)
        other, self.other = getattr(self, "other", None), None
        if other is not None:
            other.xreadgroup("g", "c", {self.stream: ">"}, count=1)
        return reply


def test_leaving_keeps_the_name_when_another_process_of_that_name_reads_meanwhile(tmp_path: Path):
    stream = f"leave-{uuid.uuid4().hex}"
    plain = redis.Redis.from_url(settings.REDIS_URL)
    client = SameNameReadsAfterFirstCommand.from_url(settings.REDIS_URL)
    consumer = SynapseConsumer(client=client, store=TrainingDataStore(tmp_path), stream=stream, group="g", consumer="c")
    try:
        consumer.ensure_group()
        entry_id = plain.xadd(stream, {"event_id": "e1"}).decode()
        client.stream, client.other = stream, plain

        consumer.leave()

        # The entry the other process holds stays pending, under its name, to be acknowledged
        # or claimed: a name removed with it would drop it from the group for good.
        assert [p["message_id"].decode() for p in plain.xpending_range(stream, "g", "-", "+", 10)] == [entry_id]
    finally:
        plain.delete(stream)
