"""Each agent's `definition_hash` made the hash of the definition its row holds (services/
agents.py, definition_snapshot), with an agent_registered event holding that definition
(`change`: "recorded"). Each attempt's task_started event names its agent's definition by that
hash; an agent made before it (by the API or the console: no hash; by load_agents: its file's)
would otherwise be named by a hash no agent_registered event holds until its next change.

The hash is definition_snapshot's as this migration was written (its fields and formula are
frozen here, as a migration's state is: the application's code may read fields a later
migration adds), the one each later change and attempt records; tests/orchestration/
test_agent_provenance.py checks that the two agree. Reversed, nothing changes (the hashes stay
true and the events are records)."""

import hashlib
import json

from django.db import migrations

# services/agents.py's SNAPSHOT_FIELDS as of this migration.
SNAPSHOT_FIELDS = (
    "name",
    "role",
    "description",
    "category",
    "version",
    "executor",
    "entrypoint",
    "model",
    "provider",
    "url",
    "api_key_env",
    "system_prompt",
    "temperature",
    "max_tokens",
    "max_concurrency",
    "capabilities",
    "specialties",
    "backstory",
    "personality_emoji",
    "config",
    "metadata",
)


def definition_snapshot(agent):
    """services/agents.py's definition_snapshot as of this migration, on the historical model."""
    fields = {name: agent._meta.get_field(name).to_python(getattr(agent, name)) for name in SNAPSHOT_FIELDS}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return {"definition_sha256": hashlib.sha256(canonical.encode("utf-8")).hexdigest(), "fields": fields}


def definition_hashes_record(apps, schema_editor):
    Agent = apps.get_model("orchestration", "Agent")
    Event = apps.get_model("orchestration", "Event")
    for agent in Agent.objects.select_for_update().order_by("pk"):
        snapshot = definition_snapshot(agent)
        if agent.definition_hash == snapshot["definition_sha256"]:
            continue
        Agent.objects.filter(pk=agent.pk).update(definition_hash=snapshot["definition_sha256"])
        Event.objects.create(
            event_type="agent_registered",
            entity_type="agent",
            entity_id=agent.pk,
            agent_id=agent.pk,
            source="platform",
            severity="info",
            payload={"change": "recorded", "by": None, **snapshot},
        )


class Migration(migrations.Migration):
    dependencies = [("orchestration", "0040_retention_indexes")]

    operations = [migrations.RunPython(definition_hashes_record, migrations.RunPython.noop)]
