from django.core.management.base import CommandError
from django.db.models import Count

from orchestration.event_types import EventType
from orchestration.management.arguments import DatabaseCommand, text
from orchestration.models import AgentInteraction, Event, Workflow
from orchestration.selectors import workflow_tasks_with_attempts


def _ms(value):
    return "" if value is None else f"{value:.0f}"


ERROR_SHOWN_CHARS = 120


def _attempt_line(attempt) -> str:
    """One attempt as recorded: outcome and cause, how long it ran under which limit, what it
    spent, where it ran, and the first line of its error."""
    line = f"    #{attempt.attempt_number} {attempt.status}" + (f" ({attempt.cause})" if attempt.cause else "")
    if attempt.duration_ms is not None:
        line += f"  {attempt.duration_ms:.1f} ms"
    else:
        line += f"  since {attempt.started_at:%Y-%m-%d %H:%M:%S} UTC"
    if attempt.timeout_seconds:
        line += f" (limit {attempt.timeout_seconds} s)"
    line += f"  tokens {attempt.tokens_used}  cost ${attempt.cost_usd:.6f}"
    if attempt.worker:
        line += f"  on {attempt.worker}"
    if error_lines := (attempt.error or "").strip().splitlines():
        first = error_lines[0]
        line += "  " + (first if len(first) <= ERROR_SHOWN_CHARS else first[: ERROR_SHOWN_CHARS - 1] + "…")
    return line


class Command(DatabaseCommand):
    help = "Show a workflow's tasks and, under each, every attempt at it as recorded."

    def add_arguments(self, parser):
        parser.add_argument("workflow_id", type=text)

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
        header = f"{'task':<20} {'agent':<16} {'status':<10} {'tries':>5} {'ms':>8} {'tokens':>7} {'cost $':>9}"
        self.stdout.write(header)
        self.stdout.write("-" * len(header))
        for task in workflow_tasks_with_attempts(workflow_id=workflow.workflow_id):
            tries = task.attempts.all()
            self.stdout.write(
                f"{task.task_name:<20} {task.agent_id:<16} {task.status:<10} {len(tries):>5} "
                f"{_ms(task.execution_time_ms):>8} {task.tokens_used:>7} {task.cost_usd:>9.6f}"
            )
            for attempt in tries:
                self.stdout.write(_attempt_line(attempt))
        events = Event.objects.filter(workflow_id=workflow.workflow_id)
        tools = events.filter(event_type=EventType.TOOL_EXECUTED).count()
        interactions = AgentInteraction.objects.filter(workflow_id=workflow.workflow_id)
        kinds = ", ".join(
            f"{row['interaction_type']} {row['n']}"
            for row in interactions.values("interaction_type").annotate(n=Count("id")).order_by("interaction_type")
        )
        self.stdout.write(
            f"events: {events.count()}  tool calls: {tools}  interactions: {interactions.count()}"
            + (f" ({kinds})" if kinds else "")
        )
