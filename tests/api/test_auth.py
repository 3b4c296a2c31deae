"""API keys: the key is shown once, only a hash is stored; revoked, expired, malformed and
unknown keys are refused with 401; last_used_at is written at most once a minute; session
authentication works for the browser; the command and the console create keys."""

from __future__ import annotations

import datetime as dt
import io
import re

import pytest
from django.core.management import CommandError, call_command
from django.db import close_old_connections, connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from orchestration.db import database_now
from orchestration.errors import SpecError
from orchestration.models import ApiKey
from orchestration.services.access import api_key_create, api_key_rotate, api_key_secret_hash
from tests.api.conftest import make_caller
from tests.factories import UserFactory
from tests.pg import other_connection

PROBLEM = "application/problem+json"
KEY_RE = r"al_[0-9a-f]{8}_[A-Za-z0-9_\-]{40,}"


def _bearer(key: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client


def test_the_secret_is_never_stored_only_its_hash(db):
    user = UserFactory(role="developer")
    created = api_key_create(owner=user, name="ci")
    scheme, prefix, secret = created.key.split("_", 2)
    assert scheme == "al" and prefix == created.api_key.prefix and len(secret) >= 40
    row = ApiKey.objects.filter(pk=created.api_key.pk).values().get()
    assert row["secret_hash"] == api_key_secret_hash(secret)
    assert not any(secret in str(value) for value in row.values())


def test_a_valid_key_authenticates_as_its_owner(db):
    caller = make_caller("dev", "developer")
    response = caller.client.get("/api/v1/me/")
    assert response.status_code == 200
    body = response.json()
    assert body["username"] == "dev" and body["role"] == "developer"
    assert body["authentication"] == "api_key"
    assert body["api_key"]["prefix"] == caller.key.split("_")[1]
    assert body["permissions"] == ["agent:execute", "workflow:create", "workflow:read"]


@pytest.mark.parametrize(
    "mangle, detail",
    [
        (lambda key: key[:-1] + ("A" if key[-1] != "A" else "B"), "Invalid API key."),
        (lambda key: "al_ffffffff_" + key.split("_", 2)[2], "Invalid API key."),
        (lambda key: "sk-" + key, "The API key is malformed (expected al_<prefix>_<secret>)."),
        (lambda key: key + " extra", "The Authorization header must be 'Bearer <API key>'."),
    ],
    ids=["wrong-secret", "unknown-prefix", "malformed", "two-tokens"],
)
def test_bad_keys_are_a_401_problem_with_a_challenge(db, mangle, detail):
    caller = make_caller("dev", "developer")
    response = _bearer(mangle(caller.key)).get("/api/v1/me/")
    assert response.status_code == 401
    assert response["Content-Type"] == PROBLEM
    assert response["WWW-Authenticate"] == 'Bearer realm="api"'
    assert response.json()["detail"] == detail


def test_no_credentials_is_a_401(db, anonymous):
    response = anonymous.get("/api/v1/workflows/")
    assert response.status_code == 401
    assert response.json()["title"] == "Not authenticated"


def test_revoked_and_expired_keys_are_refused(db):
    revoked = make_caller("r", "developer")
    ApiKey.objects.filter(owner=revoked.user).update(revoked_at=timezone.now())
    assert revoked.client.get("/api/v1/me/").json()["detail"] == "This API key has been revoked."

    expired = make_caller("x", "developer")
    ApiKey.objects.filter(owner=expired.user).update(expires_at=timezone.now() - dt.timedelta(seconds=1))
    response = expired.client.get("/api/v1/me/")
    assert response.status_code == 401
    assert response.json()["detail"] == "This API key has expired."


def test_a_key_expires_on_the_database_s_clock_not_the_web_host_s(db, monkeypatch):
    """A web host whose clock ran two minutes behind served a key that had expired a minute
    before, for as long as its clock was off (the times hosts compare are the database's)."""
    expired = make_caller("x", "developer")
    ApiKey.objects.filter(owner=expired.user).update(expires_at=database_now() - dt.timedelta(seconds=60))
    unexpired = make_caller("y", "developer")
    ApiKey.objects.filter(owner=unexpired.user).update(expires_at=database_now() + dt.timedelta(seconds=60))
    real_now = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: real_now() - dt.timedelta(seconds=120))
    response = expired.client.get("/api/v1/me/")
    assert response.status_code == 401
    assert response.json()["detail"] == "This API key has expired."
    # ...and one whose host runs ahead serves a key until its expiry.
    monkeypatch.setattr(timezone, "now", lambda: real_now() + dt.timedelta(seconds=120))
    assert unexpired.client.get("/api/v1/me/").status_code == 200


def test_an_inactive_owner_cannot_use_their_key(db):
    caller = make_caller("gone", "developer")
    caller.user.is_active = False
    caller.user.save(update_fields=["is_active"])
    assert caller.client.get("/api/v1/me/").status_code == 401


def test_last_used_at_is_written_at_most_once_a_minute(db):
    caller = make_caller("dev", "developer")
    key = ApiKey.objects.get(owner=caller.user)
    assert key.last_used_at is None
    caller.client.get("/api/v1/me/")
    first = ApiKey.objects.get(pk=key.pk).last_used_at
    assert first is not None

    with CaptureQueriesContext(connection) as queries:
        caller.client.get("/api/v1/me/")
    assert not [q for q in queries.captured_queries if q["sql"].startswith("UPDATE")]
    assert ApiKey.objects.get(pk=key.pk).last_used_at == first

    ApiKey.objects.filter(pk=key.pk).update(last_used_at=first - dt.timedelta(minutes=2))
    caller.client.get("/api/v1/me/")
    assert ApiKey.objects.get(pk=key.pk).last_used_at >= first


def test_a_key_narrowed_to_read_cannot_submit(db, agents):
    caller = make_caller("dev", "developer", permissions=["workflow:read"])
    assert caller.client.get("/api/v1/workflows/").status_code == 200
    response = caller.client.post("/api/v1/workflows/", {"name": "x", "tasks": []}, format="json")
    assert response.status_code == 403
    assert "This API key does not grant workflow:create" in response.json()["detail"]
    assert caller.client.get("/api/v1/me/").json()["permissions"] == ["workflow:read"]


def test_a_refusal_blames_the_role_when_the_key_lists_a_permission_the_role_lacks(db, agents):
    """A developer's key listing export:read was refused with "This API key does not grant
    export:read": the key does list it; the developer role is what does not grant it."""
    from django.contrib.auth.models import Group

    # Made while they were an admin; then their role became developer.
    caller = make_caller("dev", "admin", permissions=["export:read", "workflow:read"])
    caller.user.groups.set([Group.objects.get(name="developer")])
    response = caller.client.get("/api/v1/exports/")
    assert response.status_code == 403
    assert response.json()["detail"] == "Your role (developer) does not grant export:read, which this operation needs."


def test_key_creation_reports_every_problem(db):
    user = UserFactory()
    api_key_create(owner=user, name="ci")
    with pytest.raises(SpecError) as info:
        api_key_create(owner=user, name="ci", expires_at=timezone.now() - dt.timedelta(days=1), permissions=["root"])
    problems = "; ".join(info.value.problems)
    assert "already has a key named 'ci'" in problems
    assert "is in the past" in problems
    assert "permissions: unknown root" in problems


def test_a_key_cannot_list_a_permission_its_owner_s_role_does_not_grant(db, agents):
    """It could never be used for it: `create_api_key vic --permission workflow:create` made a
    key whose /me/ listed no permission, and said nothing."""
    viewer = UserFactory(username="vic", role="viewer")
    with pytest.raises(SpecError) as info:
        api_key_create(owner=viewer, name="ci", permissions=["workflow:read", "workflow:create", "export:read"])
    assert info.value.problems == [
        "permissions: vic's role (viewer) does not grant export:read, workflow:create, so the key never "
        "could (the role grants agent:list, workflow:read)"
    ]
    roleless = UserFactory(username="nobody")
    with pytest.raises(SpecError, match=r"nobody has no role .* could not grant workflow:read; give them a role first"):
        api_key_create(owner=roleless, name="ci", permissions=["workflow:read"])
    with pytest.raises(CommandError, match=r"vic's role \(viewer\) does not grant workflow:create"):
        call_command("create_api_key", "vic", "--name", "ci", "--permission", "workflow:create", stdout=io.StringIO())
    assert not ApiKey.objects.exists()
    # Within the role, or none listed (the role's own, whatever it becomes), a key is made.
    api_key_create(owner=viewer, name="reader", permissions=["workflow:read"])
    api_key_create(owner=roleless, name="later")
    assert ApiKey.objects.count() == 2


def test_session_authentication_needs_the_csrf_token_for_writes(db, agents):
    user = UserFactory(username="browser", role="developer")
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(user)
    me = client.get("/api/v1/me/")
    assert me.status_code == 200 and me.json()["authentication"] == "session"
    refused = client.post("/api/v1/workflows/", {"name": "x", "tasks": []}, format="json")
    assert refused.status_code == 403
    assert "CSRF" in refused.json()["detail"]


def test_create_api_key_command_prints_the_key_once_and_it_works(db):
    UserFactory(username="ops", role="viewer")
    out, err = io.StringIO(), io.StringIO()
    call_command("create_api_key", "ops", "--name", "grafana", "--expires", "30", stdout=out, stderr=err)
    key = out.getvalue().strip()
    assert re.fullmatch(KEY_RE, key)
    assert "not shown again" in err.getvalue()
    stored = ApiKey.objects.get(name="grafana")
    assert stored.expires_at > timezone.now() + dt.timedelta(days=29)
    assert _bearer(key).get("/api/v1/me/").json()["username"] == "ops"


def test_create_api_key_command_errors_name_the_problem(db):
    with pytest.raises(CommandError, match="no user named 'ghost'"):
        call_command("create_api_key", "ghost", "--name", "x", stdout=io.StringIO(), stderr=io.StringIO())
    UserFactory(username="ops")
    with pytest.raises(CommandError, match="--expires 'soon'"):
        call_command("create_api_key", "ops", "--name", "x", "--expires", "soon", stderr=io.StringIO())
    with pytest.raises(CommandError, match="permissions: unknown admin:all"):
        call_command("create_api_key", "ops", "--name", "x", "--permission", "admin:all", stderr=io.StringIO())
    assert not ApiKey.objects.exists()


@pytest.mark.parametrize(
    ("expires", "problem"),
    [
        ("0", "--expires '0': give at least 1 day"),
        ("2020-01-01T00:00:00Z", "--expires '2020-01-01T00:00:00Z' is in the past"),
    ],
)
def test_create_api_key_command_names_its_option_for_an_expiry_not_in_the_future(db, expires, problem):
    """It said "expires_at 2026-...: is in the past", a name the command does not have, and for
    `--expires 0` a time the user never gave."""
    UserFactory(username="ops")
    with pytest.raises(CommandError) as refused:
        call_command("create_api_key", "ops", "--name", "x", "--expires", expires, stderr=io.StringIO())
    assert str(refused.value) == problem
    assert not ApiKey.objects.exists()


@pytest.mark.parametrize(
    ("expires", "problem"),
    [
        ("2030-13-01T00:00:00Z", "month must be in 1..12"),
        ("2030-01-01T00:00:00+25:00", "offset must be"),
        ("3000000", "too many days"),
        ("99999999999", "too many days"),
        ("9999-12-31T23:00:00-01:00", "after 9999-12-31 UTC"),
    ],
)
def test_create_api_key_command_refuses_an_expiry_out_of_range(db, expires, problem):
    UserFactory(username="ops")
    with pytest.raises(CommandError, match=re.escape(problem)):
        call_command("create_api_key", "ops", "--name", "x", "--expires", expires, stderr=io.StringIO())
    assert not ApiKey.objects.exists()


@pytest.mark.parametrize(
    "expires",
    [
        "2030-W01-1T00:00Z",  # a week date: Monday 31 December 2029
        "20300101T000000Z",  # the basic format
        "2030-01-01T10Z",  # an hour alone
        "2030-01-01T00:00:00+05:30:15",  # an offset with seconds
        "\u0663",  # ARABIC-INDIC DIGIT THREE: int() reads it as 3
        "\uff15",  # FULLWIDTH DIGIT FIVE
        "\u00b2",  # SUPERSCRIPT TWO: a digit to str.isdigit(), a ValueError to int()
    ],
)
def test_create_api_key_command_reads_only_the_documented_forms_of_expiry(db, expires):
    """Django's parser, which the command used, reads week dates, the basic format and a bare
    hour (and str.isdigit() other scripts' digits): each made a key, expiring at a moment the
    operator may not have meant; a superscript digit was a traceback."""
    UserFactory(username="ops")
    with pytest.raises(CommandError) as refused:
        call_command("create_api_key", "ops", "--name", "x", "--expires", expires, stderr=io.StringIO())
    assert str(refused.value) == (
        f"--expires {expires!r}: give a number of days or an ISO 8601 date-time with a time zone, "
        "YYYY-MM-DDThh:mm[:ss] and Z or +hh:mm"
    )
    assert not ApiKey.objects.exists()
    # The documented forms are read as before.
    for name, expires in (
        ("space", "2030-01-01 00:00+00:00"),
        ("offset", "2030-01-01T05:30:00.5+05:30"),
        ("days", "007"),
    ):
        call_command(
            "create_api_key", "ops", "--name", name, "--expires", expires, stdout=io.StringIO(), stderr=io.StringIO()
        )
    stored = dict(ApiKey.objects.values_list("name", "expires_at"))
    assert stored["space"] == dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    assert stored["offset"] == dt.datetime(2030, 1, 1, 0, 0, 0, 500000, tzinfo=dt.UTC)
    assert dt.timedelta(days=6, hours=23) < stored["days"] - timezone.now() <= dt.timedelta(days=7)


def test_an_expiry_past_year_9999_in_utc_is_refused_not_stored_unreadable(db):
    # 9999-12-31T23:00-01:00 is 10000-01-01 UTC: PostgreSQL stores it, psycopg cannot read it
    # back, and every query loading the row (the key's own requests, the console's list) fails.
    user = UserFactory(username="ops")
    late = dt.datetime(9999, 12, 31, 23, tzinfo=dt.timezone(dt.timedelta(hours=-1)))
    with pytest.raises(SpecError, match="after 9999-12-31 UTC"):
        api_key_create(owner=user, name="x", expires_at=late)
    created = api_key_create(owner=user, name="y", expires_at=late.replace(tzinfo=dt.timezone(dt.timedelta(hours=1))))
    assert ApiKey.objects.get(pk=created.api_key.pk).expires_at == dt.datetime(9999, 12, 31, 22, tzinfo=dt.UTC)


def test_console_creates_a_key_and_shows_the_secret_once(db, client):
    admin_user = UserFactory(username="root", is_staff=True, is_superuser=True)
    owner = UserFactory(username="svc", role="developer")
    client.force_login(admin_user)
    changelist = client.get(reverse("admin:orchestration_apikey_changelist"))
    assert reverse("admin:orchestration_apikey_create_key").encode() in changelist.content
    response = client.post(
        reverse("admin:orchestration_apikey_create_key"),
        {"owner": owner.pk, "name": "deploy", "permissions": ["workflow:read"]},
        follow=True,
    )
    shown = " ".join(str(m) for m in response.context["messages"])
    key = re.search(KEY_RE, shown).group(0)
    assert _bearer(key).get("/api/v1/me/").json()["permissions"] == ["workflow:read"]
    created = ApiKey.objects.get(owner=owner)
    again = client.get(reverse("admin:orchestration_apikey_change", args=[created.pk]))
    assert key.encode() not in again.content


def test_console_rotation_replaces_the_key_and_revokes_the_old_one(db, client):
    admin_user = UserFactory(username="root", is_staff=True, is_superuser=True)
    caller = make_caller("svc", "developer")
    old = ApiKey.objects.get(owner=caller.user)
    client.force_login(admin_user)
    response = client.post(
        reverse("admin:orchestration_apikey_changelist"),
        {"action": "rotate_selected", "_selected_action": [old.pk]},
        follow=True,
    )
    key = re.search(KEY_RE, " ".join(str(m) for m in response.context["messages"])).group(0)
    assert caller.client.get("/api/v1/me/").status_code == 401
    assert _bearer(key).get("/api/v1/me/").json()["username"] == "svc"


def test_a_viewer_in_the_console_cannot_create_keys(db, client):
    client.force_login(UserFactory(username="v", role="viewer"))
    assert client.get(reverse("admin:orchestration_apikey_create_key")).status_code == 403


def test_rotation_keeps_long_names_within_the_limit_and_refuses_expired_keys(db):
    owner = UserFactory(username="long", role="developer")
    now = timezone.now()
    long = api_key_create(owner=owner, name="n" * 100, now=now).api_key
    rotated = api_key_rotate(api_key_id=long.pk, now=now)
    assert len(rotated.api_key.name) == 100 and rotated.api_key.name.endswith(f"(rotated {now:%Y-%m-%d %H:%M:%S})")
    soon = api_key_create(owner=owner, name="short-lived", expires_at=now + dt.timedelta(seconds=1), now=now).api_key
    with pytest.raises(SpecError, match=f"key {soon.prefix} has expired; create a new key instead"):
        api_key_rotate(api_key_id=soon.pk, now=now + dt.timedelta(seconds=2))
    assert ApiKey.objects.filter(owner=owner).count() == 3, "nothing created for the expired key"


def test_console_rotation_needs_the_right_to_create_keys(db, client):
    from django.contrib.auth.models import Permission

    staff = UserFactory(username="changer", is_staff=True)
    codenames = ["change_apikey", "view_apikey"]
    permissions = Permission.objects.filter(codename__in=codenames, content_type__app_label="orchestration")
    staff.user_permissions.add(*permissions)
    caller = make_caller("svc2", "developer")
    old = ApiKey.objects.get(owner=caller.user)
    client.force_login(staff)
    response = client.post(
        reverse("admin:orchestration_apikey_changelist"),
        {"action": "rotate_selected", "_selected_action": [old.pk]},
        follow=True,
    )
    assert response.status_code == 200
    assert ApiKey.objects.filter(owner=caller.user).count() == 1, "no key minted"
    assert caller.client.get("/api/v1/me/").status_code == 200, "the old key still works"


def test_a_persistent_connection_that_died_between_requests_is_replaced_before_the_key_lookup(persistent_connection):
    """The key lookup runs prepared on psycopg's own cursor, which Django's health check does
    not guard: it runs the check itself first, so a request after PostgreSQL dropped the
    connection (a restart, an idle timeout) reconnects instead of answering 500."""
    caller = make_caller("persistent", "viewer")
    assert caller.client.get("/api/v1/me/").status_code == 200
    dead_pid = connection.connection.info.backend_pid  # kept open after the request
    with other_connection() as other:
        assert other.execute("SELECT pg_terminate_backend(%s)", [dead_pid]).fetchone() == (True,)
    # What request_started runs in a server (the test client disconnects it): the
    # connection is kept (not expired, no error seen) and its health check is due.
    close_old_connections()
    response = caller.client.get("/api/v1/me/")
    assert response.status_code == 200, response.content
    assert response.json()["role"] == "viewer"
    new_pid = connection.connection.info.backend_pid
    assert new_pid != dead_pid
    close_old_connections()  # a healthy connection passes the check and is kept
    assert caller.client.get("/api/v1/me/").status_code == 200
    assert connection.connection.info.backend_pid == new_pid and connection.health_check_done


def test_the_prepared_key_lookup_is_in_the_query_log_and_raises_django_errors(db):
    """What a request costs stays visible (DEBUG, CaptureQueriesContext), and a database
    error in the lookup is Django's, like any ORM query's."""
    from django.db import ProgrammingError

    from orchestration.db import prepared_cursor

    caller = make_caller("logged", "viewer")
    with CaptureQueriesContext(connection) as queries:
        assert caller.client.get("/api/v1/me/").status_code == 200
    assert "api_keys" in queries.captured_queries[0]["sql"]
    with pytest.raises(ProgrammingError), prepared_cursor(connection) as cursor:
        cursor.execute("SELECT no_such_column FROM api_keys", prepare=True)


def test_a_failing_key_lookup_on_a_live_connection_is_an_error_not_a_reconnection(persistent_connection, monkeypatch):
    """The lookup stands in for the health check, but only a connection that fails the
    check too is replaced: a statement error is raised (here a 500), the connection kept."""
    from orchestration.api.authentication import _key_lookup

    caller = make_caller("broken", "viewer")
    assert caller.client.get("/api/v1/me/").status_code == 200
    pid = connection.connection.info.backend_pid
    lookup = _key_lookup(connection.alias, connection.vendor)
    monkeypatch.setattr(lookup, "sql", lookup.sql.replace("LIMIT 1", "LIMIT 1 + no_such_column"))
    close_old_connections()
    client = caller.client
    client.raise_request_exception = False
    assert client.get("/api/v1/me/").status_code == 500
    assert connection.connection.info.backend_pid == pid


def test_a_column_type_changed_by_a_migration_does_not_break_the_prepared_lookup(persistent_connection):
    """Another process's migration changes the type of a column the prepared lookup returns:
    PostgreSQL refuses the statement ("cached plan must not change result type") on every
    connection that prepared it, and psycopg keeps it. That connection is replaced, as a
    dead one is, instead of answering 500 on every request until it expires."""
    caller = make_caller("migrated", "viewer")
    with other_connection() as other:
        try:
            assert caller.client.get("/api/v1/me/").status_code == 200
            pid = connection.connection.info.backend_pid
            other.execute("ALTER TABLE api_keys ALTER COLUMN name TYPE varchar(101)")
            close_old_connections()
            response = caller.client.get("/api/v1/me/")
            assert response.status_code == 200, response.content
            assert connection.connection.info.backend_pid != pid
        finally:
            connection.close()
            other.execute("ALTER TABLE api_keys ALTER COLUMN name TYPE varchar(100)")


@pytest.mark.parametrize("prepared", [True, False])
def test_prepared_statements_can_be_turned_off_for_a_pooler_that_cannot_keep_them(transactional_db, settings, prepared):
    """DATABASE_PREPARED_STATEMENTS=false (PgBouncer in transaction mode before 1.21): the key
    lookup is answered the same, and nothing is left prepared on the server session."""
    settings.DATABASE_PREPARED_STATEMENTS = prepared
    connection.close()
    caller = make_caller(f"pooled-{prepared}", "viewer")
    assert caller.client.get("/api/v1/me/").json()["role"] == "viewer"
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        statements = [row[0] for row in cursor.fetchall()]
    assert any("api_keys" in statement for statement in statements) is prepared


def test_keys_created_rotated_and_revoked_are_in_the_audit_log_without_their_secret(db, client):
    from orchestration.models import Event

    admin_user = UserFactory(username="root", is_staff=True, is_superuser=True)
    caller = make_caller("svc", "developer", permissions=["workflow:read"])
    old = ApiKey.objects.get(owner=caller.user)
    client.force_login(admin_user)
    client.post(
        reverse("admin:orchestration_apikey_changelist"), {"action": "rotate_selected", "_selected_action": [old.pk]}
    )
    new = ApiKey.objects.exclude(pk=old.pk).get(owner=caller.user)
    client.post(
        reverse("admin:orchestration_apikey_changelist"), {"action": "revoke_selected", "_selected_action": [new.pk]}
    )
    out = io.StringIO()
    call_command("create_api_key", "svc", "--name", "cli", stdout=out, stderr=io.StringIO())

    events = list(Event.objects.filter(entity_type="api_key").order_by("sequence"))
    summary = [(e.event_type, e.entity_id, e.payload.get("via"), e.payload.get("by")) for e in events]
    assert summary[:4] == [
        ("api_key_created", str(old.pk), None, None),  # made by the test itself, outside any console
        ("api_key_created", str(new.pk), "console", "root"),
        ("api_key_revoked", str(old.pk), "console", "root"),
        ("api_key_revoked", str(new.pk), "console", "root"),
    ]
    assert summary[4][:3] == ("api_key_created", str(ApiKey.objects.get(name="cli").pk), "manage.py create_api_key")
    assert events[1].payload["rotated_from"] == old.prefix and events[2].payload["rotated_to"] == new.prefix
    assert events[0].payload["permissions"] == ["workflow:read"] and events[0].payload["owner"] == "svc"
    secret_parts = [caller.key.split("_", 2)[2], out.getvalue().strip().split("_", 2)[2]]
    assert not [part for part in secret_parts for e in events if part in str(e.payload)]


def test_a_key_whose_owner_s_role_narrowed_is_rotated_as_it_was(db, agents):
    """Replacing a leaked key is never refused: it keeps its permissions though the role no
    longer grants one (the role still decides what the key does)."""
    from django.contrib.auth.models import Group

    caller = make_caller("dev", "admin", permissions=["export:read", "workflow:read"])
    caller.user.groups.set([Group.objects.get(name="developer")])
    rotated = api_key_rotate(api_key_id=ApiKey.objects.get(owner=caller.user).pk, now=timezone.now())
    assert rotated.api_key.permissions == ["export:read", "workflow:read"]
