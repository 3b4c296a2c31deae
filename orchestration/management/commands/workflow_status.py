from django.core.management.base import BaseCommand, CommandError

from orchestration.models import Workflow
from orchestration.selectors import workflow_tasks_with_attempts


def _ms(value):
    return "" if value is None else f"{value:.0f}"


class Command(BaseCommand):
    help = "Show a workflow's tasks and every attempt at them."

    def add_arguments(self, parser):
        parser.add_argument("workflow_id")

    def handle(self, *args, **options):
        workflow = Workflow.objects.filter(pk=options["workflow_id"]).first()
        if workflow is None:
            raise CommandError(f"no workflow {options['workflow_id']!r}")
        self.stdout.write(
            f"{workflow.name}  [{workflow.status}]  {workflow.completed_steps}/{workflow.total_steps} completed, "
            f"{workflow.failed_steps} failed  tokens {workflow.total_tokens_used}  cost ${workflow.total_cost_usd}"
            + (f"  duration {workflow.duration_ms} ms" if workflow.duration_ms is not None else "")
        )
        if workflow.error:
            self.stdout.write(f"error: {workflow.error}")
        header = f"{'task':<24} {'agent':<12} {'status':<10} {'tries':>5} {'ms':>8}  attempts"
        self.stdout.write(header)
        self.stdout.write("-" * len(header))
        for task in workflow_tasks_with_attempts(workflow_id=workflow.workflow_id):
            attempts = ", ".join(
                f"#{a.attempt_number} {a.status}" + (f" ({a.cause})" if a.cause else "") for a in task.attempts.all()
            )
            self.stdout.write(
                f"{task.task_name:<24} {task.agent_id:<12} {task.status:<10} {task.retry_count + 1:>5} "
                f"{_ms(task.execution_time_ms):>8}  {attempts}"
            )
