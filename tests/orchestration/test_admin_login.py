"""The console's sign-in: failed sign-ins are counted per user name in Redis, and past the
limit the form refuses that name without checking a password until the window ends."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from django.conf import settings as django_settings
from django.contrib.auth.hashers import get_hashers
from django.test import Client

from tests.engine import flush_redis
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

PASSWORD = "correct horse battery staple"  # the factory's


@pytest.fixture(autouse=True)
def clean_redis() -> Iterator[None]:
    flush_redis()
    yield
    flush_redis()


@pytest.fixture
def low_limit(settings):
    settings.CONSOLE_LOGIN_FAILURE_LIMIT = 3


def _sign_in(client: Client, username: str, password: str):
    return client.post("/admin/login/", {"username": username, "password": password, "next": "/admin/"})


def _hashes_counted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The passwords hashed from now on: every check of one, right or wrong, and of a name
    that does not exist, hashes it (`encode`, which `verify` calls too)."""
    hashed: list[str] = []
    for hasher in get_hashers():
        encode = type(hasher).encode

        def counted(self, password, *args, encode=encode, **kwargs):
            hashed.append(password)
            return encode(self, password, *args, **kwargs)

        monkeypatch.setattr(type(hasher), "encode", counted)
    return hashed


def test_past_the_limit_of_failed_sign_ins_even_the_right_password_is_refused(low_limit, monkeypatch):
    UserFactory(username="ops", role="admin")
    client = Client()
    hashed = _hashes_counted(monkeypatch)
    for guess in ("a", "b", "c"):
        assert _sign_in(client, "ops", guess).status_code == 200  # the form again, with its error
    assert hashed[-3:] == ["a", "b", "c"]  # each guess below the limit was checked
    hashed.clear()
    for password in (PASSWORD, "d"):
        refused = _sign_in(client, "ops", password)
        assert refused.status_code == 200
        assert "Too many failed sign-ins" in refused.content.decode()
    # No password was checked, the right one or another (each check is a slow hash; the
    # answer to a right password must not differ from a wrong one's by its cost either).
    assert hashed == []
    assert "_auth_user_id" not in client.session
    # Another user name has its own count.
    UserFactory(username="dev", role="developer")
    assert _sign_in(Client(), "dev", PASSWORD).status_code == 302


def test_the_count_is_shared_by_every_web_process_and_ends_with_its_window(low_limit):
    UserFactory(username="ops", role="admin")
    for guess in ("a", "b", "c"):
        _sign_in(Client(), "ops", guess)  # a new client each time: nothing kept in a session
    counters = redis.Redis.from_url(django_settings.REDIS_URL)
    (key,) = counters.keys("console_login_failures:*")
    assert int(counters.get(key)) == 3
    assert 0 < counters.ttl(key) <= django_settings.CONSOLE_LOGIN_FAILURE_WINDOW_SECONDS
    assert b"ops" not in key  # the name is hashed: nothing a client typed becomes a key
    counters.delete(key)  # the window ended
    assert _sign_in(Client(), "ops", PASSWORD).status_code == 302


def test_a_user_name_that_does_not_exist_is_counted_the_same(low_limit):
    for guess in ("a", "b", "c"):
        _sign_in(Client(), "nobody", guess)
    assert "Too many failed sign-ins" in _sign_in(Client(), "nobody", "d").content.decode()


def test_with_redis_down_sign_in_is_refused_saying_so(settings):
    UserFactory(username="ops", role="admin")
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    response = _sign_in(Client(), "ops", PASSWORD)
    assert response.status_code == 200
    page = response.content.decode()
    assert "Failed sign-ins are counted in Redis, which is not answering" in page
    assert "127.0.0.1:1" not in page
