"""`make demo` on a machine with nothing configured: SQLite and a filesystem broker under a
fresh VAR_DIR, a real worker, a real workflow."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL", "DJANGO_SETTINGS_MODULE"}


@pytest.mark.subprocess
def test_demo_runs_a_workflow_on_the_embedded_defaults(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in CONFIG}
    env.update(VAR_DIR=str(tmp_path), PY=sys.executable, TRAINING_DATA_DIR=str(tmp_path / "training"))
    returncode, out, err = _run_on_a_terminal(["bash", "scripts/demo.sh"], env=env, errors=tmp_path / "stderr.txt")
    assert returncode == 0, out[-3000:] + err[-3000:]
    assert "demo pipeline [completed] 7/7" in out
    # Live progress: a user at a terminal sees the workflow running, redrawn in place (through a
    # pipe, submit_workflow prints only the final state).
    assert "demo pipeline [running]" in out and "\x1b[" in out, out[:3000]
    assert re.search(r"\n    #1 failed \(error\)  [\d.]+ ms .*\n    #2 succeeded  [\d.]+ ms", out), (
        "the flaky step was retried and both tries recorded, each with its duration"
    )
    assert "tool calls: 10  interactions: 2 (feedback 1, handoff 1)" in out, "tools and the review hand-off ran"
    assert '"summary_approved": true' in out and '"summary_revisions": 1' in out
    assert '"name": "classify"' in out, "the code analyst found the complexity hotspot"
    assert "user: admin   password: " in out
    assert (tmp_path / "db.sqlite3").exists()


def _run_on_a_terminal(command: list[str], *, env: dict[str, str], errors: Path) -> tuple[int, str, str]:
    """Run `command` with its standard output on a pseudo-terminal, as `make demo` runs for a
    user; returns its exit code, its output (line ends as written) and its standard error."""
    primary, secondary = pty.openpty()
    with errors.open("wb") as stderr:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=secondary, stderr=stderr
        )
    os.close(secondary)
    chunks = []
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            if select.select([primary], [], [], 1)[0]:
                try:
                    data = os.read(primary, 65536)
                except OSError:  # EIO: every process holding the terminal has ended
                    break
                if not data:
                    break
                chunks.append(data)
        returncode = process.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(primary)
    out = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")
    return returncode, out, errors.read_text(errors="replace")
