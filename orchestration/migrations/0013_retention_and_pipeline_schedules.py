"""Retention's privileged path through the append-only events table, and the beat schedules
of the training-data pipeline (rollups, the daily export, retention).

events stays append-only: the statement-level trigger of migration 0002 now lets a DELETE
through only inside `prune_events(before, max_sequence, batch)`, a SECURITY DEFINER function.
The function sets a transaction-local flag and the trigger checks both the flag and that the
current role is the function's owner (which it is only while the function runs), so a plain
DELETE, or a session that sets the flag itself under another role, is still refused. UPDATE
and TRUNCATE stay refused. EXECUTE is revoked from PUBLIC: operators grant it to the role that
runs retention (see README, "Retention"). On SQLite nothing changes (events are kept).

Schedules are created only when missing (by name), so edits made in the admin survive.
"""

from django.db import migrations

PRUNE_SIGNATURE = "prune_events(timestamp with time zone, bigint, integer)"

REJECT_WITH_PRUNE_PATH = f"""
CREATE OR REPLACE FUNCTION events_reject_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE'
       AND current_setting('agentledger.prune_events', true) = 'on'
       AND current_user = (SELECT pg_get_userbyid(p.proowner) FROM pg_proc p
                           WHERE p.oid = to_regprocedure('{PRUNE_SIGNATURE}')) THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION 'events is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'restrict_violation',
              HINT = 'retention is a separate, explicit, privileged operation: SELECT prune_events(...)';
END;
$$
"""

REJECT_ORIGINAL = """
CREATE OR REPLACE FUNCTION events_reject_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'restrict_violation',
              HINT = 'retention is a separate, explicit, privileged operation';
END;
$$
"""

PRUNE_FUNCTION = """
CREATE OR REPLACE FUNCTION prune_events(before timestamp with time zone, max_sequence bigint, batch integer)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    deleted bigint;
BEGIN
    IF before IS NULL OR max_sequence IS NULL OR batch IS NULL OR batch < 1 THEN
        RAISE EXCEPTION 'prune_events(before, max_sequence, batch): all arguments are required, batch >= 1';
    END IF;
    PERFORM set_config('agentledger.prune_events', 'on', true);
    DELETE FROM events WHERE sequence IN (
        SELECT sequence FROM events
        WHERE created_at < before AND sequence <= max_sequence
        ORDER BY sequence LIMIT batch
    );
    GET DIAGNOSTICS deleted = ROW_COUNT;
    PERFORM set_config('agentledger.prune_events', 'off', true);
    RETURN deleted;
END;
$$
"""

# name, task, crontab (minute, hour), kwargs
SCHEDULES = [
    ("rollup agent metrics hourly", "orchestration.rollup_metrics", ("5", "*"), '{"period": "hour"}'),
    ("rollup agent metrics daily", "orchestration.rollup_metrics", ("15", "0"), '{"period": "day"}'),
    ("export training data (previous UTC day)", "training_export.export_previous_day", ("30", "0"), "{}"),
    ("retention", "orchestration.apply_retention", ("0", "3"), "{}"),
]


def install_database_functions(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute(PRUNE_FUNCTION, params=None)
    schema_editor.execute(f"REVOKE ALL ON FUNCTION {PRUNE_SIGNATURE} FROM PUBLIC", params=None)
    schema_editor.execute(REJECT_WITH_PRUNE_PATH, params=None)


def remove_database_functions(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute(REJECT_ORIGINAL, params=None)
    schema_editor.execute(f"DROP FUNCTION IF EXISTS {PRUNE_SIGNATURE}", params=None)


def install_schedules(apps, schema_editor):
    crontab_model = apps.get_model("django_celery_beat", "CrontabSchedule")
    task_model = apps.get_model("django_celery_beat", "PeriodicTask")
    for name, task, (minute, hour), kwargs in SCHEDULES:
        if task_model.objects.filter(name=name).exists():
            continue
        crontab, _ = crontab_model.objects.get_or_create(
            minute=minute, hour=hour, day_of_week="*", day_of_month="*", month_of_year="*", timezone="UTC"
        )
        task_model.objects.create(name=name, task=task, crontab=crontab, kwargs=kwargs, queue="low")


def remove_schedules(apps, schema_editor):
    apps.get_model("django_celery_beat", "PeriodicTask").objects.filter(name__in=[s[0] for s in SCHEDULES]).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("orchestration", "0012_drop_task_pk_pattern_index"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]

    operations = [
        migrations.RunPython(install_database_functions, remove_database_functions),
        migrations.RunPython(install_schedules, remove_schedules),
    ]
