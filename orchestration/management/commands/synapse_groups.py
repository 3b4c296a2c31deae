import redis
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from orchestration.management.arguments import synapse_reachable
from orchestration.services.relay import StreamGroupError, stream_group_destroy, stream_groups, synapse_client


class Command(BaseCommand):
    help = (
        "The consumer groups of the Synapse stream: what each still needs and which one holds the "
        "stream back from being trimmed; --destroy NAME removes a group that was abandoned."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--destroy",
            metavar="NAME",
            help="remove this consumer group; the entries only it still needed become trimmable "
            "(its pending entries are dropped with it)",
        )

    def handle(self, *args, **options):
        with synapse_reachable():
            self.report(synapse_client(), options["destroy"])

    def report(self, client: redis.Redis, name: str | None) -> None:
        stream = settings.SYNAPSE_STREAM
        if name is not None:
            try:
                group = stream_group_destroy(client, stream, name)
            except StreamGroupError as exc:
                raise CommandError(str(exc)) from None
            self.stdout.write(
                f"removed the consumer group {name!r} of {stream!r}: {group.consumers} consumer(s), "
                f"{group.pending} pending entr{'y' if group.pending == 1 else 'ies'} dropped with it"
            )
            return
        groups = stream_groups(client, stream)
        length = client.xlen(stream)
        self.stdout.write(
            f"stream {stream!r}: {length} entries (SYNAPSE_STREAM_MAXLEN={settings.SYNAPSE_STREAM_MAXLEN})"
        )
        if not groups:
            self.stdout.write("no consumer group: nothing is trimmed until one reads")
            return
        # The group the trim stops at, when it alone keeps entries the others are done with.
        points = sorted(g.keeps_from for g in groups)
        holder = points[0] if len(points) > 1 and points[0] < points[1] else None
        self.stdout.write(f"{'group':<24} {'consumers':>9} {'pending':>8} {'not delivered':>13}  keeps from")
        for g in sorted(groups, key=lambda g: g.keeps_from):
            lag = "?" if g.lag is None else str(g.lag)
            mark = "  <- holds the stream" if g.keeps_from == holder else ""
            self.stdout.write(
                f"{g.name:<24} {g.consumers:>9} {g.pending:>8} {lag:>13}  {g.keeps_from[0]}-{g.keeps_from[1]}{mark}"
            )
