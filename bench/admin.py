"""The operations console at scale: the changelists of the big tables on the data of
bench/api.py (1 M workflows, 5 M events in agentledger_bench_api; run bench.api once first).

Each page is requested through Django's test client as a logged-in superuser, twice (the
second time is reported: warm caches), with its statement count and its slowest statements.

    .venv/bin/python -m bench.admin
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ["DJANGO_SETTINGS_MODULE"] = "bench.api_settings"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import django

django.setup()

from django.contrib.auth import get_user_model  # noqa: E402
from django.db import connection  # noqa: E402
from django.test import Client  # noqa: E402
from django.test.utils import CaptureQueriesContext  # noqa: E402

from orchestration.models import Event  # noqa: E402

PAGES = [
    "/admin/orchestration/event/",
    "/admin/orchestration/event/?severity__exact=error",
    "/admin/orchestration/event/?p=50",
    "/admin/orchestration/workflow/",
    "/admin/orchestration/workflow/?status__exact=failed",
    "/admin/orchestration/taskexecution/",
]


def main() -> None:
    if not Event.objects.filter(sequence__gt=4_000_000).exists():
        raise SystemExit("no bench data: run `.venv/bin/python -m bench.api --rounds 1 --requests 20` first")
    user, _ = get_user_model().objects.get_or_create(username="bench-admin")
    user.is_staff = user.is_superuser = True
    user.save()
    client = Client()
    client.force_login(user)
    print("| page | ms | statements | slowest statements (ms) |\n|---|---:|---:|---|")
    for url in PAGES:
        for _ in range(2):
            with CaptureQueriesContext(connection) as queries:
                started = time.perf_counter()
                response = client.get(url)
                elapsed = (time.perf_counter() - started) * 1000
        assert response.status_code == 200, (url, response.status_code)
        slowest = sorted(queries.captured_queries, key=lambda query: -float(query["time"]))[:2]
        shown = "; ".join(f"{float(q['time']) * 1000:.0f}: `{q['sql'][:70]}…`" for q in slowest)
        print(f"| `{url}` | {elapsed:.0f} | {len(queries)} | {shown} |")


if __name__ == "__main__":
    main()
