from django.core.management.base import BaseCommand

from orchestration.services.reaper import attempts_reap, queued_sweep


class Command(BaseCommand):
    help = (
        "Close abandoned attempts, fail workflows past their deadline, time out tasks no worker took "
        "from the queue and re-send lost task messages, once."
    )

    def handle(self, *args, **options):
        result = attempts_reap()
        resent = queued_sweep()
        self.stdout.write(
            f"timed out: {len(result.timed_out)}  lost: {len(result.lost)}  "
            f"workflows failed (deadline): {len(result.workflows_failed)}  "
            f"queue timeouts: {len(result.queue_timed_out)}  re-sent: {len(resent)}"
        )
