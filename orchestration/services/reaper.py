"""Recovery that does not depend on a worker surviving: the reaper and the dispatch sweeper.

- attempts still running past their hard limit plus grace (worker SIGKILLed, hard time
  limit hit: Celery does not always run on_failure then) are closed as timed_out or lost,
  and their task is retried or failed (attempt_verdict says which);
- running workflows past their deadline are failed;
- tasks waiting for a worker past the queue timeout are timed out even when no worker takes
  their queue (the claim would time them out, but no claim comes);
- tasks left queued with no message in the broker (a crash between commit and send), or
  whose message only a killed worker held (waiting for its countdown), are sent again;
- running attempts whose message the broker lost (Redis restarted empty) are closed as soon as
  their worker says how they ended there, not past their hard limit.

Safe to run concurrently: rows are claimed with SKIP LOCKED and closed with conditional
updates.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit

from django.conf import settings
from django.db import transaction
from django.db.models import Max, Q

from observability.attempts import attempts_reaped
from orchestration.db import atomic_with_retry, database_now
from orchestration.models import TaskAttempt, TaskExecution, Workflow
from orchestration.services.dispatch import dispatch_after_commit, dispatch_prepare, hard_limit_seconds
from orchestration.services.execution import attempt_abandon, queue_timeout_record, queue_waited_since
from orchestration.services.fastpath import update_rows
from orchestration.services.progress import workflow_fail_past_deadline
from orchestration.workers import (
    BROKER_CONNECTION_LOST,
    DATABASE_CONNECTION_LOST,
    DATABASE_ERROR,
    HARD_TIMEOUT,
    POOL_PROCESS_LOST,
    NodeReport,
    workers_ask,
    workers_holding,
)

logger = logging.getLogger(__name__)


@dataclass
class ReapResult:
    timed_out: list[int] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)
    workflows_failed: list[str] = field(default_factory=list)
    queue_timed_out: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)
    # The attempts timed out or lost, as their close read them (for attempts_reaped).
    closed: list[TaskAttempt] = field(default_factory=list)


@dataclass(frozen=True)
class Verdict:
    hard_timeout: bool  # else lost
    error: str
    cause: str = TaskAttempt.Cause.WORKER_LOST  # of a lost attempt
    error_class: str = ""


def attempt_verdict(
    attempt: TaskAttempt, answers: dict[str, list[NodeReport]], *, abandoned: str | None = None
) -> Verdict:
    """How a running attempt past its hard limit plus grace was abandoned, from what its worker
    node answered (orchestration/workers.py; a node that did not answer is absent):

    - no answer: the worker is gone: lost;
    - another process answers for the name (a restart, under systemd or Kubernetes): lost;
    - the same process says its pool process died under the attempt (the OOM killer; its
      message went back to the queue, or, when the hard limit came before the pool noticed
      the death, was acknowledged): lost;
    - the same process says it stopped the attempt when its broker connection was lost (the
      message, unacknowledged, comes back from the broker): lost, cause redelivery;
    - the same process says the message's last delivery lost its database connection and sent
      it again (run_task), which has not come back to close the attempt: lost, cause
      connection_lost, as that delivery's claim would have recorded it; or that it sent it again
      when the database answered a write with an error: lost, cause database_error, with it;
    - otherwise the worker lives on and, as it says or as is presumed when it cannot say (its
      ending forgotten, or the attempt or the worker from before processes were recorded),
      killed the attempt at its hard limit: timed_out (hard_timeout).

    `abandoned`: why the attempt is closed now, for its error (by default: past its limit).
    """
    limit = hard_limit_seconds(attempt.timeout_seconds or 0)
    name = attempt.worker or "?"
    abandoned = abandoned or f"attempt abandoned past its {limit} s limit"
    reports = answers.get(attempt.worker, []) if attempt.worker else []
    if not reports:
        return Verdict(False, f"worker {name} stopped answering; {abandoned}")
    presumed = Verdict(True, f"hard time limit of {limit} s exceeded (process killed)")
    known = [r for r in reports if r.started_at is not None]
    if attempt.worker_started_at is None or len(known) < len(reports):
        return presumed  # which process ran it, or which answers, is unknown
    ran = (attempt.worker_pid, attempt.worker_started_at)
    same = next((r for r in known if (r.pid, r.started_at) == ran), None)
    if same is None:
        return Verdict(
            False,
            f"worker {name} was restarted: the process that ran the attempt (pid {attempt.worker_pid}, started "
            f"{attempt.worker_started_at:%Y-%m-%d %H:%M:%S} UTC) is gone, pid "
            f"{', '.join(str(r.pid) for r in known)} answers now; {abandoned}",
        )
    ending = same.ended.get(attempt.celery_task_id or "")
    if ending is not None and ending.how == DATABASE_CONNECTION_LOST:
        # The delivery that ran the attempt sent the message again (a later one that started no
        # attempt leaves this as it was): the attempt's outcome was not recorded, and the
        # message has not come back to close it yet.
        return Verdict(
            False,
            f"worker {name} lost its database connection during attempt {attempt.attempt_number} (message sent "
            f"again, not yet back); {abandoned}",
            cause=TaskAttempt.Cause.CONNECTION_LOST,
        )
    if ending is not None and ending.how == DATABASE_ERROR:
        return Verdict(
            False,
            f"worker {name} met a database error during attempt {attempt.attempt_number}, which was not recorded "
            f"(message sent again, not yet back): {ending.detail}; {abandoned}",
            cause=TaskAttempt.Cause.DATABASE_ERROR,
            error_class=ending.error_class,
        )
    if ending is None or ending.pool_pid != attempt.pool_pid:  # another delivery of the same message
        return presumed
    if ending.how == POOL_PROCESS_LOST:
        return Verdict(False, f"pool process {attempt.pool_pid} of worker {name} died ({ending.detail}); {abandoned}")
    if ending.how == BROKER_CONNECTION_LOST:
        return Verdict(
            False,
            f"worker {name} lost its broker connection and stopped the attempt (pool process {attempt.pool_pid}); "
            f"{abandoned}",
            cause=TaskAttempt.Cause.REDELIVERY,
        )
    if ending.how == HARD_TIMEOUT:
        return Verdict(
            True, f"hard time limit of {limit} s exceeded (worker {name} killed its pool process {attempt.pool_pid})"
        )
    return presumed


# What attempt_verdict and the close read of an attempt.
_VERDICT_FIELDS = (
    "id",
    "attempt_number",
    "created_at",
    "started_at",
    "timeout_seconds",
    "worker",
    "worker_pid",
    "worker_started_at",
    "pool_pid",
    "celery_task_id",
)


def _reap_after(attempt: TaskAttempt) -> dt.datetime:
    """When a running attempt is past its hard limit plus the grace, on the database's clock:
    from its row's created_at (the database's time when the claim inserted it), not its started_at
    (the claiming worker's clock, which may run behind the reaper's)."""
    limit = hard_limit_seconds(attempt.timeout_seconds or 0) + settings.REAPER_GRACE_SECONDS
    return attempt.created_at + dt.timedelta(seconds=limit)


def attempts_reap(*, now: dt.datetime | None = None) -> ReapResult:
    """Close running attempts past hard limit + REAPER_GRACE_SECONDS; retry or fail their tasks.

    Killed at its hard time limit by a worker that lives on: timed_out (hard_timeout); its
    worker gone, restarted, or its pool process dead: lost (worker_lost); stopped by its worker
    for a lost broker connection: lost (redelivery). See attempt_verdict:
    one remote-control round trip asks all their worker nodes.

    Time is the database's (`now`, by default its clock): an attempt is measured from when its
    claim began there (`_reap_after`), so a reaper or a worker whose clock is off reaps nothing
    early (a live attempt closed and run again beside itself) or late.
    """
    now = now or database_now()
    result = ReapResult()
    floor = now - dt.timedelta(seconds=settings.TASK_HARD_TIMEOUT_GRACE_SECONDS + settings.REAPER_GRACE_SECONDS + 1)
    candidates = [
        a
        for a in TaskAttempt.objects.filter(status=TaskAttempt.Status.RUNNING, created_at__lt=floor).only(
            *_VERDICT_FIELDS
        )
        if _reap_after(a) < now
    ]
    answers = workers_ask(
        {a.worker for a in candidates if a.worker},
        # how a message ended matters only where the process that ran it is known
        {a.celery_task_id for a in candidates if a.celery_task_id and a.worker_started_at is not None},
    )
    if answers is None:
        # The broker did not take the question: a worker's silence would say nothing (it may
        # live on, and know how the attempt ended). Its attempts wait for a pass that can ask;
        # closed now, they were recorded lost, "worker stopped answering", while the broker was away.
        left = [a for a in candidates if a.worker]
        logger.warning(
            "the reaper could not ask the workers (the broker is not answering): %d attempt(s) past their "
            "limit left to the next pass",
            len(left),
        )
        candidates = [a for a in candidates if not a.worker]
        answers = {}
    for candidate in candidates:
        verdict = attempt_verdict(candidate, answers)
        if (closed := _attempt_close(candidate.pk, verdict, now=now)) is not None:
            (result.timed_out if verdict.hard_timeout else result.lost).append(candidate.pk)
            result.closed.append(closed)
    result.workflows_failed = workflows_enforce_deadlines(now=now)
    result.queue_timed_out = queue_timeouts_enforce(now=now)
    return result


def attempts_reap_reported() -> ReapResult:
    """attempts_reap, then the attempts it closed reported (attempts_reaped: metrics and
    InfluxDB points), after the whole pass has committed: one pass of the beat's
    reap_stale_tasks and of `manage.py reap_stale_tasks` alike."""
    result = attempts_reap()
    attempts_reaped(attempts=result.closed)
    return result


def _attempt_close(attempt_id: int, verdict: Verdict, *, now: dt.datetime) -> TaskAttempt | None:
    """Close a running attempt as `verdict` says, retrying or failing its task (attempt_abandon):
    the attempt as closed; None when it was no longer running."""

    def close() -> TaskAttempt | None:
        attempt = (
            TaskAttempt.objects.select_for_update(skip_locked=True)
            .filter(pk=attempt_id, status=TaskAttempt.Status.RUNNING)
            .first()
        )
        if attempt is None:
            return None
        task = TaskExecution.objects.select_for_update().get(pk=attempt.execution_id)
        if verdict.hard_timeout:
            again = attempt_abandon(
                task,
                attempt,
                status=TaskAttempt.Status.TIMED_OUT,
                cause=TaskAttempt.Cause.HARD_TIMEOUT,
                error=verdict.error,
                now=now,
            )
        else:
            again = attempt_abandon(
                task,
                attempt,
                status=TaskAttempt.Status.LOST,
                cause=verdict.cause,
                error=verdict.error,
                now=now,
                error_class=verdict.error_class,
            )
        return None if again is None else attempt

    return atomic_with_retry(close)


def queue_timeouts_enforce(*, now: dt.datetime) -> list[str]:
    """Time out the tasks that waited for a worker past TASK_QUEUE_TIMEOUT_SECONDS (none
    consumes their queue, or every worker is down), as their claim would: a timed-out try
    with cause queue_timeout, the task failed, its workflow failed or going on. Returns the
    ids of those tasks. A message that reaches a worker later runs nothing. `now` is the
    database's clock, on which queued_at and deferred_at are stamped and the claim checks."""
    cutoff = now - dt.timedelta(seconds=settings.TASK_QUEUE_TIMEOUT_SECONDS)
    waiting = [TaskExecution.Status.QUEUED, TaskExecution.Status.RETRYING]
    overdue = list(
        TaskExecution.objects.filter(status__in=waiting, queued_at__lt=cutoff)
        .filter(Q(deferred_at__isnull=True) | Q(deferred_at__lt=cutoff))
        .values_list("execution_id", flat=True)
    )
    recorded = []
    for execution_id in overdue:

        def time_out(execution_id: str = execution_id) -> int | None:
            task = (
                TaskExecution.objects.select_for_update(skip_locked=True)
                .filter(pk=execution_id, status__in=waiting)
                .first()
            )
            if task is None or queue_waited_since(task, now=now) is None:
                return None  # a worker claimed it, or it was sent again, meanwhile
            number = (TaskAttempt.objects.filter(execution=task).aggregate(n=Max("attempt_number"))["n"] or 0) + 1
            queue_timeout_record(task, number=number, now=now)
            return number

        if atomic_with_retry(time_out) is not None:
            recorded.append(execution_id)
    if recorded:
        logger.warning("timed out %d task(s) that no worker took from the queue: %s", len(recorded), recorded)
    return recorded


def workflows_enforce_deadlines(*, now: dt.datetime) -> list[str]:
    failed = []
    for workflow_id in Workflow.objects.filter(status=Workflow.Status.RUNNING, deadline__lt=now).values_list(
        "workflow_id", flat=True
    ):

        def fail(workflow_id: str = workflow_id) -> bool:
            # Locks the workflow, then its tasks and attempts: a deadlock victim is retried. Its
            # deadline is read again under the lock: an operator may have extended it since the list.
            workflow = (
                Workflow.objects.select_for_update(skip_locked=True)
                .filter(pk=workflow_id, status=Workflow.Status.RUNNING, deadline__lt=now)
                .first()
            )
            if workflow is None:
                return False
            workflow_fail_past_deadline(workflow, now=now)
            return True

        if atomic_with_retry(fail):
            failed.append(workflow_id)
    return failed


def broker_redis_url() -> str | None:
    """The Celery broker as a URL redis-py connects to, when the broker is Redis; None when it
    is not (RabbitMQ, the filesystem transport: their queues cannot be read here). A Redis on a
    unix socket is kombu's `redis+socket:///path?virtual_host=N`, redis-py's `unix:///path?db=N`."""
    url = settings.CELERY_BROKER_URL
    parts = urlsplit(url)
    if parts.scheme in ("redis", "rediss"):
        return url
    if parts.scheme != "redis+socket":
        return None
    pairs = []
    for name, value in parse_qsl(parts.query):
        if name == "virtual_host":
            # kombu reads "/3" as database 3 and "" or "/" as database 0; redis-py wants "3".
            name, value = "db", value.removeprefix("/") or "0"
        pairs.append((name, value))
    query = urlencode(pairs)
    return f"unix://{parts.netloc}{parts.path}" + (f"?{query}" if query else "")


# Messages read per LRANGE (and unacknowledged entries per HSCAN) while looking for the lost:
# a backlog of a million messages is read a thousand at a time, never held whole.
BROKER_READ_CHUNK = 1000


def _broker_message_ids(
    queues: set[str], wanted: set[str], *, renew: Callable[[], bool] = lambda: True
) -> tuple[set[str], dict[str, dt.datetime | None]] | None:
    """Which of the task ids `wanted` have a message waiting in the Redis broker's queues, and
    which are delivered to a worker and not yet acknowledged, with the time each was to run at
    (its ETA: a retry's backoff, a deferral; None for one to run at once); None if the broker
    is not Redis (nothing can be checked) or if `renew`, called after each chunk read (a long
    backlog takes seconds: the sweep's lease is renewed meanwhile), says the sweep lost its
    lock. The queues are read in chunks, from their heads (new messages go in there, so a
    message is never skipped for one pushed meanwhile; one taken from the tail meanwhile is
    among the unacknowledged, read after)."""
    url = broker_redis_url()
    if url is None:
        return None
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5)

    def headers(raw: bytes) -> dict:
        try:
            payload = json.loads(raw)
        except ValueError:
            return {}
        if isinstance(payload, list) and payload:  # unacked entries are [message, exchange, routing_key]
            payload = payload[0]
        found = payload.get("headers") if isinstance(payload, dict) else None
        return found if isinstance(found, dict) and found.get("id") else {}

    ids: set[str] = set()
    sep = "\x06\x16"
    for queue in queues:
        for key in [queue, *(f"{queue}{sep}{p}" for p in range(1, 10))]:
            start = 0
            while chunk := client.lrange(key, start, start + BROKER_READ_CHUNK - 1):
                for raw in chunk:
                    if (found := headers(raw)) and str(found["id"]) in wanted:
                        ids.add(str(found["id"]))
                start += BROKER_READ_CHUNK
                if not renew():
                    return None
    unacked: dict[str, dt.datetime | None] = {}
    for _, raw in client.hscan_iter("unacked", count=BROKER_READ_CHUNK):
        if (found := headers(raw)) and str(found["id"]) in wanted:
            unacked[str(found["id"])] = _eta(found.get("eta"))
    return ids, unacked


def _eta(value: object) -> dt.datetime | None:
    """A message's ETA header (ISO 8601; naive is UTC), None when absent or unreadable."""
    if not isinstance(value, str):
        return None
    try:
        eta = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return eta if eta.tzinfo is not None else eta.replace(tzinfo=dt.UTC)


# The broker-side lock that lets one dispatch sweep run at a time: a lease of this many seconds,
# renewed by the sweep before each batch it re-sends. A sweep that ends without releasing it
# (its process killed, or the broker gone at that moment and back with its data, the lock
# included) holds off the next sweeps this long at most: with a lock held for minutes, the
# messages lost in a broker restart waited minutes more to be sent again.
SWEEP_LOCK = "agentledger:queued_sweep"
SWEEP_LOCK_SECONDS = 15
# Tasks re-sent per transaction and per publishing batch: one at a time, the 4,776 messages a
# broker lost took over two minutes to send again (14 ms each).
RESEND_BATCH = 500


@contextmanager
def _sweep_alone() -> Iterator[Callable[[], bool] | None]:
    """Whether this is the only sweep running: a lock in the Redis broker (the sweep reads the
    broker's queues anyway, and only with a Redis broker does it run), held until the sweep's
    messages are sent. A task the sweep re-sends keeps its first queued_at, so until its new
    message is published it looks lost to any other sweep, which would send it once more (a
    second message, superseded: it runs nothing, but the task was re-sent twice). A sweep that
    finds another running returns at once: the next pass comes seconds later. (Not a
    PostgreSQL session lock: behind a transaction-mode pooler its release could reach another
    session and leave it held.)

    Yields None when another sweep holds the lock, else `renew`: it puts the lease back to
    SWEEP_LOCK_SECONDS and says whether the lock is still this sweep's (False once it expired,
    another sweep may have it)."""
    url = broker_redis_url()
    if url is None:
        yield lambda: True
        return
    import redis

    lock = redis.Redis.from_url(url, socket_timeout=5).lock(SWEEP_LOCK, timeout=SWEEP_LOCK_SECONDS, blocking=False)
    if not lock.acquire():
        yield None
        return

    def renew() -> bool:
        try:
            lock.reacquire()
        except redis.exceptions.LockNotOwnedError:
            return False
        return True

    try:
        yield renew
    finally:
        try:
            lock.release()
        except redis.RedisError:  # expired (a sweep past its lease) or the broker gone
            logger.warning("could not release the dispatch sweep's lock", exc_info=True)


# Per broker URL, the Redis server's run_id (INFO: a new one at each start) the last sweep in
# this process read, and when the server restarted, as far as a sweep here found.
_broker_runs: dict[str, tuple[str, dt.datetime | None]] = {}


def _broker_restarted_at(*, now: dt.datetime) -> dt.datetime | None:
    """When the Redis broker restarted, if within DISPATCH_SWEEP_AFTER_SECONDS of `now`, plus the
    longest countdown of a waiting task's message (a retry's backoff, a deferral: one sent before
    the restart is looked for once it ends); else None. Every message published before then is
    gone when it restarted empty, whatever its age, and so is the unacknowledged message of every
    try then running. The server's uptime (INFO) says when it started, to any process: one that
    never read it before too (a worker restarted with it, `reap_stale_tasks` run by hand, which
    waited as long as ever). Another run_id than this process's sweep read before, on a server up
    longer (another one answers: a failover), counts from the sweep that found it."""
    url = broker_redis_url()
    if url is None:
        return None
    import redis

    try:
        info = redis.Redis.from_url(url, socket_timeout=5).info("server")
    except redis.ResponseError:  # INFO refused (a managed Redis may rename or forbid it)
        return None
    run_id, uptime = str(info.get("run_id", "")), info.get("uptime_in_seconds")
    countdown = max(settings.TASK_RETRY_BACKOFF_MAX_SECONDS, settings.TASK_DEFERRAL_MAX_COUNTDOWN_SECONDS)
    window = dt.timedelta(seconds=settings.DISPATCH_SWEEP_AFTER_SECONDS + countdown)
    previous, restarted_at = _broker_runs.get(url, (None, None))
    if isinstance(uptime, int) and dt.timedelta(seconds=uptime) < window:
        # Whole seconds, both ends cut: it may have been up almost a second less than it says,
        # and a task queued 0.1 s before the restart was taken for one sent after it. Counted
        # from up to 2 s later: what was sent to the new server meanwhile is found there.
        restarted_at = min(now - dt.timedelta(seconds=uptime - 2), now)
    elif previous is not None and run_id != previous:
        restarted_at = now
    if run_id != previous and restarted_at is not None:
        logger.warning("the broker restarted: what was queued and running before is looked for at once")
    _broker_runs[url] = (run_id, restarted_at)
    if restarted_at is not None and now - restarted_at < window:
        return restarted_at
    return None


def _stopped_attempts_close(celery_task_ids: set[str], *, now: dt.datetime) -> list[int]:
    """Close now the running attempts whose message the broker no longer has, once their worker
    says the attempt ended there: Redis restarted empty, and the worker, its connection broken,
    stopped the attempt (worker_cancel_long_running_tasks_on_connection_loss). No delivery of
    the message comes back to close the attempt, which the reaper closed only past its hard
    limit plus the grace (340 s for the default timeout), its task held running, its dependents
    waiting and its agent's max_concurrency slot taken meanwhile. Only the process that ran the
    attempt is believed: silence says nothing here (a worker cut off from the broker may still
    run it), nor does another process answering for the name (two workers given one name would
    run the task twice at once). One that says the attempt still runs, or cannot say, is left
    alone: the attempt records its own outcome, or the reaper closes it as before. Returns the
    ids of the attempts closed."""
    attempts = list(
        TaskAttempt.objects.filter(status=TaskAttempt.Status.RUNNING, celery_task_id__in=celery_task_ids).only(
            *_VERDICT_FIELDS
        )
    )
    answers = workers_ask(
        {a.worker for a in attempts},
        {a.celery_task_id for a in attempts if a.worker_started_at is not None},
    )
    closed = []
    for attempt in attempts:
        ran = (attempt.worker_pid, attempt.worker_started_at)
        reports = (answers or {}).get(attempt.worker, [])
        same = next((r for r in reports if (r.pid, r.started_at) == ran), None)
        # The process must also say the message runs nowhere in it now: how it remembers the
        # message ended may be an earlier delivery's (run_task sends it again under the same id
        # after a lost database connection), and the attempt the next delivery started there
        # runs on through a broken broker connection unless the worker stops it.
        if (
            attempt.worker_started_at is None
            or same is None
            or same.running is None
            or attempt.celery_task_id in same.running
        ):
            continue
        verdict = attempt_verdict(attempt, answers, abandoned="its message is gone from the broker")
        if verdict.hard_timeout:
            continue  # running there, or ended in a way the worker cannot tell: not for now
        if (done := _attempt_close(attempt.pk, verdict, now=now)) is not None:
            closed.append(done)
    if closed:
        attempts_reaped(attempts=closed)
        logger.warning(
            "closed %d running attempt(s) whose worker stopped them and whose messages the broker lost: %s",
            len(closed),
            [attempt.pk for attempt in closed],
        )
    return [attempt.pk for attempt in closed]


def queued_sweep(*, now: dt.datetime | None = None) -> list[str]:
    """Send again the tasks left queued past DISPATCH_SWEEP_AFTER_SECONDS whose message is in
    neither a queue nor a live worker's hands: lost between commit and send, or held, waiting
    for its countdown (a retry's backoff, a deferral), by a worker that was killed (re-sent once
    the countdown has ended; until then the message is where it belongs). Redis
    would give the latter back only after its visibility timeout, which exceeds the queue
    timeout: the task would fail for waiting in the queue while idle workers wait for work.
    The message left behind is superseded (its id is no longer the task's) and runs nothing."""
    with _sweep_alone() as renew:
        return _queued_sweep(now=now, renew=renew) if renew is not None else []


def _queued_sweep(*, now: dt.datetime | None, renew: Callable[[], bool]) -> list[str]:
    # The database's clock, on which the tasks' queued_at and deferred_at are stamped.
    now = now or database_now()
    cutoff = now - dt.timedelta(seconds=settings.DISPATCH_SWEEP_AFTER_SECONDS)
    if (restarted_at := _broker_restarted_at(now=now)) is not None:
        # What was queued, or started running, before the restart was found has lost its message
        # with the server that went away (or failed to send it), whatever its age. One sent to
        # the new server meanwhile is found there; one still on its way is sent again, and the
        # first, superseded, runs nothing.
        cutoff = max(cutoff, restarted_at)
    # a deferral sends a new message without moving queued_at: not lost until it too is old
    lost = Q(queued_at__lt=cutoff) & (Q(deferred_at__isnull=True) | Q(deferred_at__lt=cutoff))
    if restarted_at is not None:
        # So has a retry or a deferral sent before it, its countdown running then (queued_at,
        # or deferred_at, is when it ends): the worker holding its message dropped it with its
        # broken connection. Looked for once the countdown has ended, not
        # DISPATCH_SWEEP_AFTER_SECONDS later (a 2 s backoff took 64 s). A row written since
        # (updated_at: a write that may have sent it again) is left to the rule above.
        lost |= Q(updated_at__lt=restarted_at, queued_at__lte=now) & (
            Q(deferred_at__isnull=True) | Q(deferred_at__lte=now)
        )
    stale = list(
        TaskExecution.objects.filter(status__in=[TaskExecution.Status.QUEUED, TaskExecution.Status.RETRYING])
        .filter(lost)
        .values_list("execution_id", "celery_task_id", "priority")
    )
    # The messages of running attempts: unacknowledged until the attempt has ended (acks_late).
    # Only those running past the cutoff are looked for, as only tasks queued before it are: a
    # busy system's short tries never make the sweep read the broker.
    running = dict(
        TaskAttempt.objects.filter(
            status=TaskAttempt.Status.RUNNING, celery_task_id__isnull=False, created_at__lt=cutoff
        )
        .exclude(worker="")
        .values_list("celery_task_id", "execution__priority")
    )
    if running:
        # Looked for among the unacknowledged first (the messages workers hold): only one
        # missing there is looked for in the queues too, which a backlog makes long (every
        # message read and parsed), so that they are read when something is missing, not on
        # every sweep of a busy broker.
        found = _broker_message_ids(set(), set(running), renew=renew)
        if found is None:
            return []
        running = {
            celery_task_id: priority for celery_task_id, priority in running.items() if celery_task_id not in found[1]
        }
    if not stale and not running:
        return []
    found = _broker_message_ids(
        {priority for _, _, priority in stale} | set(running.values()),
        {celery_task_id for _, celery_task_id, _ in stale if celery_task_id} | set(running),
        renew=renew,
    )
    if found is None:
        return []
    present, unacked = found
    if gone := set(running) - present - set(unacked):
        _stopped_attempts_close(gone, now=now)
    # A message held until its countdown ends is where it belongs until then. Past its ETA (or
    # without one) a live worker holding it has it reserved, running or about to start: only
    # about those are the workers asked.
    due = {
        celery_task_id
        for _, celery_task_id, _ in stale
        if celery_task_id not in present
        and celery_task_id in unacked
        and (unacked[celery_task_id] is None or unacked[celery_task_id] <= now)
    }
    present |= set(unacked) - due
    if due:
        held = workers_holding(due)
        # Cannot tell: left to the broker's visibility timeout, as a message held by a live worker.
        present |= due if held is None else held
    missing = [
        (execution_id, celery_task_id) for execution_id, celery_task_id, _ in stale if celery_task_id not in present
    ]
    resent: list[str] = []
    for start in range(0, len(missing), RESEND_BATCH):
        if not renew():
            logger.warning(
                "the dispatch sweep outlived its lock: %d task(s) left to the next sweep", len(missing) - start
            )
            break
        expected = dict(missing[start : start + RESEND_BATCH])
        with transaction.atomic():
            tasks = [
                task
                for task in TaskExecution.objects.select_for_update(skip_locked=True)
                .filter(pk__in=expected, status__in=[TaskExecution.Status.QUEUED, TaskExecution.Status.RETRYING])
                .order_by("execution_id")
                if task.celery_task_id == expected[task.pk]  # not sent again meanwhile
            ]
            dispatches = []
            for task in tasks:
                queued_at = task.queued_at
                dispatches.append(dispatch_prepare(task, now=now, status=task.status))
                task.queued_at = queued_at  # the queue timeout still counts from the first queueing
            update_rows(tasks, ["celery_task_id"])
            dispatch_after_commit(dispatches)
        resent += [task.pk for task in tasks]
    if resent:
        logger.warning("re-sent %d task(s) whose messages were missing: %s", len(resent), resent)
    return resent
