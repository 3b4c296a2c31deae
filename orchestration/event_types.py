"""The vocabulary of the events audit log: every event type, entity type and severity.

This module is the one place where event types are defined; the `events` table has a
CHECK constraint built from it, so an event of an undocumented type cannot be stored.
Adding a type means adding it here and generating a migration.

The events that end a task or workflow in a way it can start again from (task_failed,
task_cancelled, workflow_failed, workflow_cancelled: a retry or resume reruns the same row)
carry that row's changing columns as the ending left them, under the payload's `state`
(orchestration.services.events.TASK_STATE_FIELDS / WORKFLOW_STATE_FIELDS). A workflow that had
failed already, and was waiting for its running tasks, when someone cancelled it ends with
workflow_failed (its failure stays its error), the cancel's reason under `cancelled`; so does
one whose deadline passed meanwhile, the deadline's error under `deadline`.

`task_ended_late` records what became of a try whose attempt had been closed without it
(lost: its message was redelivered, or the reaper closed it; timed out; cancelled) and that
still ended on its worker: its outcome (`succeeded`, `failed`, `timed_out`, with the error),
its duration and the spend it reported beyond its meter (added to the attempt as late usage).
The outcome is not applied: the task and its workflow went on without it (a later attempt may
have completed the task). Its output stays out of the record (the stream carries events to
consumers that never see task outputs).

`task_paid_late` records what such a try paid, as its meter reported it, after its attempt had
been closed (a model's answer that arrived after the cancel, before the worker stopped the try,
or that a try timed out or lost went on to pay for): under `late_usage`, what was added to the
attempt, its task and its workflow in that event's transaction (wasted, unless `closed_as` is
cancelled), with `closed_as` and `cause` as task_ended_late has them. The task's and workflow's
`state` in their ending events, plus the `late_usage` of both types after them, is what their
rows say they cost. (task_ended_late's `late_usage` is only what the try reported at its end
beyond its row.)

`workflow_changed`, `task_changed` and `api_key_changed` record an edit on the console's change
page (only there: the API edits none of these fields): under `changes`, each field changed with
its value before and after (`old`, `new`; a date-time as ISO 8601, a decimal as its text), and
who made it (`by`, `via`). An API key's event names it as its other events do (prefix, name,
owner, permissions, expiry), never its secret: extending a key's expiry hands its owner's
rights out again, as minting one does.

`agent_started` is written when an agent brings another into its attempt (hand-off, review,
collaboration), as that agent begins; the attempt's own agent beginning is `task_started`.

Seed 004's analytics names map onto these: `agent_task_completed` -> task_completed,
`agent_task_failed` -> task_failed, `workflow_finished` -> workflow_completed /
workflow_failed / workflow_cancelled.
"""

from django.db import models


class EventType(models.TextChoices):
    # Workflow lifecycle
    WORKFLOW_CREATED = "workflow_created", "workflow created (spec validated and stored)"
    WORKFLOW_STARTED = "workflow_started", "workflow started (first task queued)"
    WORKFLOW_COMPLETED = "workflow_completed", "workflow completed (every task completed)"
    WORKFLOW_FAILED = "workflow_failed", "workflow failed (a task failed for good, or the deadline passed)"
    WORKFLOW_CANCELLED = "workflow_cancelled", "workflow cancelled by a user"
    WORKFLOW_RESUMED = "workflow_resumed", "failed workflow resumed from its failed tasks"
    WORKFLOW_CHANGED = (
        "workflow_changed",
        "a workflow's name, description, type, priority, continue_on_failure or deadline was edited",
    )
    # Task (task_executions) and attempt (task_attempts) lifecycle
    TASK_QUEUED = "task_queued", "task sent to a Celery queue"
    TASK_STARTED = "task_started", "an attempt of the task started on a worker"
    TASK_RETRYING = "task_retrying", "an attempt failed and the task will be tried again"
    TASK_COMPLETED = "task_completed", "task completed"
    TASK_FAILED = "task_failed", "task failed with no retries left (or a non-retryable error)"
    TASK_TIMED_OUT = "task_timed_out", "an attempt exceeded its time limit"
    TASK_CANCELLED = "task_cancelled", "task cancelled"
    TASK_LOST = "task_lost", "an attempt was closed as lost (its worker or pool process gone, its message redelivered)"
    TASK_ENDED_LATE = "task_ended_late", "a try ended after its attempt had been closed without it (not applied)"
    TASK_PAID_LATE = (
        "task_paid_late",
        "a try paid after its attempt had been closed without it (added to the attempt, task and workflow)",
    )
    TASK_CHANGED = "task_changed", "a task's description, priority, retries or timeout was edited"
    # Agents, tools, conversations, interactions
    AGENT_STARTED = "agent_started", "an agent began working on a task or message"
    AGENT_REGISTERED = "agent_registered", "an agent definition was loaded or changed"
    TOOL_EXECUTED = "tool_executed", "an agent called a tool"
    MESSAGE_CREATED = "message_created", "a conversation message was stored"
    AGENT_INTERACTION = "agent_interaction", "hand-off, collaboration, review or feedback between agents"
    # Access
    API_KEY_CREATED = "api_key_created", "an API key was created (or made by rotating another)"
    API_KEY_REVOKED = "api_key_revoked", "an API key was revoked (or rotated out)"
    API_KEY_CHANGED = "api_key_changed", "an API key's name or expiry was edited"
    # Training data
    EXPORT_COMPLETED = "export_completed", "a training-data export finished"
    EXPORT_FAILED = "export_failed", "a training-data export failed"


class EntityType(models.TextChoices):
    WORKFLOW = "workflow"
    TASK = "task"
    ATTEMPT = "attempt"
    AGENT = "agent"
    TOOL = "tool"
    CONVERSATION = "conversation"
    EXPORT = "export"
    API_KEY = "api_key"
    SYSTEM = "system"


class Severity(models.TextChoices):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"
