"""A hand-off (one agent running another inside its attempt) whose process is told to stop while
the other agent works: a cancel's SIGTERM in a pool process. Its agent_interactions row says it
was interrupted, and writing it never holds up, nor replaces, the stop."""

from __future__ import annotations

import os
import signal
import threading
import time

import psycopg
import pytest

from orchestration.event_types import EventType, Severity
from orchestration.models import AgentInteraction, Event, TaskAttempt
from orchestration.runtime.collaboration import INTERRUPTED
from orchestration.services.execution import attempt_run
from orchestration.services.workflows import workflow_cancel
from tests.engine import database_url, wait_for
from tests.orchestration.edge_agents import edge_agent
from tests.orchestration.test_engine import submit, task
from tests.orchestration.test_runtime_edges import _billiard_terminate_handler


def _hand_off_to_a_held_agent(tmp_path):
    """A workflow whose one task hands off to an agent that waits for a file never written."""
    edge_agent("hands-off", "hands_off")
    edge_agent("holds", "held")
    return submit({"name": "h", "agent": "hands-off", "input": {"to": "holds", "release": str(tmp_path / "never")}})


def _held_agent_started() -> bool:
    return Event.objects.filter(event_type=EventType.AGENT_STARTED, entity_id="holds").exists()


@pytest.mark.django_db(transaction=True)
def test_a_handoff_cut_short_by_a_cancel_is_recorded_interrupted_real_worker(engine, tmp_path):
    """The cancel's SIGTERM raised billiard's SystemExit in the agent handed the work. The
    hand-off's `finally` recorded it with neither an output nor an error: an info event, a hand-off
    that looked done."""
    worker = engine(concurrency=1)
    workflow = _hand_off_to_a_held_agent(tmp_path)
    wait_for(_held_agent_started, timeout=30, what=f"the hand-off ({worker.log_path})")
    workflow_cancel(workflow_id=workflow.pk)
    interaction = wait_for(
        lambda: AgentInteraction.objects.filter(workflow_id=workflow.pk).first(),
        timeout=30,
        what=f"the hand-off's record ({worker.log_path})",
    )
    assert interaction.payload["error"] == INTERRUPTED and "output" not in interaction.payload
    event = Event.objects.get(event_type=EventType.AGENT_INTERACTION, workflow_id=workflow.pk)
    assert (event.severity, event.payload["error"]) == (Severity.WARNING, INTERRUPTED)
    assert TaskAttempt.objects.get(execution__workflow=workflow).status == TaskAttempt.Status.CANCELLED


def test_a_stopped_handoffs_record_does_not_hold_up_the_stop_behind_a_lock(committed, tmp_path, caplog):
    """The stop's SystemExit unwound through the hand-off's `finally`, whose INSERT waits for the
    workflow row (its foreign key) that another transaction holds FOR UPDATE: the stopping
    process waited for as long as that transaction lasted (no statement timeout), its stop held up.
    It waits a moment (STOPPING_WRITE_TIMEOUT_MS) and stops, the record logged as not written."""
    workflow = _hand_off_to_a_held_agent(tmp_path)
    handing = task(workflow, "h")
    with psycopg.connect(database_url()) as other:

        def lock_then_stop() -> None:
            wait_for(_held_agent_started, timeout=30, what="the hand-off")
            other.execute("SELECT 1 FROM workflows WHERE workflow_id = %s FOR UPDATE", [workflow.pk])
            os.kill(os.getpid(), signal.SIGTERM)  # the cancel's

        stopper = threading.Thread(target=lock_then_stop)
        release = threading.Timer(20, other.rollback)  # the other transaction ends, at last
        with _billiard_terminate_handler(close=False):
            stopper.start()
            release.start()
            started = time.monotonic()
            try:
                with pytest.raises(SystemExit):
                    attempt_run(execution_id=handing.pk, celery_task_id=handing.celery_task_id, worker="w@h")
            finally:
                stopped_after = time.monotonic() - started
                stopper.join()
                release.cancel()
    assert stopped_after < 10, f"the stop waited {stopped_after:.1f} s for the lock"
    assert "not recorded as the process stops" in caplog.text
    assert not AgentInteraction.objects.filter(workflow_id=workflow.pk).exists()


def test_a_handoff_whose_agent_fails_in_a_query_on_catching_its_own_interrupt_records_that_error(committed):
    """A pool process ignores SIGINT: a KeyboardInterrupt there is the agent's own code's. The
    other agent caught one and failed in a query of its own while handling it; its database
    error, that interrupt in its context, was taken for a stop: the hand-off was recorded
    interrupted, not failed with the other agent's error."""
    edge_agent("hands-off", "hands_off")
    edge_agent("interrupted", "interrupt_then_query_fails")
    workflow = submit({"name": "h", "agent": "hands-off", "input": {"to": "interrupted"}})
    handing = task(workflow, "h")
    attempt_run(execution_id=handing.pk, celery_task_id=handing.celery_task_id, worker="w@h")
    interaction = AgentInteraction.objects.get(workflow_id=workflow.pk)
    assert interaction.payload["error"].startswith("DataError: division by zero"), interaction.payload
    assert TaskAttempt.objects.get(execution__workflow=workflow).status == TaskAttempt.Status.FAILED
