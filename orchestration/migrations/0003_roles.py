"""Groups admin, developer and viewer with the permissions of seed 004's roles.json."""

from django.contrib.auth.management import create_permissions
from django.db import migrations

from orchestration.roles import roles_sync


def forwards(apps, schema_editor):
    # On a fresh database, permissions are normally created after the last migration; create
    # them now so the groups can reference them.
    for app_config in apps.get_app_configs():
        app_config.models_module = True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = None
    roles_sync(group_model=apps.get_model("auth", "Group"), permission_model=apps.get_model("auth", "Permission"))


def backwards(apps, schema_editor):
    # The groups stay, with their members: deleting them took every user's role with them, and
    # migrating forward again made the groups anew, empty (roles_sync keeps the ones it finds).
    pass


class Migration(migrations.Migration):
    dependencies = [
        ("orchestration", "0002_database_rules"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(forwards, backwards)]
