"""`make demo` on a machine with nothing configured: SQLite and a filesystem broker under a
fresh VAR_DIR, a real worker, a real workflow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL", "DJANGO_SETTINGS_MODULE"}


@pytest.mark.subprocess
def test_demo_runs_a_workflow_on_the_embedded_defaults(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in CONFIG}
    env.update(VAR_DIR=str(tmp_path), PY=sys.executable, TRAINING_DATA_DIR=str(tmp_path / "training"))
    result = subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "demo pipeline [completed] 7/7" in out
    assert "#1 failed (error), #2 succeeded" in out, "the flaky step was retried and both tries recorded"
    assert "tool calls: 10  interactions: 2 (feedback 1, handoff 1)" in out, "tools and the review hand-off ran"
    assert '"summary_approved": true' in out and '"summary_revisions": 1' in out
    assert '"name": "classify"' in out, "the code analyst found the complexity hotspot"
    assert "user: admin   password: " in out
    assert (tmp_path / "db.sqlite3").exists()
