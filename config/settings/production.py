"""Production: every secret and host comes from the environment, HTTPS everywhere.

Passes `manage.py check --deploy` with no warnings when the variables in .env.example's
production section are set.
"""

from django.core.exceptions import ImproperlyConfigured

from config.env import env
from config.settings.base import *  # noqa: F403
from config.settings.base import CELERY_BROKER_URL, DATABASES, REDIS_URL, database_vendor

DEBUG = False
SECRET_KEY = env.str("SECRET_KEY", required=True)
# Django's own deploy check (security.W009), at start: 50 characters, 5 of them distinct, not
# one of its generated placeholders; `check --deploy` is not something every deployment runs.
if (
    len(SECRET_KEY) < 50
    or len(set(SECRET_KEY)) < 5
    or SECRET_KEY.startswith("insecure-")
    or SECRET_KEY.startswith("django-insecure-")
):
    raise ImproperlyConfigured(
        "SECRET_KEY must be a random value of at least 50 characters (5 or more of them distinct) in production"
    )
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS")
if not ALLOWED_HOSTS:
    raise ImproperlyConfigured("ALLOWED_HOSTS must be set in production")
if database_vendor(DATABASES["default"]) != "postgresql":
    raise ImproperlyConfigured("Production runs on PostgreSQL: set DATABASE_URL to a postgres:// URL")
# Without Redis the settings fall back to the single-process first-run mode: rate limits per
# process, no Synapse stream, and a broker in each host's own VAR_DIR that no other host reads.
if not REDIS_URL:
    raise ImproperlyConfigured("REDIS_URL must be set in production (cache, rate limits, the Synapse stream)")
if CELERY_BROKER_URL.startswith("filesystem://"):
    raise ImproperlyConfigured(
        "CELERY_BROKER_URL names the filesystem transport, which only processes sharing one VAR_DIR can use: "
        "use Redis or RabbitMQ in production"
    )

SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", True)
# Probes and scrapers talk plain HTTP inside the deployment network.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", 31536000, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", True)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", True)
SECURE_CONTENT_TYPE_NOSNIFF = True
SESSION_COOKIE_SECURE = True
CSRF_COOKIE_SECURE = True
X_FRAME_OPTIONS = "DENY"

# The sample history would join the real record for good (and the nightly training export).
SAMPLE_DATA_ALLOWED = False
