"""Training-data exports over the API: admins only; a trigger validates everything up front,
answers 202 and a real worker exports the pending run; the download is the file, checked
against its sha256; a file changed on disk is 410 Gone."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from pathlib import Path

import pytest
from django.utils import timezone

from orchestration.event_types import EventType
from orchestration.models import Event
from tests.api.conftest import make_caller
from tests.engine import use_broker, wait_for
from tests.factories import EventFactory, ExportRunFactory
from training_export.models import ExportRun
from training_export.services.export import DATA_TYPES
from training_export.services.manifest import manifest_read

DAY = "2024-03-05"
T0 = dt.datetime(2024, 3, 5, 10, 0, tzinfo=dt.UTC)
EVENTS = {"data_type": "events", "start_date": DAY, "end_date": DAY}


@pytest.fixture
def out(settings, tmp_path: Path) -> Path:
    settings.TRAINING_EXPORT_DIR = tmp_path / "exports"
    return settings.TRAINING_EXPORT_DIR


def midnight(day: str) -> dt.datetime:
    return dt.datetime.combine(dt.date.fromisoformat(day), dt.time(), tzinfo=dt.UTC)


def problem_fields(response) -> list[str]:
    assert response.status_code == 400, response.content
    assert response["Content-Type"] == "application/problem+json"
    return [e["field"] for e in response.json()["errors"]]


@pytest.mark.django_db(transaction=True)
def test_a_triggered_export_runs_on_a_real_worker_and_downloads_intact(engine, out):
    for i in range(3):
        EventFactory(event_type=EventType.AGENT_STARTED, entity_id=f"e{i}", created_at=T0 + dt.timedelta(seconds=i))
    admin = make_caller("exporter", "admin").client

    accepted = admin.post("/api/v1/exports/", EVENTS, format="json")
    assert accepted.status_code == 202, accepted.content
    body = accepted.json()
    run_id = body["queued"][0]
    assert body["status"] == "accepted" and body["already_exported"] == []
    assert accepted["Location"].endswith(f"/api/v1/exports/{run_id}/")
    assert [r["status"] for r in body["runs"]] == ["pending"]
    assert body["runs"][0]["requested_by"] == "exporter" and body["runs"][0]["download"] is None
    assert ExportRun.objects.get(pk=run_id).status == ExportRun.Status.PENDING  # no worker yet

    worker = engine(queues="low", concurrency=1, env={"TRAINING_EXPORT_DIR": str(out)})
    run = wait_for(
        lambda: (
            admin.get(f"/api/v1/exports/{run_id}/").json() if ExportRun.objects.get(pk=run_id).finished_at else None
        ),
        timeout=60,
        what=f"the export run ({worker.log_path})",
    )
    assert run["status"] == "succeeded", run
    assert ExportRun.objects.count() == 1  # the worker took over the pending row
    directory = out / "events" / f"{DAY}_{DAY}"
    manifest = manifest_read(directory)
    data = (directory / "events-train.jsonl").read_bytes()
    assert run["path"] == f"events/{DAY}_{DAY}/events-train.jsonl"
    assert (run["rows"], run["bytes"], run["sha256"]) == (3, len(data), manifest["files"][0]["sha256"])
    assert (run["schema_version"], run["watermark"]) == (manifest["schema_version"], manifest["watermark"])
    assert (run["start_date"], run["end_date"]) == (DAY, DAY)
    assert str(out) not in json.dumps(run)

    completed = Event.objects.get(event_type=EventType.EXPORT_COMPLETED)
    assert (completed.entity_type, completed.entity_id) == ("export", str(run_id))
    assert completed.payload == {
        "data_type": "events",
        "format": "jsonl",
        "window": {"start": "2024-03-05T00:00:00+00:00", "end": "2024-03-06T00:00:00+00:00"},
        "rows": 3,
        "bytes": len(data),
        "sha256": manifest["files"][0]["sha256"],
        "path": run["path"],
    }

    download = admin.get(run["download"])
    assert download.status_code == 200
    content = b"".join(download.streaming_content)
    assert content == data
    assert hashlib.sha256(content).hexdigest() == manifest["files"][0]["sha256"]
    assert download["Content-Type"] == "application/x-ndjson"
    assert download["Content-Disposition"].startswith("attachment;")
    assert f"events_{DAY}_{DAY}.jsonl" in download["Content-Disposition"]
    assert download["ETag"] == f'"{run["sha256"]}"'
    assert download["Repr-Digest"] == f"sha-256=:{base64.b64encode(hashlib.sha256(data).digest()).decode()}:"
    jsonl = admin.get(run["download"], HTTP_ACCEPT="application/x-ndjson")
    assert jsonl.status_code == 200 and b"".join(jsonl.streaming_content) == data

    again = admin.post("/api/v1/exports/", EVENTS, format="json")
    assert again.status_code == 200, again.content
    assert again.json()["status"] == "already_exported"
    assert (again.json()["queued"], again.json()["already_exported"]) == ([], [run_id])
    assert "Location" not in again
    assert ExportRun.objects.count() == 1

    (directory / "events-train.jsonl").write_bytes(data.replace(b"e0", b"e9"))
    tampered = admin.get(run["download"])
    assert tampered.status_code == 410, tampered.content
    assert tampered["Content-Type"] == "application/problem+json"
    assert "no longer matches the sha256" in tampered.json()["detail"]

    # No longer intact, so the same request exports the window again; the old run is superseded.
    redo = admin.post("/api/v1/exports/", EVENTS, format="json")
    assert redo.status_code == 202 and redo.json()["already_exported"] == []
    new_id = redo.json()["queued"][0]
    wait_for(
        lambda: ExportRun.objects.get(pk=new_id).status == ExportRun.Status.SUCCEEDED,
        timeout=60,
        what=f"the second export ({worker.log_path})",
    )
    assert ExportRun.objects.get(pk=run_id).status == ExportRun.Status.SUPERSEDED
    superseded = admin.get(f"/api/v1/exports/{run_id}/download/")
    assert superseded.status_code == 409 and "superseded" in superseded.json()["detail"]
    assert b"".join(admin.get(f"/api/v1/exports/{new_id}/download/").streaming_content) == data
    assert Event.objects.filter(event_type=EventType.EXPORT_COMPLETED).count() == 2

    (directory / "events-train.jsonl").unlink()
    assert admin.get(f"/api/v1/exports/{new_id}/download/").status_code == 410


def test_trigger_input_problems_name_their_field_and_record_nothing(callers, out):
    admin = callers["admin"].client

    def post(**changes):
        return admin.post("/api/v1/exports/", {**EVENTS, **changes}, format="json")

    assert problem_fields(post(data_type="evnts")) == ["data_type"]
    assert problem_fields(post(start_date="05/03/2024")) == ["start_date"]
    assert problem_fields(post(start_date="2024-02-30")) == ["start_date"]
    assert problem_fields(post(start_date="2024-03-05T00:00:00Z")) == ["start_date"]
    assert problem_fields(post(start_date="2024-03-06")) == ["end_date"]
    too_long = post(start_date="2020-01-01", end_date="2024-03-05")
    assert problem_fields(too_long) == ["end_date"] and "at most 366" in too_long.json()["detail"]
    assert problem_fields(post(end_date="9999-12-31")) == ["end_date"]
    assert problem_fields(post(force="yes")) == ["force"]
    assert problem_fields(post(status="succeeded", rows=5)) == ["rows", "status"]
    assert problem_fields(admin.post("/api/v1/exports/", {}, format="json")) == ["data_type", "start_date", "end_date"]
    # A field the request may not send is named beside the fields it got wrong, not instead of them.
    assert sorted(problem_fields(post(data_type="evnts", force="yes", status="succeeded"))) == [
        "data_type",
        "force",
        "status",
    ]

    today = timezone.now().date().isoformat()
    early = post(start_date=today, end_date=today)
    assert early.status_code == 409, early.content
    assert early["Content-Type"] == "application/problem+json"
    assert "not closed yet" in early.json()["detail"] and "can be exported from" in early.json()["detail"]
    assert not ExportRun.objects.exists()


def test_all_queues_one_pending_run_per_type(callers, out, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks() as callbacks:
        response = callers["admin"].client.post("/api/v1/exports/", {**EVENTS, "data_type": "all"}, format="json")
    assert response.status_code == 202, response.content
    runs = response.json()["runs"]
    assert [r["data_type"] for r in runs] == list(DATA_TYPES)
    assert [r["format"] for r in runs] == ["jsonl"] * 4 + ["chat_jsonl"]
    assert response.json()["queued"] == [r["id"] for r in runs]
    stored = ExportRun.objects.filter(pk__in=response.json()["queued"])
    assert {(r.status, r.requested_by.username) for r in stored} == {("pending", "alice")}
    assert {(r.window_start, r.window_end) for r in stored} == {(midnight(DAY), midnight("2024-03-06"))}
    assert len(callbacks) == 1  # the tasks are sent after commit, never inside the transaction


@pytest.mark.django_db(transaction=True)
def test_an_export_requested_while_the_broker_is_down_is_accepted_and_queued_by_the_sweep(out, monkeypatch, caplog):
    """The pending run is committed before its task is sent. A broker that did not answer then
    failed the request with a 500, kombu's traceback in the log, although the run was recorded:
    a client retrying got that pending run back, queued by nothing until the export sweep. It
    is accepted, as a workflow is, and the sweep sends it once the broker answers."""
    from training_export.services.export import export_runs_sweep

    admin = make_caller("exporter", "admin").client
    use_broker(monkeypatch, "redis://127.0.0.1:1/0")  # nothing listens there
    admin.raise_request_exception = False

    response = admin.post("/api/v1/exports/", EVENTS, format="json")

    assert response.status_code == 202, response.content
    [run_id] = response.json()["queued"]
    assert ExportRun.objects.get(pk=run_id).status == ExportRun.Status.PENDING
    [record] = [r for r in caplog.records if r.getMessage().startswith("broker unreachable")]
    assert record.exc_info is None and not record.exc_text
    assert "OperationalError: Error 111 connecting to 127.0.0.1:1" in record.getMessage()
    assert f"1 export run(s) not queued, the export sweep queues them: {run_id}" in record.getMessage()
    monkeypatch.undo()  # the broker answers again
    assert export_runs_sweep(now=timezone.now() + dt.timedelta(days=1)).requeued == [run_id]


def test_an_export_whose_queue_declaration_is_retried_over_a_new_connection_is_queued(
    out, monkeypatch, tmp_path, transactional_db
):
    """A connection's first export request declares the `low` queue, retried over a new
    connection when the broker fails it: here writes stop (a failover pauses them) and resume by
    the retry. The message must then go out over the new connection, as a workflow's does: kombu
    published it on the channel the retry had closed, and raised an AttributeError after the
    commit, a 500 for a pending run."""
    import redis

    from tests.engine import PrivateRedis
    from training_export.tasks import export_run_task

    broker = PrivateRedis(tmp_path)
    use_broker(monkeypatch, broker.url, socket_timeout=2)
    app = export_run_task.app
    client = redis.Redis.from_url(broker.url)
    # kombu calls the policy's errback when a try has failed: the writes resume then.
    policy = {**(app.conf.task_publish_retry_policy or {}), "errback": lambda exc, interval: client.client_unpause()}
    monkeypatch.setitem(app.conf, "task_publish_retry_policy", policy)
    admin = make_caller("exporter", "admin").client
    admin.raise_request_exception = False
    client.client_pause(60_000, all=False)
    try:
        response = admin.post("/api/v1/exports/", EVENTS, format="json")

        assert response.status_code == 202, response.content
        [run_id] = response.json()["queued"]
        [message] = client.lrange("low", 0, -1)
        assert json.loads(message)["headers"]["argsrepr"] == f"[{run_id}]"
    finally:
        client.client_unpause()
        monkeypatch.undo()
        broker.stop()


def test_list_filters_orders_newest_first_and_pages_by_cursor(callers, out):
    admin = callers["admin"].client
    start = midnight(DAY)
    old = ExportRunFactory(
        data_type="tasks", status="failed", window_start=start, window_end=start + dt.timedelta(days=1)
    )
    chat = ExportRunFactory(
        data_type="conversations",
        format="chat_jsonl",
        status="succeeded",
        window_start=start,
        window_end=start + dt.timedelta(days=3),
        path="/somewhere/private/conversations/2024-03-05_2024-03-07/conversations-train.jsonl",
        error=None,
    )
    newest = ExportRunFactory(
        data_type="events",
        status="failed",
        window_start=start + dt.timedelta(days=10),
        window_end=start + dt.timedelta(days=11),
        error=f"OSError: [Errno 28] No space left on device: '{out}/events/x'",
    )

    def ids(query: str) -> list[int]:
        response = admin.get(f"/api/v1/exports/{query}")
        assert response.status_code == 200, response.content
        return [r["id"] for r in response.json()["results"]]

    assert ids("") == [newest.pk, chat.pk, old.pk]
    assert ids("?ordering=created_at") == [old.pk, chat.pk, newest.pk]
    assert ids("?data_type=tasks") == [old.pk]
    assert ids("?data_type=all") == [newest.pk, chat.pk, old.pk]  # every type, as in a trigger
    assert ids("?status=failed") == [newest.pk, old.pk]
    assert ids("?format=chat_jsonl") == [chat.pk]
    assert ids("?format=csv") == []
    assert ids(f"?start_date={DAY}") == [chat.pk, old.pk]
    assert ids("?end_date=2024-03-07") == [chat.pk]
    assert ids("?day=2024-03-06") == [chat.pk]
    first = admin.get("/api/v1/exports/?limit=2").json()
    assert [r["id"] for r in first["results"]] == [newest.pk, chat.pk]
    assert [r["id"] for r in admin.get(first["next"]).json()["results"]] == [old.pk]
    assert problem_fields(admin.get("/api/v1/exports/?format=")) == ["format"]
    assert problem_fields(admin.get("/api/v1/exports/?day=yesterday")) == ["day"]

    shown = admin.get(f"/api/v1/exports/{chat.pk}/").json()
    assert shown["path"] == "conversations/2024-03-05_2024-03-07/conversations-train.jsonl"
    assert (shown["start_date"], shown["end_date"]) == (DAY, "2024-03-07")
    assert shown["download"].endswith(f"/api/v1/exports/{chat.pk}/download/")
    failed = admin.get(f"/api/v1/exports/{newest.pk}/").json()
    assert str(out) not in failed["error"] and "<export dir>/events/x" in failed["error"]
    assert failed["download"] is None
    assert admin.get("/api/v1/exports/999999999/").status_code == 404
    assert admin.get("/api/v1/exports/99999999999999999999999/").status_code == 404


def test_list_dates_are_read_only_as_yyyy_mm_dd_as_a_request_to_export_reads_them(callers, out):
    """`?day=05/03/2024` (5 March, written day first) answered the runs of 3 May: the list read
    its dates in Django's default formats, month first (`05/03/2024`, `Mar 5 2024`, ...), which a
    request to export refuses. A day the API does not take must be a 400, not another day."""
    admin = callers["admin"].client
    may_3 = midnight("2024-05-03")
    ExportRunFactory(data_type="events", window_start=may_3, window_end=may_3 + dt.timedelta(days=1))
    for name in ("day", "start_date", "end_date"):
        for written in ("05/03/2024", "May 3 2024"):
            assert problem_fields(admin.get("/api/v1/exports/", {name: written})) == [name]
    refused = admin.post("/api/v1/exports/", {**EVENTS, "start_date": "05/03/2024"}, format="json")
    assert problem_fields(refused) == ["start_date"]
    assert [r["start_date"] for r in admin.get("/api/v1/exports/?day=2024-05-03").json()["results"]] == ["2024-05-03"]


def test_a_day_with_one_digit_month_or_day_is_refused_not_read(callers, out):
    """`%Y-%m-%d` reads `2024-3-5` as 5 March: the list answered that day's runs and a request
    to export queued it, though only YYYY-MM-DD is documented."""
    admin = callers["admin"].client
    march_5 = midnight("2024-03-05")
    ExportRunFactory(data_type="events", window_start=march_5, window_end=march_5 + dt.timedelta(days=1))
    for name in ("day", "start_date", "end_date"):
        for written in ("2024-3-5", "2024-03-5", "2024-3-05", " 2024-03-05 "):
            refused = admin.get("/api/v1/exports/", {name: written})
            assert problem_fields(refused) == [name]
            assert "YYYY-MM-DD" in refused.json()["errors"][0]["detail"]
        assert len(admin.get("/api/v1/exports/", {name: "2024-03-05"}).json()["results"]) == 1
    for field in ("start_date", "end_date"):
        refused = admin.post("/api/v1/exports/", {**EVENTS, field: "2024-3-5"}, format="json")
        assert problem_fields(refused) == [field]
        assert "YYYY-MM-DD" in refused.json()["errors"][0]["detail"]
    assert ExportRun.objects.count() == 1


def test_download_of_a_run_not_succeeded_is_a_conflict(callers, out):
    admin = callers["admin"].client
    for status in ("pending", "running", "failed"):
        run = ExportRunFactory(status=status)
        response = admin.get(f"/api/v1/exports/{run.pk}/download/")
        assert response.status_code == 409, response.content
        assert response["Content-Type"] == "application/problem+json"
        assert f"is {status}; only a succeeded run can be downloaded" in response.json()["detail"]


def test_a_key_narrowed_to_export_read_lists_but_cannot_trigger(callers, out):
    reader = make_caller("auditor", "admin", permissions=["export:read"])
    assert reader.client.get("/api/v1/exports/").status_code == 200
    refused = reader.client.post("/api/v1/exports/", EVENTS, format="json")
    assert refused.status_code == 403
    assert refused.json()["detail"] == "This API key does not grant export:create, which this operation needs."
    developer = callers["developer"].client.get("/api/v1/exports/")
    assert developer.status_code == 403
    assert developer.json()["detail"] == "Your role (developer) does not grant export:read, which this operation needs."
    assert "export:create" in callers["admin"].client.get("/api/v1/me/").json()["permissions"]


@pytest.mark.parametrize("day", ["2024-W10-2", "20240305", "2024-03-05T00:00:00"])
@pytest.mark.parametrize("field", ["start_date", "end_date"])
def test_a_day_in_another_iso_8601_form_is_refused_naming_the_field(db, out, field, day):
    """`2024-W10-2` is 5 March 2024 as an ISO week date: it was exported as that day."""
    admin = make_caller("exporter", "admin").client
    refused = admin.post("/api/v1/exports/", {**EVENTS, field: day}, format="json")
    assert problem_fields(refused) == [field]
    assert "YYYY-MM-DD" in refused.json()["errors"][0]["detail"]
    assert not ExportRun.objects.exists()


def test_a_conversations_exports_keys_file_downloads_checked_against_its_manifest(callers, out):
    """The keys file that joins a conversations export to its threads, tasks, attempts and tool
    calls was written beside the data file and listed in the manifest, but a client of the API
    could download only the data file."""
    from tests.factories import AgentFactory
    from tests.training_export.test_chat import thread
    from training_export.services.chat import KEYS_FILE
    from training_export.services.export import export_run

    admin = callers["admin"].client
    agent = AgentFactory()
    thread("t-1", agent, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}])
    run = export_run(data_type="conversations", start_date=DAY, end_date=DAY)
    directory = Path(run.path).parent
    keys = (directory / KEYS_FILE).read_bytes()
    sha256 = manifest_read(directory)["files"][1]["sha256"]

    download = admin.get(f"/api/v1/exports/{run.pk}/download/", {"file": "keys"})
    assert download.status_code == 200, download.content
    assert b"".join(download.streaming_content) == keys
    assert json.loads(keys)["instance_id"] == "t-1"
    assert download["ETag"] == f'"{sha256}"'
    assert f"conversations_{DAY}_{DAY}-keys.jsonl" in download["Content-Disposition"]
    data = admin.get(f"/api/v1/exports/{run.pk}/download/", {"file": "data"})
    assert b"".join(data.streaming_content) == Path(run.path).read_bytes()

    assert problem_fields(admin.get(f"/api/v1/exports/{run.pk}/download/", {"file": "manifest"})) == ["file"]
    events = ExportRunFactory(status=ExportRun.Status.SUCCEEDED, data_type="events")
    absent = admin.get(f"/api/v1/exports/{events.pk}/download/", {"file": "keys"})
    assert absent.status_code == 404 and "only a conversations export has a keys file" in absent.json()["detail"]

    (directory / KEYS_FILE).write_bytes(keys.replace(b"t-1", b"t-9"))
    tampered = admin.get(f"/api/v1/exports/{run.pk}/download/", {"file": "keys"})
    assert tampered.status_code == 410 and "keys file" in tampered.json()["detail"]
    manifest = manifest_read(directory)
    manifest["files"] = manifest["files"][:1]  # as a run written before keys files were
    (directory / "manifest.json").write_text(json.dumps(manifest))
    before = admin.get(f"/api/v1/exports/{run.pk}/download/", {"file": "keys"})
    assert before.status_code == 404 and "before keys files were" in before.json()["detail"]
