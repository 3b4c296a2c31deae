"""The training-data pipeline against its raw limits, side by side in one run.

- consumer: the Synapse consumer (`SynapseConsumer.run(once=True)`: check each entry's rows,
  append them to the daily CSV partitions, fsync, then XACK) against a bare `XREADGROUP COUNT
  100` + batched `XACK` loop that writes nothing, both reading the same stream entries (separate
  groups), the entries the relay publishes (`events_to_entries`, with the rows it makes); beside
  them, the consumer on the same entries without those rows (it parses, redacts and encodes each
  itself, as before the relay made them: the files must be identical) and the relay's CPU per
  event with and without making the rows;
- export: the JSONL exporter (`export_run`, events, a fresh process per run) against
  `COPY (SELECT row_to_json(t)::text FROM (...) t) TO STDOUT` in CSV format with quote and
  delimiter characters that never occur (the text format would double every backslash and
  corrupt the JSON), on the same rows; both outputs are checked: lines = count(*), every line
  valid JSON;
- memory: the exporter's peak RSS (VmHWM of its process) at each size, against the same
  process's RSS before the export.

Own database (agentledger_bench_pipeline) and Redis db 14; events are generated once per
size, each size on its own UTC day.

`--compare-git REV` adds a second subject to each round: the pipeline's modules
(training_export/services/{redaction,store,jsonl,synapse}.py, and for the export also
files, manifest, chat and export) as they are at REV, read with `git show` into a temporary
directory and loaded in their own process in place of the working tree's. Consumers then run in
a child process each (the CPU figures are the child's), both on the same entries; the files
both write (CSV partitions, JSONL exports) are compared byte for byte.

    .venv/bin/python -m bench.pipeline --rows 200000,1000000 --consumer-entries 200000 --repeat 3
    .venv/bin/python -m bench.pipeline --rows 200000 --consumer-entries 200000 --repeat 3 --skip-export
    .venv/bin/python -m bench.pipeline --rows 200000 --consumer-entries 200000 --repeat 3 --compare-git HEAD
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["DJANGO_SETTINGS_MODULE"] = "bench.pipeline_settings"
os.environ.setdefault("LOG_LEVEL", "WARNING")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import django  # noqa: E402

django.setup()

import psycopg  # noqa: E402
import redis  # noqa: E402
from django.conf import settings  # noqa: E402
from django.db import connection  # noqa: E402

from bench.database import database_ensure  # noqa: E402
from orchestration.models import Event  # noqa: E402
from orchestration.services.relay import event_fields, events_to_entries  # noqa: E402

PIPELINE_MODULES = ("redaction", "store", "jsonl", "synapse")  # in import order
# What the export process loads besides them (files before store, which imports it).
EXPORT_MODULES = ("files", *PIPELINE_MODULES, "manifest", "chat", "export")


def load_baseline(directory: str, names: tuple[str, ...] = PIPELINE_MODULES) -> None:
    """Load the pipeline modules from `directory` (sources of another revision) under their
    own names, before anything imports the working tree's."""
    for name in names:
        module_name = f"training_export.services.{name}"
        if module_name in sys.modules:
            raise SystemExit(f"{module_name} is already imported: cannot load the baseline")
        spec = importlib.util.spec_from_file_location(module_name, Path(directory) / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)


if "--child-baseline" in sys.argv:
    load_baseline(
        sys.argv[sys.argv.index("--child-baseline") + 1],
        EXPORT_MODULES if "--child-export" in sys.argv else PIPELINE_MODULES,
    )

from training_export.services.jsonl import EXPORTERS  # noqa: E402
from training_export.services.store import TrainingDataStore  # noqa: E402
from training_export.services.synapse import SynapseConsumer, synapse_consumer_client  # noqa: E402


def baseline_sources(revision: str) -> Path:
    """The pipeline modules at `revision`, in a temporary directory (never in the tree)."""
    directory = Path(tempfile.mkdtemp(prefix="bench-baseline-"))
    for name in EXPORT_MODULES:
        source = subprocess.run(
            ["git", "show", f"{revision}:training_export/services/{name}.py"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
        (directory / f"{name}.py").write_bytes(source)
    return directory


STREAM = "bench-synapse"
BUILT_STREAM = "bench-synapse-without-rows"
FIRST_DAY = dt.date(2024, 1, 1)
EVENT_TYPES = ("agent_started", "task_started", "task_queued", "tool_executed", "message_created")


def day_bounds(day: dt.date) -> tuple[dt.datetime, dt.datetime]:
    start = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
    return start, start + dt.timedelta(days=1)


def seed(day: dt.date, rows: int) -> None:
    """`rows` events spread over `day`, with payloads like the engine's (ids, a short text, usage)."""
    start, end = day_bounds(day)
    existing = Event.objects.filter(created_at__gte=start, created_at__lt=end).count()
    if existing == rows:
        return
    if existing:
        raise SystemExit(f"{day} holds {existing} events, not {rows}: drop the database agentledger_bench_pipeline")
    step_us = 86_400_000_000 // rows
    types = "ARRAY[" + ",".join(f"'{t}'" for t in EVENT_TYPES) + "]"
    with connection.cursor() as cursor:
        cursor.execute(  # built from constants; values are parameters
            f"""
            INSERT INTO events (event_id, event_type, entity_type, entity_id, workflow_id, agent_id, source,
                                payload, severity, created_at)
            SELECT md5(%(day)s || i), ({types})[1 + i %% 5], 'task', 'task-' || i, 'wf-' || (i / 20),
                   'agent-' || (i %% 7), 'platform',
                   jsonb_build_object('attempt', 1 + i %% 3, 'queue', 'normal', 'tool_name', 'calculator',
                                      'input_params', jsonb_build_object('expression', i || ' * 7'),
                                      'output_result', jsonb_build_object('result', i * 7),
                                      'note', 'step ' || i || ' of a workflow, text "quoted" and \\ backslash',
                                      'usage', jsonb_build_object('tokens_used', i %% 900, 'max_tokens', 1024)),
                   'info', %(start)s::timestamptz + (i::bigint * %(step)s::bigint) * interval '1 microsecond'
            FROM generate_series(0, %(rows)s - 1) AS i
            """,  # noqa: S608
            {"day": day.isoformat(), "start": start, "step": step_us, "rows": rows},
        )
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE events")


def valid_jsonl(path: Path) -> int:
    lines = 0
    with path.open("rb") as fh:
        for line in fh:
            json.loads(line)
            lines += 1
    return lines


# --- consumer -------------------------------------------------------------------------------


def fill_stream(client: redis.Redis, day: dt.date, entries: int) -> dict[str, float]:
    """STREAM with the entries the relay publishes (its batches of SYNAPSE_RELAY_BATCH events,
    `events_to_entries`: each with the CSV rows it makes), BUILT_STREAM with the same entries
    as a relay that made no rows published them (the consumer builds the rows itself). Returns
    the relay's CPU per event (µs) for each kind, measured on the same batches."""
    client.delete(STREAM, f"{STREAM}:dead", BUILT_STREAM, f"{BUILT_STREAM}:dead")
    start, end = day_bounds(day)
    rows = Event.objects.filter(created_at__gte=start, created_at__lt=end).order_by("sequence")[:entries]
    events = list(rows)
    size = settings.SYNAPSE_RELAY_BATCH
    cpu = {"relay_cpu_us": 0.0, "relay_without_rows_cpu_us": 0.0}
    pipe = client.pipeline(transaction=False)
    for first in range(0, len(events), size):
        batch = events[first : first + size]
        began = time.process_time()
        with_rows = events_to_entries(batch)
        cpu["relay_cpu_us"] += time.process_time() - began
        began = time.process_time()
        without = entries_without_rows(batch)
        cpu["relay_without_rows_cpu_us"] += time.process_time() - began
        for event, entry, bare_entry in zip(batch, with_rows, without, strict=True):
            pipe.xadd(STREAM, entry, id=f"{event.sequence}-1")
            pipe.xadd(BUILT_STREAM, bare_entry, id=f"{event.sequence}-1")
        pipe.execute()
    return {name: seconds / len(events) * 1e6 for name, seconds in cpu.items()}


def entries_without_rows(events: list[Event]) -> list[dict[str, str]]:
    """What a relay that makes no rows publishes (as before stream_rows): the event's fields and
    its payload, masked after one check of the batch's payloads for secrets."""
    # Imported here: a --child-baseline process loads these modules from another revision first.
    from training_export.services.redaction import current_redactor
    from training_export.services.store import json_text

    redactor = current_redactor()
    texts = [json_text(event.payload) for event in events]
    dirty = redactor.dirty([[] for _ in events], [[text] for text in texts], [[event.payload] for event in events])
    return [
        event_fields(event) | {"payload": json_text(redactor.value(event.payload)) if index in dirty else text}
        for index, (event, text) in enumerate(zip(events, texts, strict=True))
    ]


def run_bare(client: redis.Redis, group: str) -> tuple[float, float, int]:
    """Seconds, CPU seconds of this process, entries."""
    client.xgroup_create(STREAM, group, id="0")
    done = 0
    began, cpu_began = time.perf_counter(), time.process_time()
    while True:
        reply = client.xreadgroup(group, "bare", {STREAM: ">"}, count=100)
        if not reply or not reply[0][1]:
            break
        ids = [entry_id for entry_id, _ in reply[0][1]]
        client.xack(STREAM, group, *ids)
        done += len(ids)
    return time.perf_counter() - began, time.process_time() - cpu_began, done


def run_consumer(
    client: redis.Redis,
    group: str,
    directory: Path,
    batch: int,
    *,
    name: str = "bench",
    alone: bool = True,
    stream: str = STREAM,
) -> tuple[float, float, int]:
    """Seconds, CPU seconds of this process, entries. `alone`: no other consumer of the group
    runs, so nothing may be pending at the end (the caller checks that otherwise)."""
    consumer = SynapseConsumer(
        # The client `consume_events` reads with (the consumer's own settings, as deployed).
        client=synapse_consumer_client(block_ms=2000),
        store=TrainingDataStore(directory),
        stream=stream,
        group=group,
        consumer=name,
        batch=batch,
    )
    began, cpu_began = time.perf_counter(), time.process_time()
    result = consumer.run(once=True)
    seconds, cpu_seconds = time.perf_counter() - began, time.process_time() - cpu_began
    if result.dead or (alone and client.xpending(stream, group)["pending"]):
        raise SystemExit(f"consumer left work behind: {result.summary()}")
    return seconds, cpu_seconds, result.entries


def files_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*.csv")):
        digest.update(str(path.relative_to(directory)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def child_consumer(group: str, directory: str, batch: int, sibling: str | None = None, stream: str = STREAM) -> None:
    """One consumer run in this process. A `sibling` (its consumer name) is one of several
    consumers of the group: it says "ready", waits for a line on stdin so that all start
    together, and reports its wall-clock start and end."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    if sibling is not None:
        client.ping()
        print("ready", flush=True)
        sys.stdin.readline()
    started = time.time()
    seconds, cpu_seconds, done = run_consumer(
        client, group, Path(directory), batch, name=sibling or "bench", alone=sibling is None, stream=stream
    )
    result = {"seconds": seconds, "cpu_seconds": cpu_seconds, "entries": done}
    print(json.dumps(result | {"started": started, "ended": started + seconds}))


def sorted_lines_digest(directory: Path) -> str:
    """The files' digest with the rows of each in sorted order: consumers running in parallel
    append their batches in whatever order they finish them."""
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*.csv")):
        header, *rows = path.read_bytes().splitlines(keepends=True)
        digest.update(str(path.relative_to(directory)).encode() + b"\0" + header + b"".join(sorted(rows)))
    return digest.hexdigest()


def consumer_processes_round(
    client: redis.Redis, group: str, batch: int, processes: int
) -> tuple[float, float, int, int, str]:
    """`consumer_round` with `processes` consumers of one group, one process each, started
    together: seconds from the first start to the last end, CPU seconds of all of them,
    entries, CSV rows and the digest of the files with their rows sorted."""
    directory = Path(tempfile.mkdtemp(prefix="bench-consumers-"))
    children = []
    try:
        for number in range(processes):
            command = [sys.executable, "-m", "bench.pipeline", "--child-consumer", group, "--child-output"]
            command += [str(directory), "--consumer-batch", str(batch), "--child-sibling", f"bench-{number}"]
            children.append(
                subprocess.Popen(command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            )
        for child in children:
            if child.stdout.readline().strip() != "ready":
                raise SystemExit("a consumer process failed to start")
        for child in children:
            child.stdin.write("go\n")
            child.stdin.flush()
        reports = []
        for child in children:
            output, _ = child.communicate()
            if child.returncode:
                raise SystemExit(f"consumer process failed: {output}")
            reports.append(json.loads(output.strip().splitlines()[-1]))
        if client.xpending(STREAM, group)["pending"] or client.xlen(f"{STREAM}:dead"):
            raise SystemExit("the consumer processes left work behind")
        seconds = max(r["ended"] for r in reports) - min(r["started"] for r in reports)
        cpu_seconds = sum(r["cpu_seconds"] for r in reports)
        done = sum(r["entries"] for r in reports)
        csv_rows = sum(sum(1 for _ in path.open("rb")) - 1 for path in (directory / "events").glob("*.csv"))
        return seconds, cpu_seconds, done, csv_rows, sorted_lines_digest(directory)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
        shutil.rmtree(directory)


def consumer_round(
    client: redis.Redis, group: str, batch: int, baseline: Path | None, *, in_child: bool, stream: str = STREAM
) -> tuple[float, float, int, int, str, str]:
    """Seconds, CPU seconds, entries, CSV rows, the digest of the files of one consumer run and
    the same with each file's rows sorted."""
    directory = Path(tempfile.mkdtemp(prefix="bench-consumer-"))
    try:
        if in_child:
            command = [sys.executable, "-m", "bench.pipeline", "--child-consumer", group, "--child-output"]
            command += [str(directory), "--consumer-batch", str(batch), "--child-stream", stream]
            if baseline is not None:
                command += ["--child-baseline", str(baseline)]
            proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
            if proc.returncode:
                raise SystemExit(f"consumer subprocess failed:\n{proc.stderr}")
            child = json.loads(proc.stdout.strip().splitlines()[-1])
            seconds, cpu_seconds, done = child["seconds"], child["cpu_seconds"], child["entries"]
        else:
            seconds, cpu_seconds, done = run_consumer(client, group, directory, batch, stream=stream)
        csv_rows = sum(sum(1 for _ in path.open("rb")) - 1 for path in (directory / "events").glob("*.csv"))
        return seconds, cpu_seconds, done, csv_rows, files_digest(directory), sorted_lines_digest(directory)
    finally:
        shutil.rmtree(directory)


def bench_consumer(
    entries: int, repeat: int, batch: int, baseline: Path | None = None, processes: int = 1
) -> list[dict]:
    client = redis.Redis.from_url(settings.REDIS_URL)
    relay = fill_stream(client, FIRST_DAY, entries)
    print(
        f"  relay CPU per event: {relay['relay_cpu_us']:.1f} us making the rows, "
        f"{relay['relay_without_rows_cpu_us']:.1f} us without",
        flush=True,
    )
    length = client.xlen(STREAM)
    rounds = []
    in_child = baseline is not None
    for n in range(repeat):
        bare_seconds, bare_cpu, bare_done = run_bare(client, f"bare-{n}")
        seconds, cpu, done, csv_rows, digest, sorted_digest = consumer_round(
            client, f"training-{n}", batch, None, in_child=in_child
        )
        if not (bare_done == done == csv_rows == length):
            raise SystemExit(f"counts differ: bare {bare_done}, consumer {done}, csv {csv_rows}, {length}")
        built_seconds, built_cpu, built_done, built_rows, built_digest, _ = consumer_round(
            client, f"built-{n}", batch, None, in_child=in_child, stream=BUILT_STREAM
        )
        if not (built_done == built_rows == length):
            raise SystemExit(f"building its rows, the consumer saw {built_done} entries, csv {built_rows}, {length}")
        result = relay | {
            "entries": length,
            "bare_per_s": bare_done / bare_seconds,
            "consumer_per_s": done / seconds,
            "bare_cpu_us": bare_cpu / bare_done * 1e6,
            "consumer_cpu_us": cpu / done * 1e6,
            "built_per_s": built_done / built_seconds,
            "built_cpu_us": built_cpu / built_done * 1e6,
            "built_same_files": built_digest == digest,
        }
        line = (
            f"  consumer round {n + 1}: bare {bare_done / bare_seconds:,.0f}/s, "
            f"consumer {done / seconds:,.0f}/s ({bare_seconds / seconds:.2f}x); CPU per entry: "
            f"bare {result['bare_cpu_us']:.1f} us, consumer {result['consumer_cpu_us']:.1f} us | "
            f"entries without the relay's rows: {result['built_per_s']:,.0f}/s "
            f"({bare_seconds / built_seconds:.2f}x), {result['built_cpu_us']:.1f} us; "
            f"identical CSV files: {result['built_same_files']}"
        )
        if processes > 1:
            par_seconds, par_cpu, par_done, par_rows, par_digest = consumer_processes_round(
                client, f"parallel-{n}", batch, processes
            )
            if not (par_done == par_rows == length):
                raise SystemExit(f"{processes} consumers: entries {par_done}, csv {par_rows}, {length}")
            result.update(
                parallel_per_s=par_done / par_seconds,
                parallel_cpu_us=par_cpu / par_done * 1e6,
                parallel_same_rows=par_digest == sorted_digest,
            )
            line += (
                f" | {processes} consumer processes {result['parallel_per_s']:,.0f}/s "
                f"({bare_seconds / par_seconds:.2f}x), {result['parallel_cpu_us']:.1f} us; "
                f"same rows: {result['parallel_same_rows']}"
            )
        if baseline is not None:
            old_seconds, old_cpu, old_done, old_rows, old_digest, _ = consumer_round(
                client, f"baseline-{n}", batch, baseline, in_child=True
            )
            if not (old_done == old_rows == length):
                raise SystemExit(f"baseline counts differ: consumer {old_done}, csv {old_rows}, {length}")
            result.update(
                baseline_per_s=old_done / old_seconds,
                baseline_cpu_us=old_cpu / old_done * 1e6,
                same_files=old_digest == digest,
            )
            line += (
                f" | baseline consumer {result['baseline_per_s']:,.0f}/s ({bare_seconds / old_seconds:.2f}x), "
                f"{result['baseline_cpu_us']:.1f} us; identical CSV files: {result['same_files']}"
            )
        rounds.append(result)
        print(line, flush=True)
    client.delete(STREAM, f"{STREAM}:dead", BUILT_STREAM, f"{BUILT_STREAM}:dead")
    return rounds


# --- export ---------------------------------------------------------------------------------


def copy_baseline(day: dt.date, out: Path) -> tuple[float, int]:
    """What PostgreSQL itself can stream: the same rows, as JSON, through COPY."""
    start, end = day_bounds(day)
    columns = ", ".join(EXPORTERS["events"].columns)
    sql = (  # built from the exporter's column names and two dates
        f"COPY (SELECT row_to_json(t)::text FROM (SELECT {columns} FROM events "  # noqa: S608
        f"WHERE created_at >= '{start.isoformat()}' AND created_at < '{end.isoformat()}' ORDER BY sequence) t) "
        "TO STDOUT (FORMAT csv, QUOTE E'\\x01', DELIMITER E'\\x02')"
    )
    db = settings.DATABASES["default"]
    dsn = f"host={db['HOST'] or '127.0.0.1'} port={db['PORT'] or 5432} user={db['USER']} dbname={db['NAME']}"
    began = time.perf_counter()
    with psycopg.connect(dsn) as conn, conn.cursor() as cursor, out.open("wb") as fh:
        with cursor.copy(sql) as copy:
            for chunk in copy:
                fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    return time.perf_counter() - began, 0


def export_in_subprocess(day: dt.date, out: Path, baseline: Path | None = None) -> dict:
    command = [sys.executable, "-m", "bench.pipeline", "--child-export", day.isoformat(), "--child-output", str(out)]
    if baseline is not None:
        command += ["--child-baseline", str(baseline)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"export subprocess failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def peak_rss_kb() -> int:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that over from
    the parent across fork and exec, so a child would report the bench process's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child_export(day: str, output: str) -> None:
    from training_export.services.export import export_run

    before_kb = peak_rss_kb()
    began, cpu_began = time.perf_counter(), time.process_time()
    run = export_run(data_type="events", start_date=day, end_date=day, output_dir=output, force=True)
    seconds, cpu_seconds = time.perf_counter() - began, time.process_time() - cpu_began
    peak_kb = peak_rss_kb()
    result = {"seconds": seconds, "cpu_seconds": cpu_seconds, "rows": run.rows, "path": run.path}
    print(json.dumps(result | {"rss_before_kb": before_kb, "rss_peak_kb": peak_kb}))


def bench_export(sizes: list[int], repeat: int, baseline: Path | None = None) -> list[dict]:
    rounds = []
    for index in range(len(sizes)):
        day = FIRST_DAY + dt.timedelta(days=index)
        start, end = day_bounds(day)
        count = Event.objects.filter(created_at__gte=start, created_at__lt=end).count()
        for n in range(repeat):
            directory = Path(tempfile.mkdtemp(prefix="bench-export-"))
            try:
                copy_path = directory / "copy.jsonl"
                copy_seconds, _ = copy_baseline(day, copy_path)
                copy_lines = valid_jsonl(copy_path)
                child = export_in_subprocess(day, directory / "export")
                export_lines = valid_jsonl(Path(child["path"]))
                old = None
                if baseline is not None:
                    old = export_in_subprocess(day, directory / "baseline", baseline)
                    if valid_jsonl(Path(old["path"])) != count:
                        raise SystemExit("the baseline export's line count differs from count(*)")
                    old["same_file"] = file_sha256(Path(old["path"])) == file_sha256(Path(child["path"]))
            finally:
                shutil.rmtree(directory)
            if not (copy_lines == export_lines == child["rows"] == count):
                raise SystemExit(f"counts differ: copy {copy_lines}, export {export_lines}, count(*) {count}")
            result = {
                "rows": count,
                "copy_per_s": count / copy_seconds,
                "export_per_s": count / child["seconds"],
                "export_cpu_us": child["cpu_seconds"] / count * 1e6,
                "rss_before_mb": child["rss_before_kb"] / 1024,
                "rss_peak_mb": child["rss_peak_kb"] / 1024,
            }
            line = (
                f"  export {count:,} rows round {n + 1}: COPY {result['copy_per_s']:,.0f}/s, "
                f"exporter {result['export_per_s']:,.0f}/s ({result['export_per_s'] / result['copy_per_s']:.2f}x), "
                f"CPU {result['export_cpu_us']:.1f} us/row, RSS {result['rss_before_mb']:.0f} -> "
                f"{result['rss_peak_mb']:.0f} MB"
            )
            if old is not None:
                result.update(
                    baseline_per_s=count / old["seconds"],
                    baseline_cpu_us=old["cpu_seconds"] / count * 1e6,
                    baseline_rss_peak_mb=old["rss_peak_kb"] / 1024,
                    same_file=old["same_file"],
                )
                line += (
                    f" | baseline exporter {result['baseline_per_s']:,.0f}/s "
                    f"({result['baseline_per_s'] / result['copy_per_s']:.2f}x), "
                    f"CPU {result['baseline_cpu_us']:.1f} us/row, RSS {old['rss_peak_kb'] / 1024:.0f} MB; "
                    f"identical file: {old['same_file']}"
                )
            rounds.append(result)
            print(line, flush=True)
    return rounds


def print_subject(rounds: list[dict], bare: float, label: str, prefix: str, same_label: str, *, same: str = "") -> None:
    """The medians line of a consumer subject beside the bare loop: its `<prefix>_per_s` and
    `<prefix>_cpu_us`, and whether every round's files matched (`same`, else `<prefix>_same_files`)."""
    rate = statistics.median(r[f"{prefix}_per_s"] for r in rounds)
    cpu = statistics.median(r[f"{prefix}_cpu_us"] for r in rounds)
    matched = all(r[same or f"{prefix}_same_files"] for r in rounds)
    print(
        f"| {label} | {rate:,.0f} events/s | | {rate / bare:.2f}x | CPU per entry {cpu:.1f} us "
        f"| {same_label}: {matched} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="200000,1000000", help="export sizes, comma-separated")
    parser.add_argument("--consumer-entries", type=int, default=200_000)
    parser.add_argument(
        "--consumer-batch", type=int, default=500, help="entries per read of the consumer (consume_events --batch)"
    )
    parser.add_argument(
        "--consumer-processes",
        type=int,
        default=2,
        help="also run this many consumers of one group in parallel (consume_events --processes); 1: not",
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-consumer", action="store_true", help="only the export benchmark")
    parser.add_argument("--skip-export", action="store_true", help="only the consumer benchmark")
    parser.add_argument(
        "--compare-git", metavar="REV", help="also run the pipeline modules as they are at this git revision"
    )
    parser.add_argument("--child-export", help=argparse.SUPPRESS)
    parser.add_argument("--child-consumer", help=argparse.SUPPRESS)
    parser.add_argument("--child-output", help=argparse.SUPPRESS)
    parser.add_argument("--child-baseline", help=argparse.SUPPRESS)
    parser.add_argument("--child-sibling", help=argparse.SUPPRESS)
    parser.add_argument("--child-stream", default=STREAM, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_export:
        child_export(args.child_export, args.child_output)
        return
    if args.child_consumer:
        child_consumer(
            args.child_consumer, args.child_output, args.consumer_batch, args.child_sibling, args.child_stream
        )
        return
    sizes = [int(size) for size in args.rows.split(",")]
    database_ensure(load_agents=False)
    for index, rows in enumerate(sizes):
        seed(FIRST_DAY + dt.timedelta(days=index), rows)

    baseline = baseline_sources(args.compare_git) if args.compare_git else None
    consumer = []
    export = []
    try:
        if not args.skip_consumer:
            print(f"consumer vs bare XREADGROUP/XACK on {args.consumer_entries:,} entries", flush=True)
            entries = min(args.consumer_entries, sizes[0])
            consumer = bench_consumer(entries, args.repeat, args.consumer_batch, baseline, args.consumer_processes)
        if not args.skip_export:
            print("exporter vs COPY row_to_json", flush=True)
            export = bench_export(sizes, args.repeat, baseline)
    finally:
        if baseline is not None:
            shutil.rmtree(baseline)

    print("\nmedians")
    if consumer:
        bare, ours, cpu, bare_cpu, relay, relay_without, built_cpu = (
            statistics.median(r[key] for r in consumer)
            for key in (
                "bare_per_s",
                "consumer_per_s",
                "consumer_cpu_us",
                "bare_cpu_us",
                "relay_cpu_us",
                "relay_without_rows_cpu_us",
                "built_cpu_us",
            )
        )
        print(
            f"| consumer | {ours:,.0f} events/s | bare loop {bare:,.0f}/s | {ours / bare:.2f}x (target >= 0.5x) "
            f"| CPU per entry {cpu:.1f} us vs {bare_cpu:.1f} us |"
        )
        print_subject(consumer, bare, "consumer, entries without the relay's rows", "built", "identical CSV files")
        print(
            f"| relay CPU per event | {relay:.1f} us making the rows | {relay_without:.1f} us without | "
            f"relay + consumer: {relay + cpu:.1f} us against {relay_without + built_cpu:.1f} us |"
        )
        if args.consumer_processes > 1:
            label = f"consumer with {args.consumer_processes} processes"
            print_subject(consumer, bare, label, "parallel", "same rows as 1 process", same="parallel_same_rows")
        if baseline is not None:
            label = f"consumer at {args.compare_git}"
            print_subject(consumer, bare, label, "baseline", "identical CSV files", same="same_files")
    for rows in sorted({r["rows"] for r in export}):
        mine = [r for r in export if r["rows"] == rows]
        copy = statistics.median(r["copy_per_s"] for r in mine)
        exp = statistics.median(r["export_per_s"] for r in mine)
        peak = max(r["rss_peak_mb"] for r in mine)
        before = statistics.median(r["rss_before_mb"] for r in mine)
        cpu = statistics.median(r["export_cpu_us"] for r in mine)
        print(
            f"| export {rows:,} | {exp:,.0f} rows/s | COPY {copy:,.0f}/s | {exp / copy:.2f}x (target >= 0.25x) "
            f"| CPU {cpu:.1f} us/row | RSS {before:.0f} -> {peak:.0f} MB |"
        )
        if baseline is not None:
            old = statistics.median(r["baseline_per_s"] for r in mine)
            old_cpu = statistics.median(r["baseline_cpu_us"] for r in mine)
            old_peak = max(r["baseline_rss_peak_mb"] for r in mine)
            same = all(r["same_file"] for r in mine)
            print(
                f"| export {rows:,} at {args.compare_git} | {old:,.0f} rows/s | | {old / copy:.2f}x "
                f"| CPU {old_cpu:.1f} us/row | RSS peak {old_peak:.0f} MB | identical files: {same} |"
            )


if __name__ == "__main__":
    main()
