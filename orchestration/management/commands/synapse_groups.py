import redis
from django.conf import settings
from django.core.management.base import CommandError

from orchestration.management.arguments import DatabaseCommand, seconds, synapse_reachable
from orchestration.services.relay import (
    StreamGroupError,
    dead_letter_stream,
    shown_name,
    stream_group_destroy,
    stream_groups,
    synapse_client,
)


class Command(DatabaseCommand):
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

        parser.add_argument(
            "--alive",
            metavar="PREFIX",
            help="a liveness check (compose's synapse healthcheck, PREFIX the container's hostname and a "
            "dash): exit 1 unless a consumer of --group whose name starts with PREFIX has read from the "
            "stream within --max-idle seconds (a live consumer reads at least every --block-ms)",
        )
        parser.add_argument("--group", help="with --alive: the consumer group (default: training)")
        parser.add_argument(
            "--max-idle",
            type=seconds(),
            help="with --alive: seconds since the freshest such consumer's last read (default: 60)",
        )

    def handle(self, *args, **options):
        alive = options["alive"]
        if alive is not None and options["destroy"] is not None:
            raise CommandError("--alive and --destroy are separate uses: give one")
        if alive is None and (options["group"] is not None or options["max_idle"] is not None):
            raise CommandError("--group and --max-idle go with --alive")
        with synapse_reachable():
            if alive is not None:
                group, max_idle = options["group"] or "training", options["max_idle"] or 60.0
                self.alive(synapse_client(), alive, group, max_idle)
                return
            self.report(synapse_client(), options["destroy"])

    def alive(self, client: redis.Redis, prefix: str, group: str, max_idle: float) -> None:
        stream = settings.SYNAPSE_STREAM
        try:
            consumers = client.xinfo_consumers(stream, group)
        except redis.ResponseError as exc:  # no stream, or no such group
            raise CommandError(f"no consumer group {group!r} on the stream {stream!r} ({exc})") from None
        idle = sorted(
            (int(consumer["idle"]), shown_name(consumer["name"]))
            for consumer in consumers
            if shown_name(consumer["name"]).startswith(prefix)
        )
        if not idle:
            raise CommandError(f"no consumer of the group {group!r} is named {prefix}…: none has read yet")
        milliseconds, name = idle[0]
        if milliseconds > max_idle * 1000:
            raise CommandError(
                f"no consumer named {prefix}… has read for {milliseconds / 1000:.1f} s (the latest: {name}); "
                f"--max-idle is {max_idle:g} s"
            )
        self.stdout.write(f"{name} read from {stream!r} {milliseconds / 1000:.1f} s ago")

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
            self.dead_letters(client, stream)
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
        self.dead_letters(client, stream)

    def dead_letters(self, client: redis.Redis, stream: str) -> None:
        dead = dead_letter_stream(stream)
        count = client.xlen(dead)
        if count:
            self.stdout.write(
                f"dead letters {dead!r}: {count} entr{'y' if count == 1 else 'ies'} no consumer could write to the "
                "training files (each with its reason and original_id: XRANGE it)"
            )
