"""Drop migration 0004's statement trigger (every transaction inserting events took its
transaction id before its sequence value). The relay proved a sequence hole empty by
transaction ids, which needed that order; it now waits for the transactions holding a write
lock on events when it saw the hole (orchestration/services/relay.py), which needs nothing
of the writers, and the trigger only cost each INSERT into events a PL/pgSQL call."""

from importlib import import_module

from django.db import migrations

_0004 = import_module("orchestration.migrations.0004_events_take_xid_first")


class Migration(migrations.Migration):
    dependencies = [("orchestration", "0023_attempts_late_spend")]

    operations = [migrations.RunPython(_0004.backwards, _0004.forwards, elidable=False)]
