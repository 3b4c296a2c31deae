"""Cost per task of the observability hooks, side by side.

Runs, per mode, the hooks one task goes through, in the order a worker runs them: the
publish stamp (before_task_publish), task_prerun (log context, submit-to-start histogram),
attempt_started (retry counter, log context), attempt_finished on a success (attempt
counter, duration histogram, tokens, cost, final status, InfluxDB point), task_postrun.
Modes (each in its own process, since prometheus_client picks its mode at import), in
interleaved rounds:

- hooks off:       the same loop calling nothing (the loop's own cost);
- metrics:         prometheus_client in single-process mode (the web, a solo worker);
- multiprocess:    PROMETHEUS_MULTIPROC_DIR set (a prefork worker serving WORKER_METRICS_PORT);
- multiprocess + InfluxDB: the same, plus a point per attempt to a local /api/v2/write sink.

    .venv/bin/python -m bench.observability --tasks 20000 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("off", "metrics", "multiprocess", "multiprocess+influx")


def _child(mode: str, tasks: int) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.test")
    import django

    django.setup()
    from decimal import Decimal

    from django.utils import timezone

    from observability import attempts, influx, worker
    from orchestration.runtime.context import Usage

    class Request(dict):
        delivery_info = {"routing_key": "normal"}

        def get(self, key, default=None):
            return dict.get(self, key, default)

    class Task:
        name = worker.RUN_TASK
        request = Request()

    class Attempt:
        execution_id = "01a2018a-c6ad-7d58-b9f8-2ab13fef7b2a"
        attempt_number = 1

    usage = Usage(input_tokens=1200, output_tokens=350, cost_usd=Decimal("0.00039"))
    task, attempt = Task(), Attempt()
    finished_at = timezone.now()

    def run(count: int) -> None:
        for _ in range(count):
            if mode == "off":
                continue
            headers = {"argsrepr": "('01a2018a-c6ad-7d58-b9f8-2ab13fef7b2a',)", "kwargsrepr": "{}"}
            worker.before_publish(headers)
            task.request[worker.PUBLISHED_AT_HEADER] = headers[worker.PUBLISHED_AT_HEADER]
            worker.task_started(task, [attempt.execution_id], {})
            attempts.attempt_started(
                execution_id=attempt.execution_id, workflow_id="wf", agent_id="echo", attempt_number=1
            )
            attempts.attempt_finished(
                attempt=attempt,
                agent_id="echo",
                workflow_id="wf",
                duration_ms=3.2,
                finished_at=finished_at,
                usage=usage,
            )
            worker.task_ended()

    run(200)  # warm-up: imports, the secret list, first label children
    started = time.perf_counter()
    run(tasks)
    elapsed = time.perf_counter() - started
    influx.writer_close()
    print(json.dumps({"us_per_task": elapsed / tasks * 1e6}))


class _Sink(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _run(mode: str, tasks: int, sink_url: str) -> float:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.test"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    for key in ("INFLUXDB_URL", "INFLUXDB_TOKEN", "INFLUXDB_ORG", "INFLUXDB_BUCKET"):
        env.pop(key, None)
    with tempfile.TemporaryDirectory() as directory:
        if mode.startswith("multiprocess"):
            env["PROMETHEUS_MULTIPROC_DIR"] = directory
        if mode.endswith("influx"):
            env.update(INFLUXDB_URL=sink_url, INFLUXDB_TOKEN="bench", INFLUXDB_ORG="bench", INFLUXDB_BUCKET="bench")  # noqa: S106 - a local sink
        out = subprocess.run(
            [sys.executable, "-m", "bench.observability", "--child", mode, "--tasks", str(tasks)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    return json.loads(out.strip().splitlines()[-1])["us_per_task"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--child", choices=MODES)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.child:
        _child(args.child, args.tasks)
        return
    sink = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    sink_url = f"http://127.0.0.1:{sink.server_address[1]}"
    results: dict[str, list[float]] = {mode: [] for mode in MODES}
    for round_number in range(1, args.repeat + 1):
        for mode in MODES:
            results[mode].append(_run(mode, args.tasks, sink_url))
        print(f"round {round_number}: " + ", ".join(f"{m} {results[m][-1]:.1f} µs" for m in MODES), flush=True)
    sink.shutdown()
    print(f"\n{args.tasks} tasks per run, {args.repeat} rounds; median µs per task (hooks only, loop cost subtracted):")
    base = statistics.median(results["off"])
    for mode in MODES[1:]:
        print(f"  {mode:22s} {statistics.median(results[mode]) - base:8.1f}")


if __name__ == "__main__":
    main()
