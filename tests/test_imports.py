"""What a Django process of this project loads before it does anything: the exporter's peak
resident set is held under 100 MB (bench/pipeline.py) and most of it is this baseline."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Loaded only where they are used: httpx (with rich, pygments and click for its command line,
# about 15 MB) for an http or llm agent's request, jsonschema (about 10 MB) when tools register.
ON_DEMAND = ("httpx", "rich", "pygments", "jsonschema")


def run(script: str) -> str:
    """Run `script` in a fresh interpreter with the test settings; its stdout (it must succeed)."""
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.test"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_a_process_that_runs_no_agent_does_not_load_the_agent_clients():
    script = (
        "import json, sys, django; django.setup()\n"
        "import training_export.services.export, training_export.services.synapse\n"
        "import orchestration.services.agent_registry, orchestration.runtime.llm\n"
        f"print(json.dumps(sorted(m for m in {ON_DEMAND!r} if m in sys.modules)))\n"
    )
    assert json.loads(run(script).splitlines()[-1]) == []


def test_the_agent_clients_load_when_an_agent_url_is_checked():
    script = (
        "import sys, django; django.setup()\n"
        "from orchestration.runtime.urlpolicy import url_check\n"
        "url_check('https://api.example.com/v1', resolve=False)\n"
        "from orchestration.runtime import toolkit\n"
        "assert 'httpx' in sys.modules and 'jsonschema' in sys.modules, sorted(sys.modules)\n"
    )
    run(script)


def test_a_worker_loads_them_before_its_pool_forks():
    """A worker runs agents: its main process loads them at worker_init, so no pool child pays
    the imports (httpx about 0.1 s) inside its first attempt's time limit."""
    script = (
        "import sys, django; django.setup()\n"
        "from config.celery import app\n"
        "from celery.signals import worker_init\n"
        "assert 'httpx' not in sys.modules\n"
        "worker_init.send(sender=None)\n"
        "from orchestration.runtime.tools import _REGISTRY\n"
        "assert 'httpx' in sys.modules and 'jsonschema' in sys.modules, sorted(sys.modules)\n"
        "assert 'calculator' in _REGISTRY, sorted(_REGISTRY)\n"
    )
    run(script)
