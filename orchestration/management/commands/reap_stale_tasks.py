import redis
from django.core.management.base import CommandError
from kombu.exceptions import OperationalError

from observability.logs import redact_public
from orchestration.management.arguments import DatabaseCommand
from orchestration.services.reaper import attempts_reap_reported, queued_sweep


class Command(DatabaseCommand):
    help = (
        "Close abandoned attempts, fail workflows past their deadline, time out tasks no worker took "
        "from the queue and re-send lost task messages, once."
    )

    def handle(self, *args, **options):
        result = attempts_reap_reported()
        summary = (
            f"timed out: {len(result.timed_out)}  lost: {len(result.lost)}  "
            f"workflows failed (deadline): {len(result.workflows_failed)}  "
            f"queue timeouts: {len(result.queue_timed_out)}"
        )
        try:
            resent = queued_sweep()
        except (redis.RedisError, OperationalError, OSError) as exc:
            # What the reap pass did is committed: say so before failing on the sweep.
            self.stdout.write(f"{summary}  re-sent: -")
            raise CommandError(
                redact_public(f"cannot reach the Celery broker to re-send lost messages: {type(exc).__name__}: {exc}")
            ) from None
        self.stdout.write(f"{summary}  re-sent: {len(resent)}")
