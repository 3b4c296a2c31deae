"""Database helpers shared by the services."""

from __future__ import annotations

import datetime as dt
import functools
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from billiard import common as billiard_common
from django.conf import settings
from django.db import DatabaseError, DataError, IntegrityError, OperationalError

from orchestration.errors import ERROR_CLASS_MAX_LENGTH, error_class_name

logger = logging.getLogger(__name__)

# A prepare_threshold no statement reaches: psycopg prepares only what is asked for.
UNREACHABLE_THRESHOLD = 2**31

RETRY_BACKOFF_FIRST_SECONDS = 0.01
RETRY_BACKOFF_MAX_SECONDS = 0.5


def database_now() -> dt.datetime:
    """The database's clock right now (not the transaction's start): the one clock every web
    and worker host shares (their own may be off it, and off each other's)."""
    from django.db import connection

    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SELECT clock_timestamp()")
            return cursor.fetchone()[0]
        cursor.execute("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")
        return dt.datetime.fromisoformat(cursor.fetchone()[0]).replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class DatabaseClock:
    """The database's clock as a statement the caller ran anyway read it (`at`), carried on
    this host's monotonic clock: `now()` is the database's time later on, without another
    round trip, whatever this host's wall clock says. A worker reads it in its claim and
    stamps the attempt's outcome, its task's retry and its dependents' queueing with it."""

    at: dt.datetime
    read: float = field(default_factory=time.monotonic)

    def now(self) -> dt.datetime:
        return self.at + dt.timedelta(seconds=time.monotonic() - self.read)


def atomic_with_retry(fn: Any, *, attempts: int = 8) -> Any:
    """Run fn() in a transaction, retrying when PostgreSQL aborts it as a deadlock victim or a
    serialization failure (both are safe to retry: nothing of the aborted try was kept).

    The budget is generous, with jittered exponential backoff (under 2 s in all):
    an error that escapes a task's completion makes the worker treat it as a lost connection,
    so the attempt is recorded lost and the agent runs again, which costs far more than
    waiting for the other transaction.

    An error its COMMIT raised carries, as `commit_callbacks`, the functions the transaction
    had registered to run after it (transaction.on_commit): a COMMIT whose answer was lost may
    have landed, and the caller that finds it did (_result_record_through_lost_connection) runs
    them, as Django, seeing an error, does not."""
    import random
    import time

    from django.db import Error, NotSupportedError, OperationalError, connection, transaction

    outermost = not connection.in_atomic_block
    for attempt in range(1, attempts + 1):
        callbacks = None
        try:
            try:
                with transaction.atomic():
                    value = fn()
                    if outermost:
                        callbacks = [func for _, func, *_ in connection.run_on_commit]
                return value
            except Error as exc:
                if callbacks is not None:  # fn() returned: its COMMIT raised
                    exc.commit_callbacks = callbacks
                raise
        except NotSupportedError as exc:
            # A prepared statement refused after a migration (plan_changed): its connection is
            # closed; the transaction runs again on a new one, unless an outer one is open.
            if not outermost or attempt == attempts or not plan_changed(exc):
                raise
            connection.close()
        except OperationalError as exc:
            sqlstate = getattr(exc.__cause__, "sqlstate", None)
            if sqlstate not in ("40P01", "40001") or attempt == attempts:
                raise
            backoff = min(RETRY_BACKOFF_FIRST_SECONDS * 2 ** (attempt - 1), RETRY_BACKOFF_MAX_SECONDS)
            time.sleep(backoff * random.uniform(0.5, 1.5))  # noqa: S311 - jitter, not a secret
    raise AssertionError("unreachable")


def plan_changed(exc: BaseException) -> bool:
    """Whether `exc` (Django's error or psycopg's) is PostgreSQL refusing a prepared statement
    because a migration changed the shape of the rows it returns ("cached plan must not change
    result type"). prepared_cursor has then closed the connection; the statement can run again
    on a new one, which prepares it afresh."""
    cause = exc if isinstance(exc, psycopg.Error) else exc.__cause__
    return (
        isinstance(cause, psycopg.errors.FeatureNotSupported) and cause.diag.source_function == "RevalidateCachedQuery"
    )


# What PostgreSQL says as it goes away or before it is back: shutting down (admin, crash), not
# yet accepting connections (starting, recovering), no connection slot left. psycopg's own
# connection errors (refused, closed under a statement) have no SQLSTATE; class 08 is a
# connection exception. psycopg's InterfaceError is not one: it is raised for a misuse (a
# closed cursor, a result that is not there), a fault of the code, not of the database.
_UNREACHABLE_SQLSTATES = ("57P01", "57P02", "57P03", "53300")


def database_unreachable(exc: BaseException) -> bool:
    """`exc` (Django's error) says the database connection could not be made, or was lost:
    PostgreSQL down, restarting or failing over (or out of connection slots); not a fault of
    the statement, nor of whoever asked for it."""
    if not isinstance(exc, OperationalError):
        return False
    cause = exc.__cause__
    if not isinstance(cause, psycopg.OperationalError):
        return False
    sqlstate = cause.sqlstate
    return sqlstate is None or sqlstate.startswith("08") or sqlstate in _UNREACHABLE_SQLSTATES


def database_error_permanent(exc: BaseException) -> bool:
    """Whether the database refused a write for what it holds, and would refuse it the same way
    every time: a value it cannot store (DataError), a broken constraint (IntegrityError), or a
    limit of PostgreSQL's (SQLSTATE class 54: a jsonb over 256 MiB, an index row too large).
    Trying again only spends retries, and re-runs the agent each time."""
    if isinstance(exc, DataError | IntegrityError):
        return True
    sqlstate = getattr(exc.__cause__, "sqlstate", None)
    return isinstance(exc, OperationalError) and isinstance(sqlstate, str) and sqlstate.startswith("54")


ERROR_DESCRIBED_MAX_LENGTH = 2000


def database_error_described(exc: BaseException) -> dict[str, str]:
    """The class and message of a database error (Django's, or psycopg's) as an attempt records
    them, JSON-safe: psycopg's own class, which names the condition (LockNotAvailable,
    QueryCanceled, DeadlockDetected, SerializationFailure, DiskFull), not Django's wrapper."""
    shown = exc.__cause__ if isinstance(exc.__cause__, psycopg.Error) else exc
    message = " ".join(str(shown).split())[:ERROR_DESCRIBED_MAX_LENGTH]
    return {"error_class": error_class_name(shown), "error": f"{type(shown).__name__}: {message}"}


SENT_AGAIN_CAUSES = ("connection_lost", "database_error")


def sent_again_record(
    exc: BaseException, *, attempt_number: int | None, carried: dict[str, Any] | None
) -> dict[str, Any]:
    """What a delivery's message sent again carries (run_task, in a message header): what ended the
    attempt the delivery leaves running, for the next delivery's claim to record. `cause`
    connection_lost (the connection lost or unreachable) or database_error (the database
    answered a write with `exc`: its class and message), and `attempt_number`, the attempt it
    concerns.

    A delivery that started no attempt (`attempt_number` None: its claim did not commit) closed
    none either: the record it received (`carried`), of the attempt an earlier delivery left
    running, is sent on as it was, so that attempt keeps its own cause; without one, the record
    names no attempt."""
    if attempt_number is None and carried is not None:
        return carried
    if isinstance(exc, OperationalError) and not database_unreachable(exc):
        return {"cause": "database_error", **database_error_described(exc), "attempt_number": attempt_number}
    return {"cause": "connection_lost", "attempt_number": attempt_number}


# The longest error text a record of sent_again_record holds: database_error_described's
# message, after its class's name.
SENT_AGAIN_ERROR_MAX_LENGTH = ERROR_DESCRIBED_MAX_LENGTH + ERROR_CLASS_MAX_LENGTH + 2


def _recordable(text: Any, max_length: int) -> bool:
    return isinstance(text, str) and 0 < len(text) <= max_length and "\x00" not in text


def sent_again_read(record: Any) -> dict[str, Any] | None:
    """A record of sent_again_record read from a message (its header, or the `database_error`
    keyword argument of messages sent by the release before the header, which has no cause):
    its known keys only. None for anything else (a message sent again by an earlier release
    carries none), and for a record run_task never writes (a tampered message, another shape),
    which the claim must not write into an attempt: a cause it does not know, an attempt number
    that is not a positive integer, an error class or message that is not text, is longer than
    an attempt records or holds a NUL (PostgreSQL refuses it)."""
    if not isinstance(record, dict):
        return None
    cause = record.get("cause", "database_error")
    number = record.get("attempt_number")
    if cause not in SENT_AGAIN_CAUSES or not (number is None or (type(number) is int and number > 0)):
        return None
    if cause == "connection_lost":
        return {"cause": cause, "attempt_number": number}
    error_class, error = record.get("error_class"), record.get("error")
    if not (_recordable(error_class, ERROR_CLASS_MAX_LENGTH) and _recordable(error, SENT_AGAIN_ERROR_MAX_LENGTH)):
        return None
    return {"cause": cause, "error_class": error_class, "error": error, "attempt_number": number}


def stop_if_interrupted(exc: BaseException) -> None:
    """Raise again the SystemExit or KeyboardInterrupt that `exc`, a database error, replaced.

    Django's atomic() restores autocommit in a `finally`: a SystemExit raised during its COMMIT
    (billiard's SIGTERM handler, in a pool process a cancel terminates) leaves the connection
    busy, and is replaced there by a DatabaseError ("can't change 'autocommit' now"). Code
    that carries on after a database error must not carry on after that one: its process was
    told to stop.

    Only a database error stands for a stop, and only a SystemExit or KeyboardInterrupt that
    stops the process (`stopping`) is one: other failures have BaseExceptions in their context
    that stop nothing (asyncio.wait_for's TimeoutError, raised while its CancelledError is
    handled; a tool's ValueError raised on catching argparse's SystemExit), and must not end
    the agent, or its process. Nor must a database error met while an agent's own sys.exit()
    is handled (its failure being recorded), which has that SystemExit in its context."""
    if not isinstance(exc, DatabaseError):
        return
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, SystemExit | KeyboardInterrupt) and stopping(current):
            raise type(current)(*current.args) from exc
        seen.add(id(current))
        current = current.__context__


def stopping(exc: SystemExit | KeyboardInterrupt) -> bool:
    """Whether `exc` stops this process: a KeyboardInterrupt; Celery's WorkerShutdown or
    WorkerTerminate; a SystemExit raised once billiard's terminate-signal handler has fired (its
    own, which a cancel's SIGTERM raises in a pool process). Not a plain SystemExit before that:
    an agent's own sys.exit() (a command-line library's), its failure. A billiard without the
    flag cannot tell: every SystemExit stops the process."""
    if isinstance(exc, KeyboardInterrupt) or type(exc) is not SystemExit:
        return True
    fired = getattr(billiard_common, "terminate_handler_fired", None)
    return fired is None or fired()


def terminate_handler_fired() -> bool:
    """Whether billiard's terminate-signal handler has fired in this process (False for a
    billiard that does not tell, and where it is not the handler: the solo and threads pools)."""
    fired = getattr(billiard_common, "terminate_handler_fired", None)
    return fired is not None and fired()


def agent_stopping(exc: BaseException) -> bool:
    """Whether `exc`, raised out of an agent's code (or a hand-off's), means this process was told
    to stop: as process_stopping, but a database error with a KeyboardInterrupt in its context is
    the agent's failure. A pool process ignores SIGINT, so that interrupt was the agent's own
    code's (caught, and a query of its own failed while it was handled); a stop that an agent's
    query error replaced is a terminate signal's, whose handler has fired."""
    if terminate_handler_fired():
        return True
    return isinstance(exc, SystemExit | KeyboardInterrupt) and stopping(exc)


def process_stopping(exc: BaseException) -> bool:
    """Whether `exc`, met while work runs, means this process was told to stop: a stop
    (`stopping`), such a stop replaced by a database error on its way (`stop_if_interrupted`),
    or anything once billiard's terminate-signal handler has fired (its SystemExit may have been
    replaced by a `finally` that raised). An agent's error: `agent_stopping`."""
    if agent_stopping(exc):
        return True
    try:
        stop_if_interrupted(exc)
    except (SystemExit, KeyboardInterrupt):
        return True
    return False


def stop_raised(exc: BaseException) -> None:
    """Raise the stop that `exc` stands for, if it does (`process_stopping`): `exc` itself, the
    SystemExit or KeyboardInterrupt a database error replaced, or a SystemExit for whatever was
    met once billiard's terminate-signal handler had fired. Code that carries on after an error
    calls this first: it must not carry on after a stop."""
    if not process_stopping(exc):
        return
    if isinstance(exc, SystemExit | KeyboardInterrupt):
        raise exc
    stop_if_interrupted(exc)
    raise SystemExit(f"stopped by a terminate signal ({type(exc).__name__}: {exc})") from exc


# How long each statement of a stopping process's last write may wait for a lock or run.
STOPPING_WRITE_TIMEOUT_MS = 2000


def stopping_write(what: str, write: Any) -> None:
    """Run `write()`, the last write of a process told to stop (what it was doing, recorded
    interrupted), in a transaction of its own whose statements each wait at most
    STOPPING_WRITE_TIMEOUT_MS (for a lock, or to run): a row another transaction holds must not
    hold the stop up. A write that fails (on the connection the stop left busy, a lock held too
    long) is logged, not raised: it must not replace the stop under way. `what` names it there."""
    from django.db import connection, transaction

    try:
        with transaction.atomic():
            if connection.vendor == "postgresql":
                with connection.cursor() as cursor:
                    cursor.execute(
                        "SELECT set_config('lock_timeout', %s, true), set_config('statement_timeout', %s, true)",
                        [f"{STOPPING_WRITE_TIMEOUT_MS}ms"] * 2,
                    )
            write()
    except Exception as exc:
        logger.warning("%s not recorded as the process stops: %s: %s", what, type(exc).__name__, exc)


def atomic_retried(fn: Any) -> Any:
    """Decorator: `fn` runs through atomic_with_retry. For operations that lock a workflow
    before its tasks and their attempts (cancel, retry, resume), the reverse of the workers'
    order (attempt, task, workflow): PostgreSQL may pick them as a deadlock victim, and they
    re-read everything under their locks, so running them again is safe."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return atomic_with_retry(lambda: fn(*args, **kwargs))

    return wrapper


def timestamptz_fast_loader(cursor: Any, connection: Any) -> None:
    """Parse timestamptz values read by `cursor` (a psycopg cursor of the Django connection
    `connection`) with psycopg's C loader instead of Django's Python subclass of the pure-Python
    one: 0.09 instead of 0.9 ms for a page of 51 rows with three timestamps each.

    Both give the same aware datetimes in UTC when Django's time zone and the session's are
    UTC (Django sets the session's, TIME_ZONE = "UTC"); in any other case nothing changes."""
    if connection.vendor != "postgresql" or connection.timezone != dt.UTC:
        return
    if connection.connection.info.parameter_status("TimeZone") != "UTC":
        return
    oid = psycopg.adapters.types["timestamptz"].oid
    cursor.adapters.register_loader(oid, psycopg.adapters.get_loader(oid, psycopg.pq.Format.TEXT))


class _LoggedCursor(psycopg.Cursor):
    """A prepared_cursor that records its statements in Django's query log, as Django's
    debug cursor does (DEBUG, or a test's CaptureQueriesContext)."""

    django_connection: Any = None

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        started = time.monotonic()
        try:
            return super().execute(query, params, **kwargs)
        finally:
            duration = time.monotonic() - started
            self.django_connection.queries_log.append({"sql": str(query), "time": f"{duration:.3f}"})


@contextmanager
def prepared_cursor(connection: Any) -> Iterator[psycopg.Cursor]:
    """A psycopg cursor on the Django PostgreSQL connection `connection` whose statements
    run as server-side prepared statements when asked (`execute(sql, params, prepare=True)`),
    inside whatever transaction Django has open there, with Django's exceptions.

    Django's connection makes client-side cursors (ClientCursor), which interpolate the
    parameters and never prepare, and sets psycopg's prepare_threshold to None, which turns
    off even explicit preparation: this cursor binds on the server, and a threshold no
    statement reaches prepares only what is asked for (ORM queries stay unprepared). The
    statements reach Django's query log when it is kept (DEBUG, CaptureQueriesContext), not
    django-prometheus' database metrics. No health check: a caller that starts a request's
    work calls `connection.close_if_health_check_failed()` first, as Django's cursors do.
    With DATABASE_PREPARED_STATEMENTS off, the threshold stays None and nothing is prepared."""
    connection.ensure_connection()
    raw = connection.connection
    if raw.prepare_threshold is None and settings.DATABASE_PREPARED_STATEMENTS:
        raw.prepare_threshold = UNREACHABLE_THRESHOLD
    with connection.wrap_database_errors:
        try:
            if connection.queries_logged:
                with _LoggedCursor(raw) as cursor:
                    cursor.django_connection = connection
                    yield cursor
            else:
                with psycopg.Cursor(raw) as cursor:
                    yield cursor
        except psycopg.errors.FeatureNotSupported as exc:
            # "cached plan must not change result type": another session changed the type of
            # a column the statement returns (a migration). psycopg keeps the statement and
            # the connection stays usable, so it would fail the same way until it expires:
            # close it, and Django replaces it as a failed connection (a pool discards it).
            # The worker's statements run again at once (execute_prepared, atomic_with_retry).
            if plan_changed(exc):
                raw.close()
            raise


def lock_timeout_operation(seconds: int | None, *, backwards: int | None = None) -> Any:
    """A migration operation (RunPython) setting, on PostgreSQL, how long each later statement
    of the migration's session waits for a table lock (None: back to the server's default);
    `backwards`: the setting when the migration is reversed, whose operations run in the
    opposite order (the closing reset then opens with the timeout, the opening one resets).

    For a migration that is not atomic and takes a table's ACCESS EXCLUSIVE lock for a moment
    (ALTER ... SET DEFAULT): each statement then locks its own table only, and one that finds
    the table held (an export reading it for an hour) fails after `seconds`, naming the lock,
    instead of queueing every other reader and writer of the table behind it meanwhile. The
    migration is run again at a quieter moment; the statements already done are harmless to
    repeat."""
    from django.db import migrations

    def setting(value: int | None) -> Any:
        def apply(apps: Any, schema_editor: Any) -> None:
            if schema_editor.connection.vendor == "postgresql":
                schema_editor.execute("RESET lock_timeout" if value is None else f"SET lock_timeout = '{int(value)}s'")

        return apply

    return migrations.RunPython(setting(seconds), setting(backwards), elidable=True)
