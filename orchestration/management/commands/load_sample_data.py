from django.conf import settings
from django.core.management.base import CommandError

from orchestration.management.arguments import DatabaseCommand
from orchestration.services.sample_data import sample_data_load


class Command(DatabaseCommand):
    help = "Load sample agents, an admin user and one recorded workflow for a first look at the console."

    def handle(self, *args: object, **options: object) -> None:
        if not settings.SAMPLE_DATA_ALLOWED:
            # Its events cannot be deleted, and the nightly export would make training data of them.
            raise CommandError(
                "refused under production settings: the sample history would stay in this deployment's record "
                "and its training exports, beside two llm agents and a superuser; load it into a database of "
                "its own with config.settings.local"
            )
        result = sample_data_load()
        for line in result.created:
            self.stdout.write(f"  created  {line}")
        for line in result.skipped:
            self.stdout.write(f"  kept     {line}")
        self.stdout.write("")
        self.stdout.write("Open the operations console:")
        self.stdout.write("  .venv/bin/python manage.py runserver")
        self.stdout.write("  then browse http://127.0.0.1:8000/admin/")
        if result.admin_password:
            self.stdout.write(f"  user: {result.admin_username}   password: {result.admin_password}   (shown once)")
        else:
            self.stdout.write(
                f"  user: {result.admin_username} (existing; reset with "
                f"`.venv/bin/python manage.py changepassword {result.admin_username}`)"
            )
