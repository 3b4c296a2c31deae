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

# An experiment, not a setting to deploy: BENCH_SYNCHRONOUS_COMMIT=off lets every commit of
# the benchmark's processes (this one and the worker it starts) return before its WAL reaches
# the disk. A PostgreSQL crash then loses the last commits, which the broker may already have
# acknowledged, so the record is no longer exact. It measures how much of a run is waiting
# for the disk (docs/benchmarks.md).
BENCH_SYNCHRONOUS_COMMIT = env.choice("BENCH_SYNCHRONOUS_COMMIT", "on", ["on", "off"])
if BENCH_SYNCHRONOUS_COMMIT == "off":
    _options = DATABASES["default"].setdefault("OPTIONS", {})
    _options["options"] = " ".join(filter(None, [_options.get("options"), "-c synchronous_commit=off"]))
