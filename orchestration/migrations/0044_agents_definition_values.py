"""agents.definition_values: the operator's fields of a definition (status, max_concurrency) as
load_agents last read them from its file. A row whose value differs from it was changed by an
operator, and a sync keeps it (every deploy's load_agents re-enabled an agent taken out of
service). A column default ({}) in the database: an INSERT of the release before need not name it.

Each file agent's values are recorded from its row: before this migration nothing but load_agents
wrote a file agent's status and max_concurrency (the console and the API refuse such an agent), so
the row holds what its file last said, or the `inactive` of a sync that retired it. Left empty,
the first sync after it took every value differing from its file for an operator's: a release's
own change of a file's max_concurrency was kept out for good, and an agent retired while its file
was away stayed inactive once the file was back. Agents of the API and the console (no definition
file) are left alone. Reversed, the column is dropped."""

from django.db import migrations, models

OPERATOR_FIELDS = ("status", "max_concurrency")  # services/agents.py's, as of this migration


def definition_values_record(apps, schema_editor):
    Agent = apps.get_model("orchestration", "Agent")
    for agent in Agent.objects.select_for_update().exclude(definition_path="").order_by("pk"):
        values = {**{name: getattr(agent, name) for name in OPERATOR_FIELDS}, **agent.definition_values}
        if values != agent.definition_values:
            Agent.objects.filter(pk=agent.pk).update(definition_values=values)


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
        migrations.RunPython(definition_values_record, migrations.RunPython.noop, elidable=False),
    ]
