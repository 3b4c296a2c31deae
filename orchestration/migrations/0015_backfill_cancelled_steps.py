"""Fill workflows.cancelled_steps for workflows that existed before 0009 added it at 0.

The fast path finishes a workflow when total - completed - failed - cancelled reaches 0; a
workflow running at upgrade time with cancelled tasks would otherwise never finish.
"""

from django.db import migrations

BACKFILL = """
UPDATE workflows
   SET cancelled_steps = c.n
  FROM (SELECT workflow_id, count(*) AS n FROM task_executions
         WHERE status = 'cancelled' AND workflow_id IS NOT NULL GROUP BY workflow_id) AS c
 WHERE workflows.workflow_id = c.workflow_id AND workflows.cancelled_steps <> c.n
"""


class Migration(migrations.Migration):
    dependencies = [("orchestration", "0014_api_events_entity_id_index")]

    operations = [migrations.RunSQL(BACKFILL, reverse_sql=migrations.RunSQL.noop)]
