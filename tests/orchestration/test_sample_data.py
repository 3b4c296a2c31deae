"""load_sample_data: one recorded workflow whose times read in order, as the engine writes them."""

from __future__ import annotations

import io

from django.core.management import call_command

from orchestration.models import Event, TaskAttempt, TaskExecution, Workflow
from orchestration.services.sample_data import SAMPLE_WORKFLOW_ID


def test_the_sample_workflow_is_created_before_it_starts_and_ends(db):
    """Its rows were backdated ten minutes but created at the INSERT's time: the console and
    the JSONL export showed a workflow created after it completed, and an export of its day
    held rows created the next day."""
    call_command("load_sample_data", stdout=io.StringIO())
    workflow = Workflow.objects.get(pk=SAMPLE_WORKFLOW_ID)
    assert workflow.created_at <= workflow.started_at <= workflow.completed_at
    created_event = Event.objects.get(workflow_id=SAMPLE_WORKFLOW_ID, event_type="workflow_created")
    assert workflow.created_at == created_event.created_at
    tasks = TaskExecution.objects.filter(workflow=workflow)
    assert tasks.count() == 2
    for task in tasks:
        assert workflow.created_at <= task.created_at <= task.queued_at <= task.started_at <= task.completed_at
    attempts = TaskAttempt.objects.filter(execution__workflow=workflow)
    assert attempts.count() == 3
    for attempt in attempts:
        assert attempt.execution.queued_at <= attempt.created_at <= attempt.started_at <= attempt.finished_at
