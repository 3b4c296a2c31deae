from __future__ import annotations

import datetime as dt
import getpass
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import CommandError, CommandParser
from django.utils import timezone

from orchestration.errors import SpecError
from orchestration.isodates import parse_iso_datetime
from orchestration.management.arguments import DatabaseCommand, text
from orchestration.services.access import KNOWN_PERMISSIONS, api_key_create


class Command(DatabaseCommand):
    help = "Create an API key for USER and print it. The key is shown this once; only its hash is stored."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("user", type=text, help="username of the key's owner")
        parser.add_argument("--name", type=text, required=True, help="a name for the key, unique per user")
        parser.add_argument(
            "--expires", help="a number of days, or an ISO 8601 date-time with a time zone (YYYY-MM-DDThh:mm[:ss]Z)"
        )
        parser.add_argument(
            "--permission",
            action="append",
            default=[],
            dest="permissions",
            help=f"narrow the key to this permission (repeatable; one of {', '.join(KNOWN_PERMISSIONS)})",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        user_model = get_user_model()
        try:
            user = user_model.objects.get(**{user_model.USERNAME_FIELD: options["user"]})
        except user_model.DoesNotExist:
            raise CommandError(f"no user named {options['user']!r}") from None
        try:
            created = api_key_create(
                owner=user,
                name=options["name"],
                expires_at=self._expires(options["expires"]),
                permissions=options["permissions"],
                actor={"by": _os_user(), "via": "manage.py create_api_key"},
            )
        except SpecError as exc:
            raise CommandError("; ".join(exc.listed)) from None
        api_key = created.api_key
        expiry = api_key.expires_at.isoformat() if api_key.expires_at else "never"
        self.stderr.write(f"API key {api_key.name!r} for {user} (prefix {api_key.prefix}, expires {expiry}).")
        self.stderr.write("Store it now: it is not shown again. Send it as 'Authorization: Bearer <key>'.")
        self.stdout.write(created.key)

    @staticmethod
    def _expires(value: str | None) -> dt.datetime | None:
        if value is None:
            return None
        # ASCII digits only: str.isdigit() is also true of other scripts' digits (Arabic-Indic,
        # fullwidth), which int() reads as days, and of superscripts, which it refuses.
        if value.isascii() and value.isdigit():
            if int(value) == 0:
                raise CommandError(f"--expires {value!r}: give at least 1 day")
            try:
                return timezone.now() + dt.timedelta(days=int(value))
            except OverflowError:
                raise CommandError(f"--expires {value!r}: too many days (the latest expiry is 9999-12-31)") from None
        try:
            # The form the API and specs read (orchestration.isodates): Django's parser also
            # reads week dates and the basic format, another moment than one meant, silently.
            parsed = parse_iso_datetime(value)
        except ValueError as exc:  # well formed but out of range: month 13, an offset of 25 h
            raise CommandError(f"--expires {value!r}: {exc}") from None
        if parsed is None or timezone.is_naive(parsed):
            raise CommandError(
                f"--expires {value!r}: give a number of days or an ISO 8601 date-time with a time zone, "
                "YYYY-MM-DDThh:mm[:ss] and Z or +hh:mm"
            )
        if parsed <= timezone.now():
            raise CommandError(f"--expires {value!r} is in the past")
        return parsed


def _os_user() -> str:
    """The account that ran the command, for the api_key_created event ("" if it has none)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for the uid (a container), no environment to read
        return ""
