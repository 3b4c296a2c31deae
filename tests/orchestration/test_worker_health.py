"""`manage.py worker_health` pings real Celery workers through the broker."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.subprocess


def worker_health(*args: str, broker_url: str | None = None) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "REDIS_URL": settings.REDIS_URL,
        "CELERY_BROKER_URL": broker_url or settings.CELERY_BROKER_URL,
    }
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "manage.py", "worker_health", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result, time.monotonic() - started


def test_no_worker_answering_exits_1_with_a_message():
    result, _ = worker_health("--timeout", "0.5")
    assert result.returncode == 1, result.stdout
    assert "no Celery worker answered a ping within 0.5 s" in result.stderr


def test_unreachable_broker_exits_1_quickly_without_credentials():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result, elapsed = worker_health("--timeout", "1", broker_url=f"redis://:s3cret-pw@127.0.0.1:{port}/0")
    assert result.returncode == 1
    assert "cannot reach the Celery broker" in result.stderr
    assert "s3cret-pw" not in result.stderr
    assert elapsed < 15  # interpreter start-up plus at most about one timeout


def test_lists_a_running_worker_and_its_queues(engine):
    worker = engine(concurrency=1, queues="critical,low")

    result, _ = worker_health("--timeout", "2", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert {"worker": worker.name, "responded": True, "queues": ["critical", "low"]} in report["workers"]

    result, _ = worker_health("--timeout", "2")
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith(worker.name))
    assert row.split() == [worker.name, "yes", "critical,low"]
