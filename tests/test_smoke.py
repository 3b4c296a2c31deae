from django.db import connection

from tests.factories import TaskAttemptFactory


def test_suite_runs_on_postgresql(db):
    assert connection.vendor == "postgresql"


def test_factories_build_a_full_task_attempt(db):
    attempt = TaskAttemptFactory(succeeded=True)
    assert attempt.execution.workflow.owner is not None
