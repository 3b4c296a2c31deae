"""Crash-safe file writes: a file appears at its final path complete or not at all.

The content goes to a temporary name in the same directory, is fsynced, renamed over the final
path (atomic on POSIX filesystems) and the directory is fsynced so that the rename itself
survives a power loss. A process killed mid-write leaves at most a `.tmp-*` file behind, never
a partial file at the final path; `stale_temp_files_remove` clears such leftovers.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

TEMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs_durable(directory: Path) -> None:
    """Create missing directories, fsyncing each parent so that the new entries survive a crash."""
    missing = []
    current = Path(directory)
    while not current.exists():
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
        fsync_dir(path.parent)


@dataclass
class HashingWriter:
    """Counts and hashes what is written through it."""

    fh: BinaryIO
    bytes: int = 0

    def __post_init__(self) -> None:
        self._sha256 = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.fh.write(data)
        self._sha256.update(data)
        self.bytes += len(data)

    @property
    def sha256(self) -> str:
        return self._sha256.hexdigest()


@contextmanager
def atomic_writer(path: Path, *, buffering: int = 1024 * 1024) -> Iterator[HashingWriter]:
    """Write `path` atomically: yields a writer; on a clean exit the file is fsynced and renamed
    into place and the directory fsynced; on an exception the temporary file is removed."""
    path = Path(path)
    makedirs_durable(path.parent)
    temp = path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}")
    fh = open(temp, "wb", buffering=buffering)  # noqa: SIM115 - closed below, before the rename
    try:
        writer = HashingWriter(fh)
        yield writer
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        os.replace(temp, path)
        fsync_dir(path.parent)
    except BaseException:
        fh.close()
        temp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes) -> str:
    """Write a small file atomically; returns its sha256."""
    with atomic_writer(path) as writer:
        writer.write(data)
    return writer.sha256


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return sha256_stream(fh).hexdigest()


def sha256_stream(fh: BinaryIO) -> hashlib._Hash:
    """The sha256 of what is left to read in `fh`, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    for chunk in iter(lambda: fh.read(1024 * 1024), b""):
        digest.update(chunk)
    return digest


def stale_temp_files_remove(directory: Path, *, older_than_seconds: float = 3600) -> list[Path]:
    """Remove temporary files left by killed writers (older than the threshold, so a write in
    progress in another process is never touched)."""
    removed = []
    cutoff = time.time() - older_than_seconds
    if not Path(directory).exists():
        return removed
    for path in Path(directory).rglob(f"{TEMP_PREFIX}*"):
        if path.is_file() and path.stat().st_mtime < cutoff:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
