"""A cause for an attempt its worker left running when a write of the platform's failed in the
database for another reason than a lost connection (a lock or statement timeout, a deadlock that
outlasted its retries, a full disk): `database_error`, no longer `connection_lost`. The check
moves to the domain's new condition (orchestration.models.base.DomainCheck): no table rewrite;
the added check reads the column once."""

from django.db import migrations, models

import orchestration.models.base
from orchestration.migrations._reverse_guard import refuse_reverse_while


class Migration(migrations.Migration):
    dependencies = [
        ("orchestration", "0034_updated_at_database_clock"),
    ]

    operations = [
        migrations.RemoveConstraint(
            model_name="taskattempt",
            name="task_attempts_cause_valid",
        ),
        migrations.AlterField(
            model_name="taskattempt",
            name="cause",
            field=models.CharField(
                blank=True,
                choices=[
                    ("error", "the agent raised an error"),
                    ("soft_timeout", "soft time limit exceeded"),
                    ("hard_timeout", "hard time limit exceeded (child killed)"),
                    ("queue_timeout", "waited in the queue too long"),
                    ("deadline", "the workflow deadline passed"),
                    ("worker_lost", "the worker died or vanished mid-attempt"),
                    ("connection_lost", "the worker lost its database connection mid-attempt"),
                    ("database_error", "the database refused a write of the worker's (not a lost connection)"),
                    ("redelivery", "the broker redelivered the message"),
                    ("cancelled", "cancelled by a user"),
                ],
                max_length=20,
                null=True,
            ),
        ),
        migrations.AddConstraint(
            model_name="taskattempt",
            constraint=orchestration.models.base.DomainCheck(
                condition=models.Q(
                    ("cause__isnull", True),
                    (
                        "cause__in",
                        [
                            "error",
                            "soft_timeout",
                            "hard_timeout",
                            "queue_timeout",
                            "deadline",
                            "worker_lost",
                            "connection_lost",
                            "database_error",
                            "redelivery",
                            "cancelled",
                        ],
                    ),
                    _connector="OR",
                ),
                field="cause",
                name="task_attempts_cause_valid",
            ),
        ),
        refuse_reverse_while(
            "orchestration 0035",
            table="task_attempts",
            column="cause",
            values=["database_error"],
            why="finished attempts are immutable",
        ),
    ]
