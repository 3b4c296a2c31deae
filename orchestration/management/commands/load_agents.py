from pathlib import Path

from django.core.management.base import CommandError

from orchestration.errors import SpecError
from orchestration.management.arguments import DatabaseCommand, text
from orchestration.services.agents import agents_sync, default_definitions_dir


class Command(DatabaseCommand):
    help = (
        "Sync agent definitions (JSON/YAML files) into the agents table and print what changed; an agent's "
        "status and max_concurrency set by an operator are kept."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "path", nargs="?", type=text, help=f"definitions directory (default: {default_definitions_dir()})"
        )

    def handle(self, *args, **options):
        try:
            result = agents_sync(directory=Path(options["path"]) if options["path"] else None)
        except SpecError as exc:
            raise CommandError("invalid agent definitions:\n  " + "\n  ".join(exc.listed)) from None
        for label, ids in (
            ("created", result.created),
            ("updated", result.updated),
            ("deactivated", result.deactivated),
            ("unchanged", result.unchanged),
        ):
            for agent_id in ids:
                changed = result.changed.get(agent_id)
                self.stdout.write(f"  {label:<11} {agent_id}" + (f": {', '.join(changed)}" if changed else ""))
        for agent_id, values in result.kept.items():
            for value in values:
                self.stdout.write(f"  {'kept':<11} {agent_id}: {value}")
        self.stdout.write(
            f"{len(result.created)} created, {len(result.updated)} updated, "
            f"{len(result.deactivated)} deactivated, {len(result.unchanged)} unchanged"
            + (f"; operator values kept on {len(result.kept)}" if result.kept else "")
        )
