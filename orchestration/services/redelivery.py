"""A redelivered message whose previous try is still recorded running: what became of that try.

The broker gives a message back while a try of it is recorded running in two cases. Its worker
lost the pool process (SIGKILL, the OOM killer: reject_on_worker_lost requeues it) or the whole
process. Or its worker lives on but lost its broker connection: kombu restores the
unacknowledged message, and the worker either stops the try itself (Celery's
worker_cancel_long_running_tasks_on_connection_loss, our default) or lets it run on. The same
happens when a try outlives the Redis visibility timeout. Taking every such redelivery for a
lost worker, as the claim did, records a try that its worker stopped, or that is still running
and will finish, as `lost` / `worker_lost`, and runs the task a second time beside a first that
is not over.

So before the claim, outside its transaction and holding no lock, the claim asks the attempt's
worker node (one remote-control round trip, orchestration/workers.py) and passes the answer in:

- the process that ran the attempt still runs it: this delivery is a duplicate and runs
  nothing; the try records its own outcome (or the reaper closes it, as any running attempt);
- that process says it stopped the try when its broker connection was lost, or no longer runs
  it: `lost`, cause `redelivery`;
- it says the pool process died under the try: `lost`, cause `worker_lost`, naming it;
- it says a delivery of the message lost its database connection and sent it again (run_task):
  `lost`, cause `connection_lost`, as the reaper records it; or sent it again when the database
  answered a write with an error: `lost`, cause `database_error`, with that error;
- no answer, another process answering for the name, or a try from before processes were
  recorded: `lost`, cause `worker_lost`, as before.

Only redelivered messages pay for this (a SELECT, and the round trip when the try is running);
the fast path never sees them.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestration.models import TaskAttempt
from orchestration.workers import (
    BROKER_CONNECTION_LOST,
    DATABASE_CONNECTION_LOST,
    DATABASE_ERROR,
    HARD_TIMEOUT,
    POOL_PROCESS_LOST,
    NodeReport,
    WorkerProcess,
    workers_ask,
)

_ASKED_FIELDS = ("attempt_number", "status", "worker", "worker_pid", "worker_started_at", "pool_pid", "celery_task_id")


@dataclass(frozen=True)
class PreviousTry:
    """What the worker of a running attempt said about it, for the claim of its redelivered message."""

    attempt_id: int
    running: bool  # its process still runs it: the redelivery is a duplicate
    status: str = TaskAttempt.Status.LOST  # else how to close it
    cause: str = TaskAttempt.Cause.WORKER_LOST
    error: str = ""
    error_class: str = ""


def previous_try_check(
    *, execution_id: str, celery_task_id: str, process: WorkerProcess | None, unless_attempt: int | None = None
) -> PreviousTry | None:
    """For a redelivered message, or one run_task sent again: ask the worker of the task's last
    attempt, if that attempt is running and was started by this message in a known worker
    process, what became of it. None when there is nothing to ask (the claim then applies its
    own rules), or when that attempt is `unless_attempt` (the message sent again says what ended
    it). Never inside a transaction: the claim locks the rows afterwards and checks the attempt
    is the same one."""
    last = (
        TaskAttempt.objects.filter(execution_id=execution_id).order_by("-attempt_number").only(*_ASKED_FIELDS).first()
    )
    if (
        last is None
        or last.attempt_number == unless_attempt
        or last.status != TaskAttempt.Status.RUNNING
        or last.celery_task_id != celery_task_id
        or not last.worker
        or last.worker_started_at is None
    ):
        return None
    answers = workers_ask({last.worker}, {celery_task_id}, limit=1)
    if answers is None:  # the broker unreachable: nothing was told (the claim's own rules apply)
        return None
    return previous_try_verdict(last, answers, process=process)


def previous_try_verdict(
    attempt: TaskAttempt, answers: dict[str, list[NodeReport]], *, process: WorkerProcess | None
) -> PreviousTry | None:
    """How the running `attempt` stands, from what its worker node answered (see the module's
    docstring); None when the answer does not tell (the claim's rule for a lost worker)."""
    name, number = attempt.worker, attempt.attempt_number
    reports = answers.get(name, [])
    ran = (attempt.worker_pid, attempt.worker_started_at)
    same = next((r for r in reports if (r.pid, r.started_at) == ran), None)
    if same is None:
        if any(r.started_at is not None for r in reports):
            return PreviousTry(
                attempt_id=attempt.pk,
                running=False,
                error=f"worker {name} was restarted during attempt {number}: the process that ran it "
                f"(pid {attempt.worker_pid}) is gone (message redelivered)",
            )
        return None
    if same.running is None:
        return None  # a worker that does not say what it runs
    runs = set(same.running.get(attempt.celery_task_id or "", ()))
    if process is not None and (process.pid, process.started_at) == ran:
        runs.discard(process.pool_pid)  # this delivery itself, in the same worker
    if attempt.pool_pid in runs:
        return PreviousTry(attempt_id=attempt.pk, running=True)
    ending = same.ended.get(attempt.celery_task_id or "")
    if ending is not None and ending.how == DATABASE_CONNECTION_LOST:
        # The attempt's delivery sent this message again (a later one that started no attempt
        # leaves this as it was), as the reaper reads it.
        return PreviousTry(
            attempt_id=attempt.pk,
            running=False,
            cause=TaskAttempt.Cause.CONNECTION_LOST,
            error=f"worker {name} lost its database connection during attempt {number} (message sent again)",
        )
    if ending is not None and ending.how == DATABASE_ERROR:
        return PreviousTry(
            attempt_id=attempt.pk,
            running=False,
            cause=TaskAttempt.Cause.DATABASE_ERROR,
            error=f"worker {name} met a database error during attempt {number}, which was not recorded "
            f"(message sent again): {ending.detail}",
            error_class=ending.error_class,
        )
    if ending is not None and ending.pool_pid == attempt.pool_pid:
        if ending.how == POOL_PROCESS_LOST:
            return PreviousTry(
                attempt_id=attempt.pk,
                running=False,
                error=f"pool process {attempt.pool_pid} of worker {name} died during attempt {number} "
                f"({ending.detail}; message redelivered)",
            )
        if ending.how == HARD_TIMEOUT:
            return PreviousTry(
                attempt_id=attempt.pk,
                running=False,
                status=TaskAttempt.Status.TIMED_OUT,
                cause=TaskAttempt.Cause.HARD_TIMEOUT,
                error=f"hard time limit exceeded (worker {name} killed its pool process {attempt.pool_pid}; "
                "message redelivered)",
            )
        if ending.how == BROKER_CONNECTION_LOST:
            return PreviousTry(
                attempt_id=attempt.pk,
                running=False,
                cause=TaskAttempt.Cause.REDELIVERY,
                error=f"worker {name} lost its broker connection during attempt {number} and stopped it "
                f"(pool process {attempt.pool_pid}); the broker redelivered the message",
            )
    return PreviousTry(
        attempt_id=attempt.pk,
        running=False,
        cause=TaskAttempt.Cause.REDELIVERY,
        error=f"the broker redelivered the message of attempt {number}; worker {name} lives on and no longer "
        f"runs it (pool process {attempt.pool_pid})",
    )
