"""Migration 0014's index (events by entity_id, sequence), built again where an interrupted
concurrent build left it INVALID: 0014 took such a leftover for the index (`IF NOT EXISTS`), so
the API's entity pages walked the table while every insert still maintained it. Where the index
is valid, nothing happens. Reversing leaves the index to 0014."""

from django.db import migrations

from orchestration.migrations._concurrent_index import index_create


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY cannot run in a transaction

    dependencies = [("orchestration", "0021_agent_definition_root")]

    operations = [
        migrations.RunPython(
            index_create("idx_events_entity_id_sequence", "events (entity_id, sequence)"),
            migrations.RunPython.noop,
            elidable=False,
        )
    ]
