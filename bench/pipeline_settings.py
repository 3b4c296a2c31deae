"""Settings for bench/pipeline.py: the test settings on a dedicated database and Redis
database (agentledger_bench_pipeline, Redis db 14), persistent connections as in production."""

from config.env import env
from config.settings.base import _database
from config.settings.test import *  # noqa: F403

DATABASES = {
    "default": _database(
        env.str("BENCH_PIPELINE_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/agentledger_bench_pipeline")
    )
}
DATABASES["default"]["CONN_MAX_AGE"] = 600
REDIS_URL = env.str("BENCH_PIPELINE_REDIS_URL", "redis://127.0.0.1:6379/14")
CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}
CELERY_BROKER_URL = REDIS_URL
