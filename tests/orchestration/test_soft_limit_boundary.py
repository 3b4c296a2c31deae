"""The soft time limit firing after the agent has returned, before `released()` has ended.

In a prefork pool child the limit is let through only around the agent (orchestration.
soft_limit). Python runs a signal handler at its next check point, and between the agent's
return and `released()` setting `_released = False` there are several (the call of the context
manager's __exit__, the resumption of its generator): a limit that fires there raises
SoftTimeLimitExceeded out of the `with`, after the agent's result was in hand. Here billiard's
handler is installed on SIGUSR1 as in a pool child, and the signal is sent at that point."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal

import pytest
from billiard.pool import soft_timeout_sighandler

from orchestration.errors import RetryableError
from orchestration.models import TaskAttempt, TaskExecution
from orchestration.runtime.context import AgentResult, Usage
from orchestration.services import execution
from orchestration.services.execution import Outcome, attempt_run
from orchestration.soft_limit import SoftLimit
from tests.orchestration.test_engine import submit, task


@pytest.fixture
def pool_child() -> Iterator[None]:
    previous = signal.signal(signal.SIGUSR1, soft_timeout_sighandler)
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.parametrize("ends", ["returns", "raises"])
def test_a_limit_that_fires_as_the_agent_ends_keeps_its_outcome_and_its_spend(committed, pool_child, monkeypatch, ends):
    """Before the fix the finished agent's outcome was dropped: a result was thrown away and the
    try recorded timed_out (soft_timeout) and retried, and an error was recorded as a soft
    time-out instead of itself; and as the handler's exception carries no usage, the failure's
    record set the attempt's usage to 0 over the 1500 tokens / $0.25 metered while it ran (the
    provider's charge vanished from the attempt, its task and its workflow)."""

    def agent(*, agent, task_input, context):
        context.paid(Usage(1000, 500, Decimal("0.25")))  # metered on the attempt's row when paid
        if ends == "raises":
            error = RetryableError("provider answered 503")
            error.usage = Usage(1000, 500, Decimal("0.25"))  # as the llm executor attaches it
            raise error
        return AgentResult(output={"answer": 42}, usage=Usage(1000, 500, Decimal("0.25")))

    monkeypatch.setattr(execution, "agent_execute", agent)
    released = SoftLimit.released

    @contextmanager
    def late(self: SoftLimit) -> Iterator[None]:
        with released(self):
            try:
                yield
            finally:
                os.kill(os.getpid(), signal.SIGUSR1)  # the agent has ended; released() has not

    monkeypatch.setattr(SoftLimit, "released", late)
    wf = submit({"name": "a", "agent": "echo", "input": {"x": 1}, "max_retries": 2})
    a = task(wf, "a")

    outcome = attempt_run(execution_id=a.pk, celery_task_id=a.celery_task_id, worker="w@h")

    tries = list(
        TaskAttempt.objects.filter(execution_id=a.pk).values_list("status", "cause", "error", "tokens_used", "cost_usd")
    )
    a.refresh_from_db()
    # Before the fix, both: failed, [(timed_out, soft_timeout, "soft time limit of 300 s exceeded", 0, 0)]
    if ends == "returns":
        assert outcome == Outcome.SUCCEEDED, tries
        assert tries == [(TaskAttempt.Status.SUCCEEDED, None, None, 1500, Decimal("0.25"))]
        assert (a.status, a.output_data, a.tokens_used) == (TaskExecution.Status.COMPLETED, {"answer": 42}, 1500)
    else:
        assert outcome == Outcome.FAILED, tries
        assert tries == [
            (TaskAttempt.Status.FAILED, "error", "RetryableError: provider answered 503", 1500, Decimal("0.25"))
        ]
        assert (a.status, a.tokens_used) == (TaskExecution.Status.RETRYING, 1500)
    assert signal.getsignal(signal.SIGUSR1) is soft_timeout_sighandler
