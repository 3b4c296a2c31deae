"""agents.definition_values: the operator's fields of a definition (status, max_concurrency) as
load_agents last read them from its file. A row whose value differs from it was changed by an
operator, and a sync keeps it (every deploy's load_agents re-enabled an agent taken out of
service). Rows from before have none: a sync keeps a value that differs from the file's. A
column default ({}) in the database: an INSERT of the release before need not name it."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("orchestration", "0043_events_task_paid_late"),
    ]

    operations = [
        migrations.AddField(
            model_name="agent",
            name="definition_values",
            field=models.JSONField(
                blank=True,
                db_default=models.Value({}, output_field=models.JSONField()),
                default=dict,
                help_text="the operator's fields (status, max_concurrency) as `load_agents` last read them from the definition: one whose value differs was set by an operator, and a sync keeps it",
            ),
        ),
    ]
