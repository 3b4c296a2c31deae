"""Ping the Celery workers through the broker and list the queues each one consumes."""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from kombu.exceptions import OperationalError

from config.celery import app
from observability.logs import redact_public
from orchestration.management.arguments import seconds


def workers_report(*, timeout: float) -> list[dict[str, Any]]:
    """One row per worker that answered a ping or the active_queues inspection, sorted by name.

    The broker connection is established first with a bounded timeout so that an unreachable
    broker fails in about `timeout` seconds instead of being retried indefinitely."""
    with app.connection_for_write(url=settings.CELERY_BROKER_URL, connect_timeout=timeout) as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)
        pongs = app.control.ping(timeout=timeout, connection=conn)
        queues = app.control.inspect(timeout=timeout, connection=conn).active_queues() or {}
    responded = {name for reply in pongs for name in reply}
    return [
        {
            "worker": name,
            "responded": name in responded,
            "queues": sorted(queue["name"] for queue in queues.get(name, [])),
        }
        for name in sorted(responded | set(queues))
    ]


class Command(BaseCommand):
    help = "Ping the Celery workers and list the queues each consumes; exit 1 when none answers."
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--timeout", type=seconds(maximum=60), default=2.0, help="seconds to wait for replies (default 2)"
        )
        parser.add_argument("--json", action="store_true", help="print the report as JSON")

    def handle(self, *args: Any, **options: Any) -> None:
        timeout: float = options["timeout"]
        try:
            rows = workers_report(timeout=timeout)
        except (OperationalError, OSError) as exc:
            raise CommandError(redact_public(f"cannot reach the Celery broker: {type(exc).__name__}: {exc}")) from None
        answered = [row for row in rows if row["responded"]]
        if options["json"]:
            self.stdout.write(json.dumps({"ok": bool(answered), "workers": rows}, indent=2))
        else:
            self._table(rows)
        if not answered:
            raise CommandError(f"no Celery worker answered a ping within {timeout:g} s")

    def _table(self, rows: list[dict[str, Any]]) -> None:
        width = max([len("worker"), *(len(row["worker"]) for row in rows)])
        header = f"{'worker':<{width}}  {'responded':<9}  queues"
        self.stdout.write(header)
        self.stdout.write("-" * len(header))
        for row in rows:
            self.stdout.write(
                f"{row['worker']:<{width}}  {'yes' if row['responded'] else 'no':<9}  {','.join(row['queues']) or '-'}"
            )
