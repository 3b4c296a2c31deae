"""Built-in agents for operations and tests; they need no network and no model.

Defined in agents/definitions/ and loaded with `manage.py load_agents`.
"""

from __future__ import annotations

import time
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from orchestration.errors import PermanentError, RetryableError
from orchestration.runtime.context import TaskContext


def echo(task_input: dict[str, Any], context: TaskContext) -> dict[str, Any]:
    """Return the input, and the upstream outputs it was given. In a conversation, the turn's
    input without the thread's history the runtime adds to it (`messages`): that history holds
    echo's earlier replies, so each reply echoing it held them all, escaped again, and the
    thread grew about threefold a turn (megabytes by the twelfth)."""
    if context.conversation is not None:
        task_input = {key: value for key, value in task_input.items() if key != "messages"}
    result: dict[str, Any] = {"echo": task_input}
    if context.upstream:
        result["upstream"] = context.upstream
    return result


def sleep(task_input: dict[str, Any], context: TaskContext) -> dict[str, Any]:
    """Sleep `input.seconds`. With `input.on_attempts` (a list of attempt numbers) it sleeps
    only on those attempts; with `input.ignore_soft_timeout` it keeps sleeping through the
    soft time limit, so only the hard limit stops it (for timeout tests)."""
    seconds = task_input.get("seconds", 1)
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
        raise PermanentError(f"input.seconds must be a non-negative number, got {seconds!r}")
    on_attempts = task_input.get("on_attempts")
    if on_attempts is not None and context.attempt_number not in on_attempts:
        seconds = 0
    started = time.monotonic()
    while (remaining := seconds - (time.monotonic() - started)) > 0:
        try:
            time.sleep(remaining)
        except SoftTimeLimitExceeded:
            if not task_input.get("ignore_soft_timeout"):
                raise
    return {"slept_seconds": round(time.monotonic() - started, 3), "attempt": context.attempt_number}


def flaky(task_input: dict[str, Any], context: TaskContext) -> dict[str, Any]:
    """Fail (retryably) on the first `input.fail_times` attempts, then succeed."""
    fail_times = task_input.get("fail_times", 1)
    if isinstance(fail_times, bool) or not isinstance(fail_times, int) or fail_times < 0:
        raise PermanentError(f"input.fail_times must be a non-negative integer, got {fail_times!r}")
    if context.attempt_number <= fail_times:
        raise RetryableError(f"flaky: planned failure {context.attempt_number} of {fail_times}")
    return {"succeeded_on_attempt": context.attempt_number}


def fail(task_input: dict[str, Any], context: TaskContext) -> dict[str, Any]:
    """Always fail; `input.retryable` (default false) chooses the error class."""
    message = str(task_input.get("message", "fail: planned failure"))
    if task_input.get("retryable", False):
        raise RetryableError(message)
    raise PermanentError(message)
