"""Test settings: always PostgreSQL and Redis (a run on SQLite does not count)."""

from django.core.exceptions import ImproperlyConfigured

from config.env import env
from config.settings.base import *  # noqa: F403
from config.settings.base import (
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

REDIS_URL = env.str("REDIS_URL", "redis://127.0.0.1:6379/9")
CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", REDIS_URL)
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": BROKER_VISIBILITY_TIMEOUT_SECONDS,
    "socket_timeout": BROKER_SOCKET_TIMEOUT_SECONDS,
    "socket_connect_timeout": BROKER_SOCKET_TIMEOUT_SECONDS,
}

# Short limits so that retries, timeouts and the reaper play out in seconds. Worker
# subprocesses started by the tests use these same settings.
TASK_HARD_TIMEOUT_GRACE_SECONDS = 1
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
