"""Leaving the group when the stream disappears under the consumer."""

from __future__ import annotations

import uuid
from pathlib import Path

import redis
from django.conf import settings

from training_export.services.store import TrainingDataStore
from training_export.services.synapse import SynapseConsumer


class NothingPending(redis.Redis):
    """The stream is deleted right after the consumer saw that it holds nothing pending."""

    def xpending_range(self, *args, **kwargs):
        return []


def test_leaving_a_stream_deleted_meanwhile_is_not_an_error(tmp_path: Path):
    client = NothingPending.from_url(settings.REDIS_URL)
    consumer = SynapseConsumer(
        client=client,
        store=TrainingDataStore(tmp_path),
        stream=f"gone-{uuid.uuid4().hex}",
        group="g",
        consumer="c",
    )
    assert consumer.leave() is False
