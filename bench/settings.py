"""Settings for bench/throughput.py: the test settings on a dedicated database and Redis
database, persistent connections as in production, and django-celery-results installed
for the peer run (its result backend is used only by tasks that keep results)."""

from config.env import env
from config.settings.base import _database
from config.settings.test import *  # noqa: F403
from config.settings.test import INSTALLED_APPS, LOGGING

DATABASES = {
    "default": _database(env.str("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/agentledger_bench"))
}
DATABASES["default"]["CONN_MAX_AGE"] = 600
REDIS_URL = env.str("BENCH_REDIS_URL", "redis://127.0.0.1:6379/8")
CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}
CELERY_BROKER_URL = REDIS_URL
INSTALLED_APPS = [*INSTALLED_APPS, "django_celery_results"]
CELERY_RESULT_BACKEND = "django-db"
CELERY_RESULT_EXTENDED = True
# LOGGING was built from LOG_LEVEL when the base settings were read: set its root level too,
# or the worker logs every task it receives and finishes (INFO) into the measured CPU time.
LOG_LEVEL = "WARNING"
LOGGING = {**LOGGING, "root": {**LOGGING["root"], "level": LOG_LEVEL}}
