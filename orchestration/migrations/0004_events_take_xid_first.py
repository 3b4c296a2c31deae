"""Make every transaction that inserts events take its transaction id before it takes a
sequence value, which the relay's gap handling relied on until migration 0024 dropped this
trigger (the relay now waits on the writers' locks instead, see orchestration/services/relay.py).

Column defaults (the identity's nextval) are evaluated per row after BEFORE STATEMENT
triggers have run, so this statement-level trigger runs first.
"""

from django.db import migrations


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute(
        """
        CREATE OR REPLACE FUNCTION events_take_xid() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_current_xact_id();
            RETURN NULL;
        END;
        $$
        """,
        params=None,
    )
    schema_editor.execute(
        "CREATE TRIGGER events_take_xid BEFORE INSERT ON events FOR EACH STATEMENT EXECUTE FUNCTION events_take_xid()",
        params=None,
    )


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute("DROP TRIGGER IF EXISTS events_take_xid ON events", params=None)
    schema_editor.execute("DROP FUNCTION IF EXISTS events_take_xid()", params=None)


class Migration(migrations.Migration):
    dependencies = [("orchestration", "0003_roles")]

    operations = [migrations.RunPython(forwards, backwards)]
