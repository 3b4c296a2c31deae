"""Crash-safe file writes: a file appears at its final path complete or not at all.

The content goes to a temporary name in the same directory, is fsynced, renamed over the final
path (atomic on POSIX filesystems) and the directory is fsynced so that the rename itself
survives a power loss. A process killed mid-write leaves at most a `.tmp-*` file behind, never
a partial file at the final path; `stale_temp_files_remove` clears such leftovers.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
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


def naming(exc: OSError, path: Path) -> OSError:
    """`exc` with the path it failed on, when it names none (os.write, a flush and fsync report
    only the cause: "[Errno 28] No space left on device"), so that the error says which file."""
    if exc.filename is not None or exc.errno is None:
        return exc
    return OSError(exc.errno, exc.strerror, str(path))


@dataclass
class HashingWriter:
    """Counts and hashes what is written through it; `path` is named in its errors."""

    fh: BinaryIO
    bytes: int = 0
    path: Path | None = None

    def __post_init__(self) -> None:
        self._sha256 = hashlib.sha256()

    def write(self, data: bytes) -> None:
        try:
            self.fh.write(data)
        except OSError as exc:
            raise naming(exc, self.path or Path(self.fh.name)) from exc
        self._sha256.update(data)
        self.bytes += len(data)

    @property
    def sha256(self) -> str:
        return self._sha256.hexdigest()


def _temp_path(path: Path) -> Path:
    """A temporary name beside `path`, unique to this writer: the pid alone is not (threads of
    one process, or worker containers sharing the export volume, each with its own pid 7)."""
    return path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}.{secrets.token_hex(6)}")


@dataclass
class Staged:
    """A complete, fsynced temporary file waiting to be renamed to `path` (see `commit`)."""

    temp: Path
    path: Path

    def discard(self) -> None:
        self.temp.unlink(missing_ok=True)


@contextmanager
def staged_writer(path: Path, *, buffering: int = 1024 * 1024) -> Iterator[tuple[HashingWriter, list[Staged]]]:
    """Write `path`'s content to a temporary file: yields (writer, out); on a clean exit the file
    is fsynced and closed and a `Staged` is appended to `out`, for `commit` to rename into place
    together with others; on an exception the temporary file is removed."""
    path = Path(path)
    makedirs_durable(path.parent)
    temp = _temp_path(path)
    fh = open(temp, "wb", buffering=buffering)  # noqa: SIM115 - closed below
    out: list[Staged] = []
    try:
        writer = HashingWriter(fh, path=path)
        yield writer, out
        try:
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
        except OSError as exc:
            raise naming(exc, path) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            fh.close()  # may fail again (the flush of a full disk): the file is removed anyway
        temp.unlink(missing_ok=True)
        raise
    out.append(Staged(temp=temp, path=path))


def commit(staged: list[Staged]) -> None:
    """Rename staged files into place, in order, then fsync their directories."""
    for item in staged:
        os.replace(item.temp, item.path)
    for directory in dict.fromkeys(item.path.parent for item in staged):
        fsync_dir(directory)


def stage_bytes(path: Path, data: bytes) -> Staged:
    """A small file staged for `commit`."""
    with staged_writer(path) as (writer, staged):
        writer.write(data)
    return staged[0]


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return sha256_stream(fh).hexdigest()


def sha256_stream(fh: BinaryIO) -> hashlib._Hash:
    """The sha256 of what is left to read in `fh`, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    for chunk in iter(lambda: fh.read(1024 * 1024), b""):
        digest.update(chunk)
    return digest


def stale_temp_files_remove(directory: Path, *, older_than_seconds: float) -> list[Path]:
    """Remove temporary files left by killed writers: those not modified for longer than any
    writer may hold one (written, or staged and waiting for `commit`), so a file of a writer
    still running in another process is never touched."""
    removed = []
    cutoff = time.time() - older_than_seconds
    if not Path(directory).exists():
        return removed
    for path in Path(directory).rglob(f"{TEMP_PREFIX}*"):
        if path.is_file() and path.stat().st_mtime < cutoff:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
