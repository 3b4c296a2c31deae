"""The training-data writers on a full disk: nothing half-written stays, nothing unwritten is
acknowledged or recorded as exported, and the error names the file and the cause."""

from __future__ import annotations

import csv
import datetime as dt
import errno
import io
import json
import os
import resource
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis
from django.core.management import CommandError, call_command

from orchestration.event_types import EventType
from tests.engine import ROOT
from tests.factories import EventFactory
from training_export.models import ExportRun
from training_export.services import files as files_module
from training_export.services import store as store_module
from training_export.services.store import TrainingDataStore

T0 = dt.datetime(2024, 3, 5, 10, 0, tzinfo=dt.UTC)
DAY = T0.date()
GROUP = "training"


def event_row(event_id: str) -> dict[str, object]:
    return {"event_id": event_id, "event_type": "agent_started", "created_at": T0, "payload": {"x": "y" * 100}}


def csv_event_ids(path: Path) -> list[str]:
    with path.open(newline="") as fh:
        records = list(csv.reader(fh))
    assert {len(record) for record in records} == {12}, records[-1]
    return [record[0] for record in records[1:]]


def test_a_row_write_the_disk_refuses_names_the_file_and_leaves_none_of_its_bytes(tmp_path, monkeypatch):
    store = TrainingDataStore(tmp_path)
    path = store.write_rows("events", DAY, [event_row("ev-0")]).path
    before = path.read_bytes()
    real_write = os.write

    def disk_full_after_100_bytes(fd: int, data: bytes) -> int:
        if fd > 2 and len(data) > 100:
            real_write(fd, bytes(data[:100]))  # a short write, then the disk is full
            return 100
        if fd > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(store_module.os, "write", disk_full_after_100_bytes)
    with pytest.raises(OSError) as failed:
        store.write_rows("events", DAY, [event_row("ev-1"), event_row("ev-2")])
    monkeypatch.undo()

    assert failed.value.errno == errno.ENOSPC
    assert failed.value.filename == str(path)
    assert path.read_bytes() == before  # no torn line for a reader, nor for the next append to glue onto
    assert store.write_rows("events", DAY, [event_row("ev-1"), event_row("ev-2")]).written == 2
    assert csv_event_ids(path) == ["ev-0", "ev-1", "ev-2"]


class DiskFullAfter(io.FileIO):
    """A file on a disk that has room for `room` bytes."""

    room = 0

    def write(self, data) -> int:
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def test_an_export_the_disk_refuses_is_recorded_failed_and_names_the_file(db, out, monkeypatch):
    for i in range(50):
        EventFactory(event_type=EventType.AGENT_STARTED, created_at=T0 + dt.timedelta(seconds=i), payload={"i": i})
    DiskFullAfter.room = 2000

    def open_on_a_small_disk(path, mode="r", buffering=-1):
        assert mode == "wb"
        return io.BufferedWriter(DiskFullAfter(path, "wb"), buffer_size=max(buffering, io.DEFAULT_BUFFER_SIZE))

    monkeypatch.setattr(files_module, "open", open_on_a_small_disk, raising=False)
    with pytest.raises(CommandError) as failed:
        call_command("export_training_data", "--type", "events", "--start", "2024-03-05", "--end", "2024-03-05")

    run = ExportRun.objects.get()
    data_file = out / "events" / "2024-03-05_2024-03-05" / "events-train.jsonl"
    assert "No space left on device" in str(failed.value)
    assert str(data_file) in str(failed.value)
    assert run.status == ExportRun.Status.FAILED and str(data_file) in run.error
    assert (run.checksum, run.path) == ("", "")
    assert [path for path in out.rglob("*") if path.is_file()] == []


def _file_size_limited(limit: int):
    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_file_size


@pytest.mark.subprocess
def test_the_consumer_stops_on_a_file_it_cannot_grow_acknowledging_only_what_it_wrote(settings, tmp_path):
    stream = f"synapse-test-{uuid.uuid4().hex[:8]}"
    data_dir = tmp_path / "training"
    day_file = data_dir / "events" / "events_2024-03-05.csv"
    client = redis.Redis.from_url(settings.REDIS_URL)
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.test", "REDIS_URL": settings.REDIS_URL}
    env.update(SYNAPSE_STREAM=stream, TRAINING_DATA_DIR=str(data_dir))
    command = [sys.executable, "manage.py", "consume_events", "--once", "--consumer", "c1", "--batch", "20"]
    try:
        for i in range(100):
            fields = {
                "event_id": f"ev-{i}",
                "event_type": "agent_started",
                "source": "platform",
                "severity": "info",
                "created_at": "2024-03-05T10:00:00+00:00",
                "payload": json.dumps({"x": "y" * 100}),
            }
            client.xadd(stream, fields, id=f"{i + 1}-1")
        # Room for the header and about 40 rows: the third batch of 20 fails part-way.
        full = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, preexec_fn=_file_size_limited(8000)
        )
        assert full.returncode == 1, full.stdout + full.stderr
        assert "Traceback" not in full.stderr, full.stderr
        assert f"CommandError: cannot write the training data: [Errno 27] File too large: '{day_file}'" in full.stderr
        written = csv_event_ids(day_file)  # every row whole: the failed batch left nothing
        assert written == [f"ev-{i}" for i in range(40)]
        # Only what reached the file was acknowledged: the rest is still pending or unread.
        pending = client.xpending(stream, GROUP)["pending"]
        assert pending == 20
        assert client.xinfo_groups(stream)[0]["last-delivered-id"] == b"60-1"

        again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again.stdout + again.stderr
        assert csv_event_ids(day_file) == [f"ev-{i}" for i in range(100)]
        assert client.xpending(stream, GROUP)["pending"] == 0
    finally:
        client.delete(stream, f"{stream}:dead")
        client.close()
