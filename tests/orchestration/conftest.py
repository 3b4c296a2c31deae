from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from django.core.management import call_command

from tests.engine import Worker, flush_redis


@pytest.fixture
def builtin_agents(db: None) -> None:
    call_command("load_agents", stdout=io.StringIO())


@pytest.fixture
def committed(transactional_db: None) -> Iterator[None]:
    """Committed data, a clean broker and the built-in agents, for a task run in-process."""
    flush_redis()
    call_command("load_agents", stdout=io.StringIO())
    yield
    flush_redis()


@pytest.fixture
def engine(transactional_db: None, tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Committed data (the workers read it from other processes), a clean broker, the built-in
    agents, and a factory for real worker processes that are stopped after the test."""
    flush_redis()
    call_command("load_agents", stdout=io.StringIO())
    workers: list[Worker] = []

    def start(**kwargs: object) -> Worker:
        worker = Worker(log_dir=tmp_path, **kwargs)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()
    flush_redis()
