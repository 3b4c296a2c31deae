"""Settings for bench/api.py: the test settings on their own database and Redis database,
persistent connections as in production, rate limits out of the way."""

from config.env import env
from config.settings.base import _database
from config.settings.test import *  # noqa: F403

DATABASES = {
    "default": _database(env.str("BENCH_API_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/agentledger_bench_api"))
}
DATABASES["default"]["CONN_MAX_AGE"] = 600
REDIS_URL = env.str("BENCH_API_REDIS_URL", "redis://127.0.0.1:6379/7")
CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}
CELERY_BROKER_URL = REDIS_URL
API_RATE_LIMITS = {"admin": 10_000_000, "developer": 10_000_000, "viewer": 10_000_000}
LOG_LEVEL = "WARNING"
ALLOWED_HOSTS = ["testserver", "localhost", "127.0.0.1"]
ROOT_URLCONF = "bench.api_urls"  # the project's URLs and the floor view after them
