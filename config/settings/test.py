"""Test settings: always PostgreSQL and Redis (a run on SQLite does not count)."""

import os
from urllib.parse import urlsplit, urlunsplit

from django.core.exceptions import ImproperlyConfigured

from config.env import env
from config.settings.base import *  # noqa: F403
from config.settings.base import (
    BROKER_QUEUE_ORDER,
    BROKER_SOCKET_TIMEOUT_SECONDS,
    BROKER_VISIBILITY_TIMEOUT_SECONDS,
    MIDDLEWARE,
    STORAGES,
    TASK_MAX_TIMEOUT_SECONDS,
    _database,
    check_visibility_timeout,
    database_vendor,
    longest_message_hold_seconds,
)

TEST_DATABASE_URL = env.str("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/agentledger")
DATABASES = {"default": _database(TEST_DATABASE_URL)}
if database_vendor(DATABASES["default"]) != "postgresql":
    raise ImproperlyConfigured("The test suite runs against PostgreSQL; DATABASE_URL names another database")
DATABASES["default"]["CONN_MAX_AGE"] = 0

# The suite's own python agents (tests/orchestration/edge_agents.py) and the factories' builtins.
AGENT_ENTRYPOINT_MODULES = [*AGENT_ENTRYPOINT_MODULES, "tests", "builtins"]  # noqa: F405

REDIS_URL = env.str("REDIS_URL", "redis://127.0.0.1:6379/9")
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", REDIS_URL)


def redis_database_after(url: str, offset: int) -> str:
    """`url` with its database index moved up by `offset` (redis://host:port/N)."""
    parts = urlsplit(url)
    path = parts.path.strip("/") or "0"
    if not path.isdigit():
        raise ImproperlyConfigured(f"a Redis URL of the tests names no database index: {parts.path!r}")
    index = int(path) + offset
    if index > 15:
        raise ImproperlyConfigured(
            f"pytest-xdist process {offset} would use Redis database {index}; Redis has 0-15 by default: "
            "use a lower index in REDIS_URL or fewer processes (-n)"
        )
    return urlunsplit(parts._replace(path=f"/{index}"))


# pytest-xdist runs the suite in several processes (`make test` uses it). Each has its own
# test database (pytest-django adds _gw0, _gw1, … to its name) and, from here, its own Redis
# database: process gwN uses REDIS_URL's index plus N, for the cache, the rate limits, the
# broker and the Synapse stream. The environment is updated too, so the workers and commands a
# test starts inherit the same URLs, and is marked, so their settings do not move them again.
_XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if _XDIST_WORKER and os.environ.get("AGENTLEDGER_TEST_REDIS_FOR") != _XDIST_WORKER:
    _offset = int(_XDIST_WORKER.removeprefix("gw"))
    REDIS_URL = redis_database_after(REDIS_URL, _offset)
    CELERY_BROKER_URL = redis_database_after(CELERY_BROKER_URL, _offset)
    os.environ.update(REDIS_URL=REDIS_URL, AGENTLEDGER_TEST_REDIS_FOR=_XDIST_WORKER)
    if "CELERY_BROKER_URL" in os.environ:  # otherwise it follows REDIS_URL
        os.environ["CELERY_BROKER_URL"] = CELERY_BROKER_URL
CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": BROKER_VISIBILITY_TIMEOUT_SECONDS,
    "socket_timeout": BROKER_SOCKET_TIMEOUT_SECONDS,
    "socket_connect_timeout": BROKER_SOCKET_TIMEOUT_SECONDS,
    "queue_order_strategy": BROKER_QUEUE_ORDER,
}

# Short limits so that retries, timeouts and the reaper play out in seconds. Worker
# subprocesses started by the tests use these same settings. A test whose soft time-out has
# work to record before the hard limit may give its workers and itself a longer grace
# (TASK_HARD_TIMEOUT_GRACE_SECONDS in their environment and its settings): on a loaded
# machine one second is not always enough.
TASK_HARD_TIMEOUT_GRACE_SECONDS = env.int("TASK_HARD_TIMEOUT_GRACE_SECONDS", 1, minimum=1)
TASK_RETRY_BACKOFF_BASE_SECONDS = 0.05
TASK_RETRY_BACKOFF_MAX_SECONDS = 2
REAPER_GRACE_SECONDS = 1
check_visibility_timeout(
    BROKER_VISIBILITY_TIMEOUT_SECONDS,
    longest_message_hold_seconds(
        TASK_MAX_TIMEOUT_SECONDS, TASK_HARD_TIMEOUT_GRACE_SECONDS, TASK_RETRY_BACKOFF_MAX_SECONDS
    ),
)

DEBUG = False
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
MIDDLEWARE = [m for m in MIDDLEWARE if m != "whitenoise.middleware.WhiteNoiseMiddleware"]
STORAGES = {**STORAGES, "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}}
