"""The soft time limit firing while the platform writes to the database on an agent's behalf,
during its run (the meter's UPDATE of a model's usage, a tool call's event), on a real worker
against a local OpenAI-compatible server.

Interrupted inside such a statement, psycopg left it in flight on the connection, which then
refused the attempt's record ("can't change 'autocommit' now: connection in transaction status
ACTIVE"): the attempt stayed running, without its spend, until the reaper took it for a hard
time-out."""

from __future__ import annotations

import threading
import time
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from orchestration.models import Agent, TaskAttempt, TaskExecution, Workflow
from orchestration.runtime import pricing
from orchestration.services.workflows import workflow_submit
from tests.engine import database_url, longer_hard_grace, wait_for
from tests.factories import AgentFactory
from tests.fakes.servers import OpenAIServer, Recorded

LLM_KEY = "sk-held-" + "k3y" * 8


class RowLockingOpenAIServer(OpenAIServer):
    """OpenAI's API, answering once another session has locked the running attempt's row (a
    cancel or the reaper holding it, a slow database), for `hold` seconds: the meter's UPDATE of
    the answer's usage waits on it while the task's soft limit fires."""

    def __init__(self, *, hold: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hold = hold
        self.released = threading.Event()

    def answer(self, request: Recorded) -> tuple[int, Any]:
        locker = psycopg.connect(database_url())
        locker.execute("SELECT 1 FROM task_attempts WHERE status = 'running' FOR UPDATE")

        def release() -> None:
            time.sleep(self.hold)
            locker.rollback()
            locker.close()
            self.released.set()

        threading.Thread(target=release, daemon=True).start()
        return super().answer(request)


@pytest.mark.django_db(transaction=True)
def test_a_soft_limit_during_the_meters_write_records_the_attempt_timed_out_with_its_spend(engine, settings):
    # The row is held past the soft limit (1 s) for 1.5 s after the request: with the suite's
    # one-second grace, a request that reached the server half a second late on a loaded machine
    # saw the hard limit kill the process before its record was written.
    with RowLockingOpenAIServer(api_key=LLM_KEY, hold=1.5) as openai:
        AgentFactory(
            id="metered",
            executor=Agent.Executor.LLM,
            entrypoint="",
            provider="openai",
            model="gpt-4o-mini",
            url=openai.base_url,
            api_key_env="HELD_TEST_LLM_API_KEY",
        )
        engine(
            env={
                "HELD_TEST_LLM_API_KEY": LLM_KEY,
                "AGENT_HTTP_ALLOW_PRIVATE": "true",
                "AGENT_API_KEY_HOSTS": openai.url,
                **longer_hard_grace(settings),
            }
        )
        workflow, _ = workflow_submit(
            spec={
                "name": "held",
                "tasks": [
                    {
                        "name": "ask",
                        "agent": "metered",
                        "input": {"prompt": "hi"},
                        "max_retries": 0,
                        "timeout_seconds": 1,
                    },
                ],
            }
        )
        wait_for(openai.released.is_set, timeout=20, what="the server to answer and release the row")
        attempt = wait_for(
            lambda: TaskAttempt.objects.filter(execution__workflow=workflow).exclude(status="running").first(),
            timeout=10,
            what="the attempt to be recorded",
        )
    assert len(openai.requests) == 1
    assert (attempt.status, attempt.cause) == ("timed_out", "soft_timeout")
    # The model answered (and billed) before the limit: its usage is the attempt's.
    cost = pricing.cost_usd("gpt-4o-mini", 1200, 350)
    assert (attempt.input_tokens, attempt.output_tokens, attempt.tokens_used) == (1200, 350, 1550)
    assert attempt.cost_usd == cost > Decimal(0)
    task = TaskExecution.objects.get(workflow=workflow)
    assert (task.status, task.tokens_used, task.cost_usd) == ("timed_out", 1550, cost)
    workflow = wait_for(lambda: (w := Workflow.objects.get(pk=workflow.pk)).is_terminal and w, timeout=10)
    assert (workflow.total_tokens_used, workflow.total_cost_usd, workflow.wasted_cost_usd) == (1550, cost, cost)


@pytest.mark.django_db(transaction=True)
def test_a_soft_limit_inside_an_agents_own_query_still_records_the_attempt(engine):
    # Not one of the platform's writes (nothing held it off): the statement is left in flight on
    # the connection, which is closed so that the attempt's record can be written.
    AgentFactory(id="slow-query", entrypoint="tests.orchestration.edge_agents.slow_query")
    engine()
    workflow, _ = workflow_submit(
        spec={
            "name": "querying",
            "tasks": [
                {"name": "q", "agent": "slow-query", "input": {"seconds": 4}, "max_retries": 1, "timeout_seconds": 1}
            ],
        }
    )
    workflow = wait_for(
        lambda: (w := Workflow.objects.get(pk=workflow.pk)).is_terminal and w, timeout=20, what="the workflow to end"
    )
    attempts = list(TaskAttempt.objects.filter(execution__workflow=workflow).order_by("attempt_number"))
    assert [(a.status, a.cause) for a in attempts] == [("timed_out", "soft_timeout")] * 2
    assert workflow.status == "failed"
