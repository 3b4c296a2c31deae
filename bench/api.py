"""REST API latency at scale: 1 M workflows and 5 M events in PostgreSQL.

Measured in one run, interleaved round by round, each endpoint beside the raw keyset SQL of
the same page (the statement the endpoint sends, replayed on a bare cursor):

- GET /api/v1/workflows/?status=failed           first page, and a page 100 000 rows deep
- GET /api/v1/events/?entity_id=<agent entity>   first page, and a page 50 000 events deep
- GET /api/v1/events/?entity_id=<workflow id>    one workflow's events
- GET /bench/events-bare/?entity_id=<workflow>   the same page without API-key authentication,
                                                 rate limit, filter set or ownership rule
                                                 (bench/api_urls.py): the rest of the request
- POST /api/v1/workflows/                        a one-task workflow (validation, 3 inserts)
- GET /bench/floor/                              the floor: the deep events page's body from
                                                 memory through Django and DRF alone (no
                                                 authentication, rate limit, database or
                                                 serialization; bench/api_urls.py), against
                                                 each page statement: what 6x leaves

Requests go through the whole Django stack in-process (middleware, API-key authentication,
the Redis rate-limit counter, permissions, filters, pagination, serialization), without a
network hop. By default (`--driver wsgi`) each request is a WSGI environ handed to Django's
WSGIHandler, which is exactly what gunicorn or uWSGI call once they have parsed the HTTP
request: request_started/request_finished run as in production (so does the connection
health check of CONN_HEALTH_CHECKS, which the API-key lookup itself serves as), and nothing of the test
client's own machinery (template-capture signals, cookie jar, response patching) is timed.
`--driver client` sends the same requests through DRF's APIClient (the earlier figures).
Besides wall-clock latency, each endpoint's CPU time per request in this process
(time.process_time: the Python work of client and server, not PostgreSQL's or Redis's) is
reported, which a busy machine disturbs far less than latency. The data is generated once
with INSERT ... SELECT generate_series into its own database (BENCH_API_DATABASE_URL,
default agentledger_bench_api) and reused afterwards.

    .venv/bin/python -m bench.api --rounds 5 --requests 200
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ["DJANGO_SETTINGS_MODULE"] = "bench.api_settings"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import django  # noqa: E402

django.setup()


import redis  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.auth import get_user_model  # noqa: E402
from django.contrib.auth.models import Group  # noqa: E402
from django.core.handlers.wsgi import WSGIHandler  # noqa: E402
from django.db import connection  # noqa: E402
from django.test.utils import CaptureQueriesContext  # noqa: E402
from rest_framework.test import APIClient  # noqa: E402

from bench import api_urls  # noqa: E402
from bench.database import database_ensure  # noqa: E402
from orchestration.models import ApiKey  # noqa: E402
from orchestration.services.access import api_key_create  # noqa: E402

# The four-event page without the platform's authentication, filters and rate limit
# (bench/api_urls.py): what the rest of the request costs beside the same statement.
BARE = "same, bare: no API key, filter set or rate limit"
WORKFLOWS = 1_000_000
EVENTS_PER_WORKFLOW = 4
AGENT_ENTITIES = 10  # entities with a long history: the fifth million events, 100 000 each
STATUSES = "ARRAY['completed','completed','completed','failed','failed','running','cancelled','pending']"


def generate(owner_id: int) -> None:
    """1 M workflows (a year of them, 2 in 8 failed) and 5 M events: 4 per workflow plus
    100 000 for each of 10 agent entities, interleaved in time. Skipped when the data is
    already there."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT EXISTS (SELECT 1 FROM workflows WHERE name = 'bench-last')")
        if cursor.fetchone()[0]:
            return
        started = time.perf_counter()
        print("generating 1 M workflows and 5 M events (once) ...", flush=True)
        for first in range(1, WORKFLOWS + 1, 250_000):
            last = min(first + 249_999, WORKFLOWS)
            cursor.execute(
                f"""
                INSERT INTO workflows (workflow_id, created_at, updated_at, name, description, workflow_type, status,
                    priority, current_step, total_steps, completed_steps, failed_steps, cancelled_steps, state_data,
                    step_results, assigned_agents, checkpoints, error_count, metadata, tags, spec,
                    continue_on_failure, owner_id, initiator, total_tokens_used, total_cost_usd)
                SELECT md5('wf' || i)::uuid::text,
                       now() - interval '365 days' + i * interval '31 seconds',
                       now() - interval '365 days' + i * interval '31 seconds',
                       CASE WHEN i = {WORKFLOWS} THEN 'bench-last' ELSE 'bench ' || i END,
                       '', 'bench', ({STATUSES})[1 + mod(i, 8)], 'normal', '', 1, 0, 0, 0,
                       '{{}}', '{{}}', '["echo"]', '[]', 0, '{{}}', '[]', '{{}}', false, %s, 'bench', 0, 0
                FROM generate_series({first}, {last}) AS i
                """,  # noqa: S608 - constants only
                [owner_id],
            )
            # Per workflow: its 4 events, then one event of agent entity i mod 10, so each agent's
            # history (100 000 events) is spread over the whole year, as activity would be.
            cursor.execute(
                f"""
                INSERT INTO events (event_id, created_at, event_type, entity_type, entity_id, workflow_id, agent_id,
                    source, payload, severity)
                SELECT md5('ev' || i || '-' || k)::uuid::text,
                       now() - interval '365 days' + i * interval '31 seconds' + k * interval '1 second',
                       (ARRAY['workflow_created','workflow_started','task_queued','workflow_completed',
                              'tool_executed'])[k],
                       CASE WHEN k = 5 THEN 'agent' ELSE 'workflow' END,
                       CASE WHEN k = 5 THEN 'agent-' || mod(i, {AGENT_ENTITIES}) ELSE md5('wf' || i)::uuid::text END,
                       CASE WHEN k = 5 THEN NULL ELSE md5('wf' || i)::uuid::text END,
                       CASE WHEN k = 5 THEN 'echo' END,
                       'platform', '{{}}', 'info'
                FROM generate_series({first}, {last}) AS i, generate_series(1, {EVENTS_PER_WORKFLOW + 1}) AS k
                ORDER BY i, k
                """  # noqa: S608
            )
            print(f"  workflows and their events up to {last}", flush=True)
        cursor.execute("ANALYZE workflows")
        cursor.execute("ANALYZE events")
        print(f"  done in {time.perf_counter() - started:.0f} s", flush=True)


class WsgiResponse:
    def __init__(self, status: str, content: bytes) -> None:
        self.status_code = int(status.split(" ", 1)[0])
        self.content = content


class WsgiClient:
    """Requests as a WSGI server hands them to Django: an environ with the parsed request
    line, headers and body, passed to WSGIHandler; the body iterated and closed as a server
    does (closing sends request_finished)."""

    def __init__(self, key: str) -> None:
        self.handler = WSGIHandler()
        self.authorization = f"Bearer {key}"

    def _call(self, method: str, path: str, body: bytes = b"", content_type: str = "") -> WsgiResponse:
        path_info, _, query = path.partition("?")
        environ = {
            "REQUEST_METHOD": method,
            "SCRIPT_NAME": "",
            "PATH_INFO": path_info,
            "QUERY_STRING": query,
            "SERVER_NAME": "testserver",
            "SERVER_PORT": "80",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "127.0.0.1",
            "HTTP_HOST": "testserver",
            "HTTP_AUTHORIZATION": self.authorization,
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(body),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": False,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
        }
        if body:
            environ["CONTENT_TYPE"] = content_type
            environ["CONTENT_LENGTH"] = str(len(body))
        started: list[str] = []
        result = self.handler(environ, lambda status, headers, exc_info=None: started.append(status))
        try:
            content = b"".join(result)
        finally:
            result.close()
        return WsgiResponse(started[0], content)

    def get(self, path: str) -> WsgiResponse:
        return self._call("GET", path)

    def post(self, path: str, data: dict, format: str = "json") -> WsgiResponse:
        return self._call("POST", path, json.dumps(data).encode(), "application/json")


def cursor_token(values: list) -> str:
    return base64.urlsafe_b64encode(json.dumps({"v": values}, separators=(",", ":")).encode()).decode().rstrip("=")


def deep_cursors() -> dict[str, str]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT created_at, workflow_id FROM workflows WHERE status = 'failed' "
            "ORDER BY created_at DESC, workflow_id DESC OFFSET 100000 LIMIT 1"
        )
        created_at, workflow_id = cursor.fetchone()
        cursor.execute("SELECT sequence FROM events WHERE entity_id = 'agent-3' ORDER BY sequence OFFSET 50000 LIMIT 1")
        (sequence,) = cursor.fetchone()
        cursor.execute("SELECT workflow_id FROM workflows WHERE name = 'bench 500000'")
        (middle_workflow,) = cursor.fetchone()
    return {
        "workflows": cursor_token([created_at.isoformat(), workflow_id]),
        "events": cursor_token(["agent-3", sequence]),  # filtered on entity_id: ordered by (entity_id, sequence)
        "workflow": middle_workflow,
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def page_sql(client: APIClient | WsgiClient, path: str) -> str:
    """The statement that selects the page (the one with LIMIT), as the endpoint sends it."""
    with CaptureQueriesContext(connection) as queries:
        response = client.get(path)
    assert response.status_code == 200, response.content
    return next(q["sql"] for q in queries.captured_queries if "LIMIT" in q["sql"] and "api_keys" not in q["sql"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=200, help="requests per endpoint per round")
    parser.add_argument(
        "--driver", choices=["wsgi", "client"], default="wsgi", help="WSGIHandler (as a server calls it) or APIClient"
    )
    args = parser.parse_args()

    database_ensure()
    user, _ = get_user_model().objects.get_or_create(username="bench")
    user.groups.add(Group.objects.get(name="admin"))
    generate(user.pk)
    ApiKey.objects.filter(owner=user).delete()
    key = api_key_create(owner=user, name="bench").key
    if args.driver == "wsgi":
        client: APIClient | WsgiClient = WsgiClient(key)
    else:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    redis.Redis.from_url(settings.REDIS_URL).flushdb()
    cursors = deep_cursors()

    gets = {
        "workflows?status=failed, first page": "/api/v1/workflows/?status=failed",
        "workflows?status=failed, 100 000 deep": f"/api/v1/workflows/?status=failed&cursor={cursors['workflows']}",
        "events?entity_id=agent-3, first page": "/api/v1/events/?entity_id=agent-3",
        "events?entity_id=agent-3, 50 000 deep": f"/api/v1/events/?entity_id=agent-3&cursor={cursors['events']}",
        "events?entity_id=<workflow>": f"/api/v1/events/?entity_id={cursors['workflow']}",
        BARE: f"{api_urls.BARE_EVENTS_PATH}?entity_id={cursors['workflow']}",
    }
    raw = {name: page_sql(client, path) for name, path in gets.items()}
    workflow_page = "events?entity_id=<workflow>"
    assert raw[BARE] == raw[workflow_page]  # the same statement, and the same answer
    assert json.loads(client.get(gets[BARE]).content) == json.loads(client.get(gets[workflow_page]).content)
    FLOOR = "floor: Django + DRF alone, no auth, DB or serialization"
    api_urls.FLOOR_BODY.update(json.loads(client.get(gets["events?entity_id=agent-3, 50 000 deep"]).content))
    assert json.loads(client.get(api_urls.FLOOR_PATH).content) == api_urls.FLOOR_BODY
    spec = {"name": "bench post", "tasks": [{"name": "a", "agent": "echo", "input": {"n": 1}}]}

    samples: dict[str, list[float]] = defaultdict(list)
    round_p50: dict[str, list[float]] = defaultdict(list)
    round_cpu: dict[str, list[float]] = defaultdict(list)
    load_before = os.getloadavg()[0]
    for round_number in range(args.rounds):
        for name, path in gets.items():
            times = []
            cpu_started = time.process_time()
            for _ in range(args.requests):
                started = time.perf_counter()
                response = client.get(path)
                times.append((time.perf_counter() - started) * 1000)
                assert response.status_code == 200
            round_cpu[name].append((time.process_time() - cpu_started) / args.requests * 1000)
            raw_times = []
            with connection.cursor() as cursor:
                for _ in range(args.requests):
                    started = time.perf_counter()
                    cursor.execute(raw[name])
                    cursor.fetchall()
                    raw_times.append((time.perf_counter() - started) * 1000)
            samples[name].extend(times)
            samples[f"{name} (raw SQL)"].extend(raw_times)
            round_p50[name].append(statistics.median(times))
            round_p50[f"{name} (raw SQL)"].append(statistics.median(raw_times))
        times = []
        cpu_started = time.process_time()
        for _ in range(args.requests):
            started = time.perf_counter()
            response = client.get(api_urls.FLOOR_PATH)
            times.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200
        round_cpu[FLOOR].append((time.process_time() - cpu_started) / args.requests * 1000)
        samples[FLOOR].extend(times)
        round_p50[FLOOR].append(statistics.median(times))
        times = []
        cpu_started = time.process_time()
        for _ in range(args.requests // 4):
            started = time.perf_counter()
            response = client.post("/api/v1/workflows/", spec, format="json")
            times.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 201, response.content
        round_cpu["POST workflows"].append((time.process_time() - cpu_started) / (args.requests // 4) * 1000)
        samples["POST workflows"].extend(times)
        print(f"round {round_number + 1}/{args.rounds} done", flush=True)

    print(f"\ndriver: {args.driver}; load average (1 min): {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print("| request | p50 ms | p99 ms | CPU ms/request | raw SQL p50 ms | raw SQL p99 ms | endpoint/raw (p50) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in [*gets, "POST workflows", FLOOR]:
        endpoint = samples[name]
        line = (
            f"| {name} | {percentile(endpoint, 0.5):.2f} | {percentile(endpoint, 0.99):.2f} |"
            f" {statistics.median(round_cpu[name]):.2f} |"
        )
        if name in raw:
            raw_samples = samples[f"{name} (raw SQL)"]
            ratios = [e / r for e, r in zip(round_p50[name], round_p50[f"{name} (raw SQL)"], strict=True)]
            line += (
                f" {percentile(raw_samples, 0.5):.2f} | {percentile(raw_samples, 0.99):.2f} |"
                f" {statistics.median(ratios):.1f}x |"
            )
        else:
            line += " | | |"
        print(line)
    for kind, first, deep in [
        ("workflows", "workflows?status=failed, first page", "workflows?status=failed, 100 000 deep"),
        ("events", "events?entity_id=agent-3, first page", "events?entity_id=agent-3, 50 000 deep"),
    ]:
        ratio = statistics.median(d / f for d, f in zip(round_p50[deep], round_p50[first], strict=True))
        print(f"{kind}: deep/first p50 = {ratio:.2f}")
    # The floor against each statement: over 6x, no endpoint in this stack can meet 6x on it.
    for name in gets:
        ratios = [f / r for f, r in zip(round_p50[FLOOR], round_p50[f"{name} (raw SQL)"], strict=True)]
        print(f"floor / raw SQL of {name}: {statistics.median(ratios):.1f}x")
    print("\nplans of the page statements:")
    with connection.cursor() as cursor:
        for name, sql in raw.items():
            cursor.execute("EXPLAIN " + sql)
            print(f"-- {name}\n" + "\n".join(row[0] for row in cursor.fetchall()))


if __name__ == "__main__":
    main()
