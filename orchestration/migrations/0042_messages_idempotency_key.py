"""A user message's `idempotency_key`: the `Idempotency-Key` header it was posted with, unique
per owner, so that a post sent again with its key (the client lost the 202) is answered with
the message stored first instead of storing a second one and paying for a second reply. The
column is nullable (no table rewrite); its unique index is partial (keyed messages only) and
built CONCURRENTLY on PostgreSQL (`_concurrent_index`): conversations go on meanwhile.
"""

from django.conf import settings
from django.db import migrations, models

from orchestration.migrations._concurrent_index import AddFieldOnce, index_create, index_drop

NAME = "messages_owner_idempotency_key_unique"
DEFINITION = "agent_playground_messages (owner_id, idempotency_key) WHERE idempotency_key IS NOT NULL"


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY cannot run in a transaction

    dependencies = [
        ("orchestration", "0041_agents_definition_hash"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        AddFieldOnce(
            model_name="agentplaygroundmessage",
            name="idempotency_key",
            field=models.CharField(
                blank=True, help_text="the Idempotency-Key a user message was posted with", max_length=255, null=True
            ),
        ),
        migrations.SeparateDatabaseAndState(
            database_operations=[
                migrations.RunPython(index_create(NAME, DEFINITION, unique=True), index_drop(NAME), elidable=False),
            ],
            state_operations=[
                migrations.AddConstraint(
                    model_name="agentplaygroundmessage",
                    constraint=models.UniqueConstraint(
                        condition=models.Q(idempotency_key__isnull=False),
                        fields=("owner", "idempotency_key"),
                        name=NAME,
                    ),
                ),
            ],
        ),
    ]
