"""A partial index of the events that name a session (a conversation's), for the console's
event search: it looks an id up in event_id, entity_id, workflow_id, agent_id and session_id
at once, and with no index on session_id the OR of them is no index condition, so every search
read the whole log (0.3 s at 4 M events, for the count and again for the page; 0.1 ms with
it). It holds only the conversations' events; the engine's own, which name no session, never
write it. Built CONCURRENTLY on PostgreSQL (writes to the outbox go on); an invalid leftover of
an interrupted build is built again (`_concurrent_index`).
"""

from django.db import migrations

from orchestration.migrations._concurrent_index import index_create, index_drop

NAME = "idx_events_session"
DEFINITION = "events (session_id) WHERE session_id IS NOT NULL"


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY cannot run in a transaction

    dependencies = [("orchestration", "0036_task_executions_agent_line_index")]

    operations = [migrations.RunPython(index_create(NAME, DEFINITION), index_drop(NAME), elidable=False)]
