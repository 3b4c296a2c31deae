"""Fixtures shared by the training-export tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engine import Worker, flush_redis


@pytest.fixture
def worker(transactional_db, tmp_path: Path) -> Iterator[Worker]:
    """A real Celery worker (one process, every queue) exporting into the test's directory,
    with no safety lag so that a window closes as soon as its end has passed."""
    flush_redis()
    started = Worker(
        log_dir=tmp_path,
        concurrency=1,
        env={"TRAINING_EXPORT_DIR": str(tmp_path / "exports"), "TRAINING_EXPORT_SAFETY_LAG_SECONDS": "0"},
    )
    yield started
    started.stop()
    flush_redis()


@pytest.fixture
def out(settings, tmp_path: Path) -> Path:
    """Exports (and the CSV store) into the test's directory; the export directory."""
    settings.TRAINING_EXPORT_DIR = tmp_path / "exports"
    settings.TRAINING_DATA_DIR = tmp_path / "training"
    return settings.TRAINING_EXPORT_DIR
