"""Which worker process ran an attempt, and what the live workers say about theirs.

A worker's node name (celery@host) outlives its process: systemd and Kubernetes restart a
killed worker under the same name, in a container often with the same pid too. So an attempt
also records the process it ran in: the worker's main process (its pid and start time) and
the pool process. The main process remembers how its recent run_task requests ended
abnormally: killed by it at their hard time limit, lost with a pool process that died under
them (the OOM killer), stopped by it when its broker connection broke (Celery's
worker_cancel_long_running_tasks_on_connection_loss: the message is redelivered), or ended
by run_task itself when its database connection was lost (the message is sent again). It
also says which of the asked tasks its pool processes are running now. The reaper asks the
nodes of the attempts it closes, and a claim the node of an attempt whose message came back
while it was recorded running, in one remote-control round trip (PROCESS_COMMAND): so a
restarted worker or a dead pool process (lost) is told from a hard time-out, and a try
stopped for a broken broker connection or a lost database connection, or still running, from
a lost worker. The dispatch sweeper asks all live workers which messages they hold
(HELD_COMMAND): a message waiting out its countdown in a worker that was killed is re-sent,
not left to the broker's visibility timeout.

Imported by the worker (config/celery.py, worker_init) before its pool starts, which
registers the command; nothing here needs Django.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import redis
from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import WorkerLostError
from celery.worker import state as worker_state
from celery.worker.control import inspect_command
from celery.worker.request import Request
from kombu.exceptions import OperationalError as KombuOperationalError

logger = logging.getLogger(__name__)

PROCESS_COMMAND = "agentledger_process"
HELD_COMMAND = "agentledger_held"
HARD_TIMEOUT = "hard_timeout"
POOL_PROCESS_LOST = "pool_process_lost"
BROKER_CONNECTION_LOST = "broker_connection_lost"
DATABASE_CONNECTION_LOST = "database_connection_lost"
DATABASE_ERROR = "database_error"
# Abnormal endings the main process remembers, the oldest forgotten first. The reaper asks
# once the attempt is past its hard limit plus REAPER_GRACE_SECONDS (a redelivered message's
# claim, at once); only hard time-outs, dead pool processes, tries stopped for a lost broker
# connection and deliveries that lost their database connection are kept, so a worker rarely
# has this many in that time, and for one forgotten the reaper falls back to its rule for a
# worker that cannot say.
ENDINGS_KEPT = 1000


@dataclass(frozen=True)
class WorkerProcess:
    """The process an attempt runs in."""

    pid: int  # the worker's main process
    started_at: dt.datetime  # when it started: a restarted worker keeps its name, often its pid
    pool_pid: int  # the pool process running the attempt (the main one in a solo or threads pool)


def attempt_fields(process: WorkerProcess | None) -> dict[str, Any]:
    """The task_attempts columns that record `process` (all None when it is unknown)."""
    if process is None:
        return {"worker_pid": None, "worker_started_at": None, "pool_pid": None}
    return {"worker_pid": process.pid, "worker_started_at": process.started_at, "pool_pid": process.pool_pid}


@dataclass(frozen=True)
class Ending:
    """How a task's request ended in a worker's main process, when abnormally."""

    how: str  # HARD_TIMEOUT, POOL_PROCESS_LOST, BROKER_CONNECTION_LOST, DATABASE_CONNECTION_LOST or DATABASE_ERROR
    pool_pid: int | None
    detail: str
    error_class: str = ""  # of a DATABASE_ERROR


class DatabaseErrorMet(Exception):
    """What run_task's retry carries when the database answered a write with an error (a lock or
    statement timeout, a deadlock, a full disk), not for a lost connection: `error_class` and
    `error` (orchestration.db.database_error_described), of the attempt the delivery started.
    The worker's main process remembers it for the reaper and a redelivery's claim
    (RunTaskRequest.on_retry)."""

    def __init__(self, error_class: str, error: str) -> None:
        super().__init__(error_class, error)
        self.error_class, self.error = error_class, error

    def __str__(self) -> str:
        return self.error


class NoAttemptStarted(Exception):
    """What run_task's retry carries when its delivery started no attempt (its claim did not
    commit), whatever it met: the worker's main process remembers nothing of it. The attempt
    still running, if any, is another delivery's, and what this process remembers of that
    one, if it ran here (a dead pool process, a lost broker connection, a database error), is
    what ended it; the message sent again names it, or names none (RunTaskRequest.on_retry)."""


@dataclass(frozen=True)
class NodeReport:
    """A worker node's answer: its main process (pid and started_at are None when it did not
    say: a worker of an earlier release), how the tasks asked about ended, if abnormally, and
    which pool processes run them now (None when it did not say)."""

    pid: int | None
    started_at: dt.datetime | None
    ended: dict[str, Ending]
    running: dict[str, frozenset[int]] | None = None


_main: tuple[int, dt.datetime] | None = None
_endings: OrderedDict[str, Ending] = OrderedDict()
_endings_lock = threading.Lock()  # pool callbacks and the control command may run in different threads


def worker_started() -> None:
    """In the worker's main process, before its pool starts (worker_init): record which process
    this is. The pool processes it forks inherit it."""
    global _main
    _main = (os.getpid(), dt.datetime.now(dt.UTC))


def current_process() -> WorkerProcess | None:
    """The worker process this code runs in; None outside a worker (or in a pool process that
    was not forked from its worker, which then records no identity)."""
    if _main is None:
        return None
    return WorkerProcess(pid=_main[0], started_at=_main[1], pool_pid=os.getpid())


def _ending_record(task_id: str, ending: Ending) -> None:
    with _endings_lock:
        earlier = _endings.get(task_id)
        if (
            earlier is not None
            and earlier.how in (HARD_TIMEOUT, BROKER_CONNECTION_LOST)
            and earlier.pool_pid == ending.pool_pid
        ):
            return  # the process this worker killed is not also a process lost
        _endings[task_id] = ending
        _endings.move_to_end(task_id)
        while len(_endings) > ENDINGS_KEPT:
            _endings.popitem(last=False)


def process_exited(pid: int | None) -> bool:
    """Whether the process `pid` has exited: gone, or a zombie its parent has not reaped yet
    (which still answers kill(pid, 0)). Read from /proc where there is one."""
    if not pid:
        return False
    if os.path.isdir("/proc/self"):
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                # the state follows the command name, which is in parentheses and may hold any byte
                state = fh.read().rsplit(b")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        except (OSError, IndexError):
            return False
        return state in (b"Z", b"X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


class RunTaskRequest(Request):
    """run_task's request in the worker's main process, where Celery reports a hard time-out
    (the pool kills the process), a pool process that died mid-task (WorkerLostError), a
    task it stops because its broker connection broke and a delivery that sent its message
    again for a lost database connection (a retry): each is remembered for the reaper and the
    claim before Celery handles it as usual."""

    def cancel(self, pool: Any, signal: Any = None, emit_retry: bool = True) -> None:
        # Celery cancels a running acks_late task when the broker connection is lost (the
        # message, unacknowledged, is redelivered) and at a shutdown, which nobody will ask about.
        if self.time_start and not (worker_state.should_stop or worker_state.should_terminate):
            _ending_record(
                self.id,
                Ending(
                    how=BROKER_CONNECTION_LOST,
                    pool_pid=self.worker_pid,
                    detail="stopped when the worker's broker connection was lost",
                ),
            )
        super().cancel(pool, signal=signal, emit_retry=emit_retry)

    def on_timeout(self, soft: bool, timeout: float) -> None:
        # During a cold shutdown Celery times out the running tasks itself: not their limit.
        if not soft and not worker_state.should_terminate:
            # Called before the pool kills the process. A process that died under the task
            # (the OOM killer) shortly before its hard limit is reported here too when the
            # limit comes before the pool noticed the death (a loaded host): it is already gone.
            if process_exited(self.worker_pid):
                ending = Ending(
                    how=POOL_PROCESS_LOST,
                    pool_pid=self.worker_pid,
                    detail=f"the process had exited before its hard time limit ({timeout} s)",
                )
            else:
                ending = Ending(how=HARD_TIMEOUT, pool_pid=self.worker_pid, detail=f"hard time limit {timeout} s")
            _ending_record(self.id, ending)
        super().on_timeout(soft, timeout)

    def on_retry(self, exc_info: Any) -> None:
        # run_task retries only when its database connection was lost, or the database answered
        # a write with an error (DatabaseErrorMet): its message is sent again (with a countdown
        # that may outlast the outage), and until it comes back its attempt is recorded running
        # with nothing to say how it ended but this. A delivery whose claim did not commit
        # (NoAttemptStarted) left none: what is remembered of the running one stays.
        retry = getattr(exc_info, "exception", None)
        if isinstance(retry, ExceptionWithTraceback):  # as the solo and threads pools hand it over
            retry = retry.exc
        met = getattr(retry, "exc", None)
        if isinstance(met, NoAttemptStarted):
            super().on_retry(exc_info)
            return
        if isinstance(met, DatabaseErrorMet):
            ending = Ending(how=DATABASE_ERROR, pool_pid=self.worker_pid, detail=met.error, error_class=met.error_class)
        else:
            ending = Ending(
                how=DATABASE_CONNECTION_LOST,
                pool_pid=self.worker_pid,
                detail="lost its database connection; the message was sent again",
            )
        _ending_record(self.id, ending)
        super().on_retry(exc_info)

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> Any:
        exc = getattr(exc_info, "exception", None)
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        if isinstance(exc, WorkerLostError):
            _ending_record(self.id, Ending(how=POOL_PROCESS_LOST, pool_pid=self.worker_pid, detail=str(exc)))
        return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)


@inspect_command(name=PROCESS_COMMAND)
def _process_report(state: Any, task_ids: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
    """This worker's main process (pid, start time), how the given tasks ended here, if
    abnormally, and the pool processes that run them now."""
    asked = set(task_ids or [])
    with _endings_lock:
        ended = {task_id: _endings.get(task_id) for task_id in asked}
    running: dict[str, list[int]] = {}
    for request in list(worker_state.active_requests):
        if request.id in asked and request.worker_pid:
            running.setdefault(request.id, []).append(request.worker_pid)
    return {
        "pid": _main[0] if _main else None,
        "started_at": _main[1].isoformat() if _main else None,
        "ended": {
            task_id: {"how": e.how, "pool_pid": e.pool_pid, "detail": e.detail, "error_class": e.error_class}
            for task_id, e in ended.items()
            if e is not None
        },
        "running": running,
    }


@inspect_command(name=HELD_COMMAND)
def _held_report(state: Any, task_ids: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
    """Which of the given tasks' messages this worker holds unacknowledged: waiting for their
    countdown (its timer), reserved, or running."""
    asked = set(task_ids or [])
    held = {request.id for request in [*worker_state.reserved_requests, *worker_state.active_requests]}
    timer = getattr(getattr(state, "consumer", None), "timer", None)
    for waiting in list(getattr(getattr(timer, "schedule", None), "queue", None) or []):
        args = getattr(getattr(waiting, "entry", None), "args", None) or ()
        if args and isinstance(args[0], Request):
            held.add(args[0].id)
    return {"held": sorted(asked & held)}


# What a broadcast raises when the broker cannot be reached (refused, reset, timed out, paused).
BROKER_UNREACHABLE = (KombuOperationalError, redis.ConnectionError, redis.TimeoutError, OSError)


def workers_holding(task_ids: set[str], *, timeout: float = 1.0) -> set[str] | None:
    """Which of `task_ids` the live workers, all asked in one broadcast, hold unacknowledged.
    None when that cannot be told: the broker unreachable, or a worker that does not know the
    command (an earlier release, during a rolling deploy). A worker that does not answer within
    `timeout` holds nothing."""
    if not task_ids:
        return set()
    from config.celery import app

    try:
        replies = app.control.broadcast(
            HELD_COMMAND, arguments={"task_ids": sorted(task_ids)}, reply=True, timeout=timeout
        )
    except BROKER_UNREACHABLE as exc:
        logger.warning("%s broadcast failed (%s: %s)", HELD_COMMAND, type(exc).__name__, exc)
        return None
    except Exception:
        logger.warning("%s broadcast failed", HELD_COMMAND, exc_info=True)
        return None
    held: set[str] = set()
    for reply in replies or []:
        for body in reply.values():
            if not isinstance(body, dict) or not isinstance(body.get("held"), list):
                return None
            held.update(str(task_id) for task_id in body["held"])
    return held


def node_report(reply: Any) -> NodeReport:
    """A node's reply, read defensively: anything else (an error, as from a worker that does not
    know the command) is an answer without an identity."""
    unknown = NodeReport(pid=None, started_at=None, ended={})
    if not isinstance(reply, dict) or "error" in reply:
        return unknown
    try:
        pid = int(reply["pid"]) if reply.get("pid") is not None else None
        started_at = dt.datetime.fromisoformat(reply["started_at"]) if reply.get("started_at") else None
        ended = {
            str(task_id): Ending(
                how=str(e["how"]),
                pool_pid=int(e["pool_pid"]) if e.get("pool_pid") is not None else None,
                detail=str(e.get("detail") or ""),
                error_class=str(e.get("error_class") or ""),
            )
            for task_id, e in (reply.get("ended") or {}).items()
        }
        running = (
            {str(task_id): frozenset(int(p) for p in pids) for task_id, pids in reply["running"].items()}
            if isinstance(reply.get("running"), dict)
            else None
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        logger.warning("unreadable %s reply: %r", PROCESS_COMMAND, reply)
        return unknown
    if pid is None or started_at is None:
        return NodeReport(pid=None, started_at=None, ended=ended)
    return NodeReport(pid=pid, started_at=started_at, ended=ended, running=running)


def workers_ask(
    hostnames: set[str], task_ids: set[str], *, timeout: float = 1.0, limit: int | None = None
) -> dict[str, list[NodeReport]] | None:
    """Ask the named worker nodes, in one broadcast, which process each is, how the given
    tasks ended there and which of them run there now. Returns node name -> its answers (more
    than one if several processes run under one name); a node that did not answer within
    `timeout` is absent. None when the broker could not be reached: then no node's silence
    says anything about it. With `limit`, the wait ends at that many answers."""
    if not hostnames:
        return {}
    from config.celery import app

    try:
        replies = app.control.broadcast(
            PROCESS_COMMAND,
            arguments={"task_ids": sorted(task_ids)},
            destination=sorted(hostnames),
            reply=True,
            timeout=timeout,
            limit=limit,
        )
    except BROKER_UNREACHABLE as exc:
        logger.warning("%s broadcast failed (%s: %s)", PROCESS_COMMAND, type(exc).__name__, exc)
        return None
    except Exception:  # anything else: every node is as good as silent, as before
        logger.warning("%s broadcast failed", PROCESS_COMMAND, exc_info=True)
        return {}
    answers: dict[str, list[NodeReport]] = {}
    for reply in replies or []:
        for name, body in reply.items():
            answers.setdefault(name, []).append(node_report(body))
    return answers
