"""Settings shared by every environment. Values come from the environment via config.env."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured
from kombu import Queue
from kombu.transport import TRANSPORT_ALIASES

from config.env import env

BASE_DIR = Path(__file__).resolve().parent.parent.parent
VAR_DIR = Path(env.str("VAR_DIR", str(BASE_DIR / "var")))

SECRET_KEY = env.str("SECRET_KEY", "insecure-local-development-key-never-use-in-production")
DEBUG = env.bool("DEBUG", False)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", [])
# `load_sample_data` writes a made-up history (events cannot be deleted; exports make training
# data of them), two llm agents and a superuser: for a first look, never a real deployment's.
SAMPLE_DATA_ALLOWED = True

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_prometheus",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_celery_beat",
    "orchestration",
    "training_export",
    "observability",
]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "orchestration.api.middleware.ApiCommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "orchestration.api.middleware.StatementCancelledMiddleware",
    "observability.middleware.PrometheusAfterMiddleware",  # django_prometheus', its labels bounded
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"
ASGI_APPLICATION = "config.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


# --- Database -------------------------------------------------------------------------
# libpq's TCP options for PostgreSQL connections (see _database).
DATABASE_TCP_OPTIONS = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}


# With nothing configured, an embedded SQLite file under var/ so a first run needs nothing
# installed. PostgreSQL (psycopg 3) whenever DATABASE_URL says so.
def _database(url: str) -> dict:
    try:
        config = dj_database_url.parse(
            url,
            conn_max_age=env.int("DATABASE_CONN_MAX_AGE", 60, minimum=0),
            conn_health_checks=True,
        )
    except (ValueError, KeyError) as exc:
        raise ImproperlyConfigured(f"DATABASE_URL is not a usable database URL: {exc}") from None
    engine = config.get("ENGINE", "")
    if engine == "django.db.backends.postgresql" and not config.get("NAME"):
        raise ImproperlyConfigured("DATABASE_URL names no database (postgres://USER:PASSWORD@HOST:5432/NAME)")
    if engine not in ("django.db.backends.postgresql", "django.db.backends.sqlite3"):
        raise ImproperlyConfigured(
            f"DATABASE_URL names an unsupported database ({engine}); use postgres:// or sqlite://"
        )
    if engine == "django.db.backends.postgresql":
        # psycopg waits for a connection indefinitely by default; readiness checks and
        # workers must not hang on an unreachable database.
        config.setdefault("OPTIONS", {})["connect_timeout"] = env.int("DATABASE_CONNECT_TIMEOUT", 5, minimum=1)
        # A server that vanished without closing its connections (a failover that moved its
        # address, a cut network) is noticed within about a minute, not the two hours of the
        # kernel's keepalive defaults: a relay, consumer or reaper waiting on it would hang that
        # long. Probes start after 30 s of silence, three unanswered 10 s apart close the
        # connection. A busy server's kernel still answers them: a long query is not cut. (No
        # tcp_user_timeout: Linux also applies it to a peer that keeps its receive window shut,
        # which a live server does while it is busy.) The URL's query string
        # (?keepalives_idle=...) overrides each.
        for name, value in DATABASE_TCP_OPTIONS.items():
            config["OPTIONS"].setdefault(name, value)
        # Server-side limits for processes that answer people (compose sets them for web): a
        # runaway query or a transaction left idle gives its connection and locks back. 0 (the
        # default, and right for workers: an export reads for hours) sets nothing.
        limits = {
            "statement_timeout": env.int("DATABASE_STATEMENT_TIMEOUT_SECONDS", 0, minimum=0, maximum=2_147_483),
            "idle_in_transaction_session_timeout": env.int(
                "DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS", 0, minimum=0, maximum=2_147_483
            ),
        }
        options = [f"-c {name}={seconds * 1000}" for name, seconds in limits.items() if seconds]
        if options:
            given = config["OPTIONS"].get("options")  # from the URL's ?options=
            config["OPTIONS"]["options"] = " ".join([given, *options] if given else options)
    if engine == "django.db.backends.sqlite3":
        config["CONN_MAX_AGE"] = 0
        # The embedded mode runs web, worker and beat on one file: a transaction takes the
        # write lock when it begins (not at its first write, which can fail with "database is
        # locked" after reading), and waits for it up to the timeout.
        config.setdefault("OPTIONS", {}).update(transaction_mode="IMMEDIATE", timeout=20)
        Path(config["NAME"]).parent.mkdir(parents=True, exist_ok=True)
    if env.bool("DATABASE_METRICS", True):
        # django-prometheus's wrappers of the same backends count queries, their duration,
        # errors and connections (by alias and vendor) for /metrics.
        config["ENGINE"] = engine.replace("django.db.backends.", "django_prometheus.db.backends.")
    return config


# Server-side prepared statements for the statements run on every attempt and request (the
# worker's fast path, the API-key lookup). Off for a pooler that cannot keep them, such as
# PgBouncer in transaction mode before 1.21: every statement is then planned each time.
DATABASE_PREPARED_STATEMENTS = env.bool("DATABASE_PREPARED_STATEMENTS", True)


def database_vendor(config: dict) -> str:
    """'postgresql' or 'sqlite3', whether or not the metrics wrapper is in front."""
    return config["ENGINE"].rsplit(".", 1)[-1]


DEFAULT_SQLITE_URL = f"sqlite:///{VAR_DIR / 'db.sqlite3'}"
DATABASES = {"default": _database(env.str("DATABASE_URL", DEFAULT_SQLITE_URL))}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis, cache, Celery -------------------------------------------------------------
REDIS_URL = env.url("REDIS_URL", None, schemes={"redis", "rediss", "unix"})

if REDIS_URL:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# Without a broker configured, Celery uses kombu's filesystem transport under var/ so that
# the first run works with nothing installed. Redis is used whenever it is configured.
FILESYSTEM_BROKER_DIR = VAR_DIR / "celery"
if REDIS_URL and REDIS_URL.startswith("unix://") and not env.is_set("CELERY_BROKER_URL"):
    raise ImproperlyConfigured(
        "REDIS_URL is a unix:// socket, which Celery cannot use as its broker: set CELERY_BROKER_URL "
        "(redis+socket:///path/to/redis.sock)"
    )
if ";" in (env.raw("CELERY_BROKER_URL") or ""):
    # kombu splits a broker URL at each ';' into failover URLs; the URL check below then named
    # "Redis database '0;redis:'". The probes, the sweeps' restart detection and the entrypoint's
    # wait each read one broker.
    raise ImproperlyConfigured(
        "CELERY_BROKER_URL holds a ';', which kombu reads as a list of failover brokers: give one URL "
        "(a ';' in a password is written %3B)"
    )
CELERY_BROKER_URL = env.url(
    "CELERY_BROKER_URL", REDIS_URL or "filesystem://localhost/", schemes={alias.lower() for alias in TRANSPORT_ALIASES}
)
if CELERY_BROKER_URL.startswith("filesystem://"):
    for _folder in ("out", "processed", "control"):
        (FILESYSTEM_BROKER_DIR / _folder).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(FILESYSTEM_BROKER_DIR / "out"),
        "data_folder_out": str(FILESYSTEM_BROKER_DIR / "out"),
        "processed_folder": str(FILESYSTEM_BROKER_DIR / "processed"),
        "control_folder": str(FILESYSTEM_BROKER_DIR / "control"),
        "store_processed": False,
        # kombu's default (1 s) is also how long a worker whose prefetch is full sleeps before it
        # looks again: with beat's relay every second taking the second slot, the demo's fan-out
        # ran one task a second.
        "polling_interval": 0.1,
    }
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_TASK_IGNORE_RESULT = True  # durable state lives in our tables, not a result backend
CELERY_TIMEZONE = "UTC"
# django-celery-beat's, reading every entry (config/beat.py).
CELERY_BEAT_SCHEDULER = "config.beat:DatabaseScheduler"
# A message is acknowledged only after its task body returns; if the worker process dies
# mid-task the message goes back to the queue (marked redelivered) instead of vanishing.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# A worker whose broker connection breaks stops its running tasks (their messages, which it
# can no longer acknowledge, are redelivered; Celery 6's default). False lets them run on: the
# claim of the redelivered message asks the worker, finds the try still running and runs
# nothing (orchestration/services/redelivery.py).
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = env.bool(
    "CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS", True
)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_SEND_TASK_EVENTS = False
CELERY_TASK_SEND_SENT_EVENT = False
# Celery's Django fixup closes every database connection before and after each task unless
# this is set; reuse a connection for this many tasks instead (config/celery.py still drops
# unusable or expired ones before each task, as Django does per request).
CELERY_DB_REUSE_MAX = env.int("CELERY_DB_REUSE_MAX", 1000, minimum=0)
# Queues per priority; a task execution goes to the queue named by its priority.
TASK_QUEUES_BY_PRIORITY = ("critical", "high", "normal", "low")
# The recovery schedules (relay, reaper, export sweep; migration 0027): no user task waits in
# it, so a worker with a process free for it is never blocked behind long user tasks.
SYSTEM_QUEUE = "system"
CELERY_TASK_QUEUES = tuple(Queue(name, routing_key=name) for name in (SYSTEM_QUEUE, *TASK_QUEUES_BY_PRIORITY))
CELERY_TASK_DEFAULT_QUEUE = "normal"
CELERY_TASK_CREATE_MISSING_QUEUES = True

# --- Execution limits -----------------------------------------------------------------
# Per-attempt timeout_seconds is Celery's soft limit; the hard limit adds a grace period.
TASK_MAX_TIMEOUT_SECONDS = env.int("TASK_MAX_TIMEOUT_SECONDS", 3600, minimum=1, maximum=86400)
TASK_DEFAULT_TIMEOUT_SECONDS = env.int("TASK_DEFAULT_TIMEOUT_SECONDS", 300, minimum=1, maximum=86400)
TASK_HARD_TIMEOUT_GRACE_SECONDS = env.int("TASK_HARD_TIMEOUT_GRACE_SECONDS", 10, minimum=1)
# Claim and complete attempts with single-statement fast paths on PostgreSQL (off: always the
# general path, which handles every case; the test suite runs both).
ENGINE_FAST_PATH = env.bool("ENGINE_FAST_PATH", True)
# A workflow's step_results copy its tasks' outputs up to WORKFLOW_STEP_RESULTS_MAX_BYTES of JSON
# in all; an output beyond it is a reference to its task (services/progress.py). PostgreSQL
# refuses a jsonb value over 256 MiB, and a jsonb value takes up to 4 times its JSON text (an
# array of small numbers): the two maximums keep the copies (128 MiB as jsonb at most) and one
# reference per task (2.2 KB at most, a name of 255 four-byte characters twice) below it.
WORKFLOW_MAX_TASKS = env.int("WORKFLOW_MAX_TASKS", 5000, minimum=1, maximum=50_000)
WORKFLOW_STEP_RESULTS_MAX_BYTES = env.int(
    "WORKFLOW_STEP_RESULTS_MAX_BYTES", 16 * 1024 * 1024, minimum=0, maximum=32 * 1024 * 1024
)
TASK_MAX_RETRIES_LIMIT = env.int("TASK_MAX_RETRIES_LIMIT", 20, minimum=0, maximum=100)
TASK_RETRY_BACKOFF_BASE_SECONDS = float(env.int("TASK_RETRY_BACKOFF_BASE_MS", 1000, minimum=1)) / 1000
TASK_RETRY_BACKOFF_MAX_SECONDS = env.int("TASK_RETRY_BACKOFF_MAX_SECONDS", 300, minimum=1)
# A queued task that has not started this long after it became runnable times out.
TASK_QUEUE_TIMEOUT_SECONDS = env.int("TASK_QUEUE_TIMEOUT_SECONDS", 3600, minimum=1)
# The reaper closes attempts still running this long past their hard limit.
REAPER_GRACE_SECONDS = env.int("REAPER_GRACE_SECONDS", 30, minimum=0)
# A try's outcome (success or failure) whose write lost the database connection is written
# again on a new one for up to this long (never up to its hard time limit), before its message
# is sent again (and the agent, paid for, runs again).
TASK_RESULT_WRITE_RETRY_SECONDS = env.int("TASK_RESULT_WRITE_RETRY_SECONDS", 10, minimum=0, maximum=300)
# A task left queued this long with no message in the broker is sent again.
DISPATCH_SWEEP_AFTER_SECONDS = env.int("DISPATCH_SWEEP_AFTER_SECONDS", 60, minimum=1)
if TASK_DEFAULT_TIMEOUT_SECONDS > TASK_MAX_TIMEOUT_SECONDS:
    raise ImproperlyConfigured("TASK_DEFAULT_TIMEOUT_SECONDS must not exceed TASK_MAX_TIMEOUT_SECONDS")


# Redis redelivers an unacknowledged message after the visibility timeout. It must exceed
# the longest hard time limit plus the longest countdown of a message (a worker holds a message
# with a countdown unacknowledged until it runs it: kombu stamps the delivery, and Celery puts
# the message on a timer for its ETA), or a healthy long task would be delivered twice.
# run_task also sends its message again, at most this long later, when the database
# connection is lost (orchestration/tasks.py), whatever TASK_RETRY_BACKOFF_MAX_SECONDS says.
TASK_CONNECTION_RETRY_MAX_COUNTDOWN_SECONDS = 30
# A task deferred for its agent's max_concurrency comes back as a new message with a countdown
# of at most this long, its jitter included (orchestration/services/execution.py: 30 s plus a
# quarter; 6 s while its agent is in maintenance), whatever the retries' backoff.
TASK_DEFERRAL_MAX_COUNTDOWN_SECONDS = 38


def longest_message_hold_seconds(max_timeout: int, hard_grace: int, backoff_max: int) -> int:
    countdown = max(backoff_max, TASK_CONNECTION_RETRY_MAX_COUNTDOWN_SECONDS, TASK_DEFERRAL_MAX_COUNTDOWN_SECONDS)
    return max_timeout + hard_grace + countdown


def check_visibility_timeout(visibility: int, longest_hold: int) -> None:
    if visibility <= longest_hold:
        raise ImproperlyConfigured(
            f"BROKER_VISIBILITY_TIMEOUT_SECONDS={visibility} must exceed the longest hard time limit plus the "
            f"longest countdown of a message ({longest_hold} s = TASK_MAX_TIMEOUT_SECONDS + "
            "TASK_HARD_TIMEOUT_GRACE_SECONDS + the longest of TASK_RETRY_BACKOFF_MAX_SECONDS, "
            f"{TASK_CONNECTION_RETRY_MAX_COUNTDOWN_SECONDS} s after a lost database connection and "
            f"{TASK_DEFERRAL_MAX_COUNTDOWN_SECONDS} s for a task deferred for its agent's max_concurrency)"
        )


_LONGEST_HOLD_SECONDS = longest_message_hold_seconds(
    TASK_MAX_TIMEOUT_SECONDS, TASK_HARD_TIMEOUT_GRACE_SECONDS, TASK_RETRY_BACKOFF_MAX_SECONDS
)
BROKER_VISIBILITY_TIMEOUT_SECONDS = env.int("BROKER_VISIBILITY_TIMEOUT_SECONDS", 2 * _LONGEST_HOLD_SECONDS, minimum=1)
check_visibility_timeout(BROKER_VISIBILITY_TIMEOUT_SECONDS, _LONGEST_HOLD_SECONDS)
if not CELERY_BROKER_URL.startswith("filesystem://"):
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": BROKER_VISIBILITY_TIMEOUT_SECONDS}
# kombu's Redis transport waits for a reply for ever by default: a broker that stops answering
# without closing the connection (failover, a NAT or firewall timeout) would hold a publish,
# and with it a web request or beat, indefinitely. Publishing retries a timed-out command.
BROKER_SOCKET_TIMEOUT_SECONDS = env.int("BROKER_SOCKET_TIMEOUT_SECONDS", 5, minimum=2, maximum=300)
# How a worker consuming several queues chooses the next message. kombu's Redis transport takes
# them in turn by default (round robin): behind a backlog of low tasks every other task a worker
# started was a low one, however urgent the rest. `priority`: in the order its -Q lists them
# (system,critical,high,normal,low), a message from a queue only when none before it has one.
BROKER_QUEUE_ORDER = env.choice("BROKER_QUEUE_ORDER", "priority", {"priority", "round_robin"})
if CELERY_BROKER_URL.startswith(("redis", "sentinel")):
    CELERY_BROKER_TRANSPORT_OPTIONS.update(
        socket_timeout=BROKER_SOCKET_TIMEOUT_SECONDS,
        socket_connect_timeout=BROKER_SOCKET_TIMEOUT_SECONDS,
        queue_order_strategy=BROKER_QUEUE_ORDER,
    )

# --- Agent executors: http and llm (orchestration/runtime) ----------------------------
# Outbound requests to URLs from agent definitions. With a non-empty allow-list only those
# hosts are reached; addresses that are not globally routable (loopback, private,
# link-local/metadata, ...) are refused unless AGENT_HTTP_ALLOW_PRIVATE is true.
AGENT_HTTP_ALLOWED_HOSTS = env.list("AGENT_HTTP_ALLOWED_HOSTS", [])
# Origins besides the providers' own (https://api.openai.com, https://api.anthropic.com) that
# an llm agent's API key may be sent to: a gateway, a vLLM server. A bare host admits https on
# port 443 only; http or another port is listed as an origin (http://vllm.internal:8000). A
# list of its own: the hosts http agents may reach (above) are not thereby trusted with the
# deployment's keys, and listing a gateway here does not narrow where keyless agents may go.
AGENT_API_KEY_HOSTS = env.origin_list("AGENT_API_KEY_HOSTS", [])
# The environment variables an llm agent may name in api_key_env (shell-style patterns, case
# sensitive). Agents are also made through the API, and a key is sent to the agent's URL: an
# agent naming DATABASE_URL would send it away. The platform's own configuration variables
# are refused whatever the patterns say.
AGENT_API_KEY_ENV_ALLOWED = env.list("AGENT_API_KEY_ENV_ALLOWED", ["*_API_KEY"])
AGENT_HTTP_ALLOW_PRIVATE = env.bool("AGENT_HTTP_ALLOW_PRIVATE", False)
AGENT_HTTP_CONNECT_TIMEOUT_SECONDS = env.int("AGENT_HTTP_CONNECT_TIMEOUT_SECONDS", 5, minimum=1, maximum=300)
# Read timeouts are also capped by each task's timeout_seconds.
AGENT_HTTP_READ_TIMEOUT_SECONDS = env.int("AGENT_HTTP_READ_TIMEOUT_SECONDS", 60, minimum=1, maximum=86400)
AGENT_HTTP_MAX_RESPONSE_BYTES = env.int("AGENT_HTTP_MAX_RESPONSE_BYTES", 10 * 1024 * 1024, minimum=1024)
# The largest output (bytes of its JSON) an agent of any executor may return; a larger one fails
# the attempt for good, before anything is stored. Not the response cap above: that one bounds
# what a worker reads off the network (an error page, a model's whole answer), this one what a
# task stores, whatever produced it (a python agent reads nothing). The maximum keeps one
# output's jsonb (up to 4 times its JSON) below PostgreSQL's 256 MiB.
AGENT_MAX_OUTPUT_BYTES = env.int("AGENT_MAX_OUTPUT_BYTES", 10 * 1024 * 1024, minimum=1024, maximum=32 * 1024 * 1024)
LLM_CONNECT_TIMEOUT_SECONDS = env.int("LLM_CONNECT_TIMEOUT_SECONDS", 10, minimum=1, maximum=300)
LLM_READ_TIMEOUT_SECONDS = env.int("LLM_READ_TIMEOUT_SECONDS", 300, minimum=1, maximum=86400)
# A model may call tools this many rounds in one attempt before the attempt fails.
LLM_MAX_TOOL_ROUNDS = env.int("LLM_MAX_TOOL_ROUNDS", 8, minimum=1, maximum=100)
# Tool calls one answer of the model may hold (parallel tool calls). Neither OpenAI nor
# Anthropic caps them, and every call is run and recorded: an answer with more fails the
# attempt before any of them runs (its tokens are still recorded: the provider billed them).
LLM_MAX_TOOL_CALLS_PER_ANSWER = env.int("LLM_MAX_TOOL_CALLS_PER_ANSWER", 64, minimum=1, maximum=1000)

# --- Agent runtime: tools, hand-offs, conversations (orchestration/runtime) ------------
# Modules that register tools with @tool (runtime/tools.py); imported on first use.
AGENT_TOOL_MODULES = env.list("AGENT_TOOL_MODULES", ["orchestration.runtime.toolkit"])
# Modules (and their submodules) whose functions `python` agents may run. An agent's
# entrypoint is imported and called in a worker, and admins make agents through the API: a
# dotted path outside these is refused before anything is imported.
AGENT_ENTRYPOINT_MODULES = env.list(
    "AGENT_ENTRYPOINT_MODULES", ["orchestration.runtime.builtin", "orchestration.runtime.analysts"]
)
AGENT_MAX_DELEGATION_DEPTH = env.int("AGENT_MAX_DELEGATION_DEPTH", 3, minimum=1, maximum=20)
CONVERSATION_MAX_MESSAGE_CHARS = env.int("CONVERSATION_MAX_MESSAGE_CHARS", 32_000, minimum=1, maximum=1_000_000)
CONVERSATION_TIMEOUT_SECONDS = env.int("CONVERSATION_TIMEOUT_SECONDS", 120, minimum=1, maximum=86400)
# A reply is a task: its hard limit must be one the broker's visibility timeout is sized for.
if CONVERSATION_TIMEOUT_SECONDS > TASK_MAX_TIMEOUT_SECONDS:
    raise ImproperlyConfigured("CONVERSATION_TIMEOUT_SECONDS must not exceed TASK_MAX_TIMEOUT_SECONDS")
CONVERSATION_MAX_RETRIES = env.int("CONVERSATION_MAX_RETRIES", 2, minimum=0, maximum=100)
# Replies are read in this many of the thread's most recent messages at most.
CONVERSATION_HISTORY_MESSAGES = env.int("CONVERSATION_HISTORY_MESSAGES", 200, minimum=1, maximum=100_000)

# --- Synapse: the event stream --------------------------------------------------------
SYNAPSE_STREAM = env.str("SYNAPSE_STREAM", "synapse")
SYNAPSE_STREAM_MAXLEN = env.int("SYNAPSE_STREAM_MAXLEN", 1_000_000, minimum=1000)
SYNAPSE_RELAY_BATCH = env.int("SYNAPSE_RELAY_BATCH", 500, minimum=1, maximum=10000)

# --- Training data, metrics -----------------------------------------------------------
TRAINING_DATA_DIR = Path(env.str("TRAINING_DATA_DIR", str(BASE_DIR / "data" / "training")))
# JSONL exports (default: <TRAINING_DATA_DIR>/exports). A window is exportable once its end is
# this far in the past and no transaction that began before its end is still open.
TRAINING_EXPORT_DIR = Path(env.str("TRAINING_EXPORT_DIR", str(TRAINING_DATA_DIR / "exports")))
TRAINING_EXPORT_SAFETY_LAG_SECONDS = env.int("TRAINING_EXPORT_SAFETY_LAG_SECONDS", 300, minimum=0)
# The daily export also exports the days (at most this many back) a data type has not exported
# since its first exported day: a night whose export gave up on a window held open is not lost,
# nor a day that failed in a catch-up whose later days were exported.
TRAINING_EXPORT_CATCHUP_DAYS = env.int("TRAINING_EXPORT_CATCHUP_DAYS", 7, minimum=0, maximum=366)
# Redaction of everything written to training files: JSON keys containing one of these words
# (case-insensitive, whole words of the key: `token` masks `access_token`, not `tokens_used`, nor
# `token_count`: see training_export.services.redaction.NOT_SECRET_LAST_WORDS),
# and string values matching one of these regular expressions (a JSON array).
REDACT_KEYS = env.list(
    "REDACT_KEYS",
    [
        "secret",
        "password",
        "passwd",
        "pwd",
        "passphrase",
        "token",
        "api_key",
        "apikey",
        "authorization",
        "cookie",
        "private_key",
        "credential",
        "credentials",
    ],
)
# One parameter of a credential in the Authorization header's parameter form (RFC 9110:
# `name=token` or `name="quoted"`; Digest and AWS4-HMAC-SHA256 use it, AWS with ';' in a value),
# its quotes possibly escaped (the header inside a JSON string: `response=\"...\"`).
_AUTH_PARAM = (
    r"[a-z0-9!#$%*+.^_`|~-]+[ \t]*=[ \t]*"
    r"(?:\"(?:[^\"\\\n]|\\.)*\"?|\\\"(?:[^\"\\\n]|\\[^\"\n])*(?:\\\")?|[^\s\"',]*)"
)


def _auth_bare(stop: str) -> str:
    """A bare value (a scheme or a bare key, then the parameters or a token68 credential), its
    characters none of `stop`."""
    return (
        rf"[^\s\"',;&{{\[{stop}][^\s\"',;&{stop}]*(?:[ \t]+(?:{_AUTH_PARAM}(?:[ \t]*,[ \t]*{_AUTH_PARAM})*"
        rf"|[^\s\"',;&{stop}]+))?"
    )


# A key sent without a scheme as the second of a pair (`("Authorization", "<key>")`): it has
# what no header name has (a list of header names has none: "content-type", "x-b3-traceid",
# "content-md5", "HTTP_X_API_KEY"), a character other than a letter, digit, '-' or '_', a digit
# first, a digit followed by a letter, or four digits in a row. A key of letters alone, or of
# letters then up to three digits, looks like a header name and is kept. (Atomic and possessive:
# one scan of the value, whatever follows it.)
_AUTH_PAIR_KEY = r"(?>[0-9]|[a-z0-9_-]*?(?:[^a-z0-9_\-\s\"'\\,)\]]|[0-9](?:[a-z]|[0-9]{3})))[^\s\"'\\]*+"
# The label, its quote (escaped in a JSON text inside a JSON string) and separator (`=>` too),
# then the value: the next argument when the label and its separator are one string
# (`print("Authorization:", "<key>")`); a YAML block scalar (`authorization: >-` and the value on
# the next, indented line); quoted (up to its closing quote, escapes included, and the literals
# that continue it, as pprint splits a long one; a b/f/r/u prefix allowed; not the label's own
# closing quote before a comma: `print("Authorization:", value)` is code), possibly the first of
# a list (`["Basic ..."]`); or, on the same line (a header's value never starts the next one:
# "if not authorization:" ending a line is code), bare, possibly in brackets (Go's
# `Authorization:[Basic ...]`; not a mask already there). Or a pair whose value has a scheme, or
# is shaped like a key (_AUTH_PAIR_KEY). Or an XML element's text (its attributes too: `xmlns`,
# `type`), up to its closing tag.
_AUTHORIZATION = (
    r"(?i:authorization(?:(?:\\?[\"'])?\]?\s*(?:=>|[=:])"
    r"(?:[ \t]*\\?[\"'][ \t]*,\s*(?:[bfru]{0,2}\"(?:[^\"\\\n]|\\.)*|[bfru]{0,2}'(?:[^'\\\n]|\\.)*"
    r"|\\\"(?:[^\"\\\n]|\\[^\"\n])*)"
    r"|[ \t]*[|>][0-9+-]{0,2}[ \t]*\r?\n[ \t]+[^\s][^\r\n]*"
    r"|\s*(?:\[\s*)?(?:[bfru]{0,2}\"(?![ \t]*,)(?:[^\"\\\n]|\\.)*(?:\"\s*\"(?:[^\"\\\n]|\\.)*)*"
    r"|[bfru]{0,2}'(?![ \t]*,)(?:[^'\\\n]|\\.)*(?:'\s*'(?:[^'\\\n]|\\.)*)*"
    r"|\\\"(?:[^\"\\\n]|\\[^\"\n])*)"
    r"|[ \t]*(?:" + _auth_bare("") + r"|\[(?!redacted\])[ \t]*" + _auth_bare(r"\]") + r"\]?))"
    r"|[\"']\s*,\s*[bfru]{0,2}(?:\"[^\"\s\\]+[ \t]+(?:[^\"\\\n]|\\.)*|'[^'\s\\]+[ \t]+(?:[^'\\\n]|\\.)*"
    r"|[\"']" + _AUTH_PAIR_KEY + r")"
    r"|(?:\s+[a-z_][a-z0-9_.:-]*[ \t]*=[ \t]*(?:\"[^\"<>]*+\"|'[^'<>]*+'))*+"
    r"[ \t]*>\s*+[^<>\s][^<>]*+(?=</(?:[a-z0-9_.-]+:)?(?:proxy-|http_)?authorization[ \t]*>)))"
)
# A YAML key at the start of its line (indented, quoted, a list item) whose value is on the next,
# indented line: masked when that line is a credential and nothing else, a bare key or a scheme
# and its token68 or parameters. (An indented sentence under "Authorization:" is not, nor a
# nested mapping, `authorization:` then `  type: oauth2`: a credential's first word never ends
# with a colon; Python's "if not authorization:" is no key at the start of its line; nor is a
# sequence item, `- admin`, or a comment. A string prefix before a quote, `f"Token ..."`, is a
# literal continued on the next line, masked by _AUTHORIZATION: taken for a bare key, `f` alone
# was masked and the literal left in clear.)
_AUTHORIZATION_NEXT_LINE = (
    r"(?<![^\n\"])(?i:[ \t]*(?:-[ \t]+)?[\"']?(?:proxy-|http_)?authorization[\"']?[ \t]*:[ \t]*\r?\n"
    r"[ \t]+(?![bfru]{1,2}(?![^\s\"',;&])|[-#][ \t])"
    r"[^\s\"',;&{\[][^\s\"',;&]*+(?<!:)(?:[ \t]+(?:[a-z0-9!#$%*+.^_`|~-]+[ \t]*=[^\r\n]*"
    r"|[^\s\"',;&]++[ \t]*(?![^\r\n\"]))|[ \t]*(?![^\r\n\"])))"
)
# The key=value pattern's key may end in a word saying it names something about a secret, not
# the secret: `api_key_hash = ...`, `MIN_SECRET_LENGTH = 6`, `api_key_env: OPENAI_API_KEY`,
# `private_key_path = ...` are kept (code and config discussions are common in the training data).
# Not `secret_id` nor `token_id` (Vault AppRole's and Keystone's credentials), nor a password's
# hash (a low-entropy secret, crackable from it), a token's (a magic link's) or a secret's
# (Cognito's SECRET_HASH, sent to sign in). The words are those of
# training_export.services.redaction.NOT_SECRET_LAST_WORDS, which applies them to JSON keys.
_KEY_NAMES_NO_SECRET = (
    r"(?<!(?<!secret)(?<!token)[_-]id)(?<!(?<!secret)(?<!token)[_-]ids)"
    r"(?<!(?<!password)(?<!passwd)(?<!passphrase)(?<!token)(?<!secret)[_-]hash)"
    + "".join(
        rf"(?<![_-]{word})"
        for word in (
            "count", "dir", "env", "field", "fields", "file", "kind", "len", "length", "max", "min", "name",
            "names", "path", "size", "type", "uri", "url", "version",
        )
    )
)  # fmt: skip
# Each pattern starts with a literal where it can (a literal prefix lets the regex engine skip
# ahead; the look-behind after it keeps the word boundary): redaction runs on every string.
REDACT_PATTERNS = env.json_str_list(
    "REDACT_PATTERNS",
    [
        r"(?i:bearer(?<![a-z0-9_]bearer)\s+[a-z0-9\-._~+/]+=*)",
        r"sk-(?<![A-Za-z0-9_]sk-)[A-Za-z0-9_\-]{16,}",
        r"al_(?<![A-Za-z0-9_]al_)[A-Za-z0-9_\-]{16,}",
        r"gh(?<![A-Za-z0-9_]gh)[pousr]_[A-Za-z0-9]{30,}",
        r"AKIA(?<![A-Za-z0-9_]AKIA)[0-9A-Z]{16}\b",
        r"xox(?<![A-Za-z0-9_]xox)[abprs]-[A-Za-z0-9\-]{10,}",
        # a PEM private key, its armour and body (up to the text's end when its END line is cut off,
        # or up to a quote, escaped or not: a body holds none, code naming the armour line does,
        # `line.startswith("-----BEGIN PRIVATE KEY-----")`, and a key cut off in JSON text ends
        # at its string's quote). The label's words are bounded: a run
        # of "PRIVATE KEY PRIVATE KEY ..." was searched again from each of them.
        r"-----BEGIN [A-Z0-9 ]{0,40}PRIVATE KEY[A-Z ]{0,20}-----(?:[^-\"'`\\]|\\[^\"'`]|-(?!----END ))*"
        r"(?:-----END [A-Z0-9 ]*PRIVATE KEY[A-Z ]*-----)?",
        # more providers' key shapes: Google API keys, GitHub fine-grained and GitLab personal
        # tokens, Hugging Face tokens, Stripe secret and restricted keys, Slack webhooks
        r"AIza(?<![A-Za-z0-9_]AIza)[0-9A-Za-z_\-]{35}",
        r"github_pat_(?<![A-Za-z0-9_]github_pat_)[A-Za-z0-9_]{22,}",
        r"glpat-(?<![A-Za-z0-9_]glpat-)[A-Za-z0-9_\-]{20,}",
        r"hf_(?<![A-Za-z0-9_]hf_)[A-Za-z0-9]{30,}",
        r"[rs]k_(?<![A-Za-z0-9_][rs]k_)(?:live|test)_[A-Za-z0-9]{16,}",
        r"hooks\.slack\.com/services/[A-Za-z0-9_/]+",
        r"npm_(?<![A-Za-z0-9_]npm_)[A-Za-z0-9]{36}",
        r"SG\.(?<![A-Za-z0-9_.]SG\.)[A-Za-z0-9_\-]{16,}\.[A-Za-z0-9_\-]{16,}",
        # a JSON Web Token (an id or session token sent without its "Bearer")
        r"eyJ(?<![A-Za-z0-9_\-]eyJ)[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*",
        # credentials on a command line: curl -u user:password, --user user:password (not a
        # numeric user:group, docker's -u 1000:1000 or --user 1000:1000). The user is bounded:
        # a word holding many "-u=" was searched again from each of them. A value stops before
        # an escaped quote, as the key=value pattern's does (a command in JSON text inside JSON
        # text: `\"curl -u admin:pw\"`), where eating its backslash broke the text.
        r"-u(?<![A-Za-z0-9_\-]-u)[ =]++(?![0-9]++:[0-9]*+(?![^\s'\"\\]))[^\s:'\"]{1,128}+:(?:[^\s'\"\\]|\\[^\s'\"])+",
        r"--user(?<![A-Za-z0-9_\-]--user)[ =]++(?![0-9]++:[0-9]*+(?![^\s'\"\\]))[^\s:'\"]{1,128}+:"
        r"(?:[^\s'\"\\]|\\[^\s'\"])+",
        # a Cookie or Set-Cookie header: the session it carries, when it starts with a cookie's
        # name= (not prose: "a fortune cookie: you will be rich")
        r"(?i:cookie(?<![a-z0-9_]cookie)[\"']?\s*:\s*[\"']?)(?=[^\s=;,\"']{1,256}+=)(?:[^\r\n\"'\\]|\\[^\r\n\"'])+",
        r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}",
        # HTTP Authorization (and Proxy-Authorization) credentials, whatever the scheme (Basic,
        # Token, Digest, AWS4-HMAC-SHA256, a bare key), masked with their label: a header line,
        # key=value, JSON or a Python literal (`'Authorization': 'Basic ...'`,
        # `headers["Authorization"] = ...`), and a pair `("Authorization", "Basic ...")` when its
        # value has a scheme (a list of header names has none). Whatever follows "Authorization:"
        # on its line is taken for a credential, "Authorization: required" too (a bare key looks the same);
        # the word elsewhere ("the authorization step failed") is kept. No word-start look-behind:
        # "Proxy-", "HTTP_" or "proxy" before it name the same header. Also a pair whose value is
        # shaped like a key, an XML element, print arguments and YAML (a value on the next line;
        # before the same-line pattern, which would take a block scalar's `>-` for the value).
        _AUTHORIZATION_NEXT_LINE,
        _AUTHORIZATION,
        # credentials in a URL (user:password@, the user possibly empty: redis://:password@host)
        # and key=value secrets in free text, the key or the value possibly quoted (JSON or a
        # Python literal inside a string: a tool's output, an error quoting a request body)
        r"(?<=://)[^/@\s:]*:[^/@\s]+@",
        # (a quoted value is masked up to its closing quote, or the line's end: a passphrase has
        # spaces; no look-ahead for that quote, which would make the pattern not joinable). The
        # key's word may be followed by more words of it (SECRET_KEY, AWS_SECRET_ACCESS_KEY,
        # private_key_pem), as REDACT_KEYS matches keys, but not "token" (token_type and
        # token_count are no credentials; token_hash and token_id are: a magic link's, Keystone's),
        # nor a last one of _KEY_NAMES_NO_SECRET (api_key_hash, api_key_env); AccountKey= of an Azure
        # connection string too. Its
        # quotes may be escaped (a request body quoted inside JSON text: `{\"password\": \"...\"}`).
        # The look-ahead for the words' first letters lets the search skip every other position
        # (without it, the pattern took twice as long over text holding none of them). The
        # words after the key's are bounded: a run of "secret_secret_..." without a "=" was
        # searched to its end again from each of them.
        r"(?=[AaCcPpSsTt])(?i:(?:(?:password|passwd|passphrase|secret|api[_-]?key|private[_-]?key|credentials?|accountkey"
        r"|sharedaccesskey)"
        r"(?:[_-][a-z0-9]{1,40}){0,6}+"
        + _KEY_NAMES_NO_SECRET
        + r"|token(?:[_-](?:hash|ids?))?)(?:\\?[\"'])?\s*[=:]\s*)"
        r"(?:\\\"(?:[^\"\\\n]|\\[^\"\n])*|\"[^\"\n]*|'[^'\n]*|[^\s&,;'\"]+)",
    ],
)
for _pattern in REDACT_PATTERNS:
    try:
        re.compile(_pattern)
    except re.error as _exc:
        raise ImproperlyConfigured(
            f"REDACT_PATTERNS: {_pattern!r} is not a valid regular expression ({_exc})"
        ) from None
# Retention: days kept per table (0 keeps forever). Events are pruned only through the
# privileged database function prune_events (see README, "Retention").
RETENTION_DAYS_EVENTS = env.int("RETENTION_DAYS_EVENTS", 0, minimum=0)
RETENTION_DAYS_MESSAGES = env.int("RETENTION_DAYS_MESSAGES", 0, minimum=0)
RETENTION_DAYS_WORKFLOWS = env.int("RETENTION_DAYS_WORKFLOWS", 0, minimum=0)
RETENTION_DAYS_AGENT_METRICS = env.int("RETENTION_DAYS_AGENT_METRICS", 400, minimum=0)
RETENTION_DAYS_EXPORT_RUNS = env.int("RETENTION_DAYS_EXPORT_RUNS", 400, minimum=0)
# The consumer's daily CSV partitions under TRAINING_DATA_DIR, by their day (0: kept). Events
# arrive up to the relay's lag late, so a partition still being written is never this old.
RETENTION_DAYS_TRAINING_CSV = env.int("RETENTION_DAYS_TRAINING_CSV", 0, minimum=0)
if 0 < RETENTION_DAYS_TRAINING_CSV < 2:
    raise ImproperlyConfigured("RETENTION_DAYS_TRAINING_CSV must be 0 (keep) or at least 2 days")

INFLUXDB_URL = env.optional_str("INFLUXDB_URL")
INFLUXDB_TOKEN = env.optional_str("INFLUXDB_TOKEN")
INFLUXDB_ORG = env.optional_str("INFLUXDB_ORG")
INFLUXDB_BUCKET = env.optional_str("INFLUXDB_BUCKET")
if INFLUXDB_URL and not (INFLUXDB_TOKEN and INFLUXDB_ORG and INFLUXDB_BUCKET):
    raise ImproperlyConfigured(
        "INFLUXDB_URL is set, so INFLUXDB_TOKEN, INFLUXDB_ORG and INFLUXDB_BUCKET must be set too"
    )
# The writer batches points in the background (observability/influx.py); a slow or dead
# InfluxDB drops points past the buffer bound instead of holding tasks or memory.
INFLUXDB_BATCH_SIZE = env.int("INFLUXDB_BATCH_SIZE", 500, minimum=1, maximum=100_000)
INFLUXDB_FLUSH_INTERVAL_MS = env.int("INFLUXDB_FLUSH_INTERVAL_MS", 1000, minimum=10, maximum=600_000)
INFLUXDB_MAX_BUFFERED_POINTS = env.int("INFLUXDB_MAX_BUFFERED_POINTS", 10_000, minimum=1, maximum=10_000_000)
INFLUXDB_TIMEOUT_MS = env.int("INFLUXDB_TIMEOUT_MS", 5000, minimum=100, maximum=600_000)
INFLUXDB_MAX_RETRIES = env.int("INFLUXDB_MAX_RETRIES", 3, minimum=0, maximum=20)
# A process that exits (a pool process recycled or replaced) waits this long at most for its
# last points to be written, holding its worker's slot meanwhile; not at all once InfluxDB failed.
INFLUXDB_EXIT_WAIT_MS = env.int("INFLUXDB_EXIT_WAIT_MS", 500, minimum=0, maximum=600_000)

# Prometheus. prometheus_client reads PROMETHEUS_MULTIPROC_DIR itself at import; it is read
# here too so that the code serving /metrics knows the mode. Workers serve their pool's
# metrics on WORKER_METRICS_PORT (0: not served), which needs PROMETHEUS_MULTIPROC_DIR.
PROMETHEUS_MULTIPROC_DIR = env.optional_str("PROMETHEUS_MULTIPROC_DIR")
if PROMETHEUS_MULTIPROC_DIR and not Path(PROMETHEUS_MULTIPROC_DIR).is_dir():
    # prometheus_client would fail at the first metric, deep in a traceback.
    raise ImproperlyConfigured(f"PROMETHEUS_MULTIPROC_DIR={PROMETHEUS_MULTIPROC_DIR!r} is not an existing directory")
WORKER_METRICS_PORT = env.int("WORKER_METRICS_PORT", 0, minimum=0, maximum=65535)
WORKER_METRICS_ADDR = env.str("WORKER_METRICS_ADDR", "0.0.0.0")  # noqa: S104 - scraped from other containers
METRICS_STATE_CACHE_SECONDS = env.int("METRICS_STATE_CACHE_SECONDS", 5, minimum=0, maximum=3600)
METRICS_COLLECTOR_TIMEOUT_MS = env.int("METRICS_COLLECTOR_TIMEOUT_MS", 1000, minimum=10, maximum=60_000)

# --- REST API (orchestration/api) -------------------------------------------------------
# Requests per user per 60-second window, by role (a fixed window counted in Redis).
API_RATE_LIMITS = {
    "admin": env.int("API_RATE_LIMIT_ADMIN", 1000, minimum=1),
    "developer": env.int("API_RATE_LIMIT_DEVELOPER", 300, minimum=1),
    "viewer": env.int("API_RATE_LIMIT_VIEWER", 120, minimum=1),
}
# Requests without credentials, or whose credentials are refused, per client address per
# 60-second window (an IPv6 client per /64): a 401 costs a key lookup, and keys may be probed.
API_RATE_LIMIT_ANONYMOUS = env.int("API_RATE_LIMIT_ANONYMOUS", 60, minimum=1)
# Reverse proxies (addresses or networks) whose X-Forwarded-For names the client: the client
# is the address nearest to us in that header that is not one of them. Empty: the peer's
# address is the client's, and X-Forwarded-For is ignored (anyone can write it).
API_TRUSTED_PROXIES = env.list("API_TRUSTED_PROXIES")
for _proxy in API_TRUSTED_PROXIES:
    try:
        ipaddress.ip_network(_proxy, strict=False)
    except ValueError:
        raise ImproperlyConfigured(
            f"API_TRUSTED_PROXIES: {_proxy!r} is not an IP address or network (such as 10.0.0.5 or 10.0.0.0/24)"
        ) from None
API_PAGE_SIZE = env.int("API_PAGE_SIZE", 50, minimum=1, maximum=1000)
API_MAX_PAGE_SIZE = env.int("API_MAX_PAGE_SIZE", 200, minimum=1, maximum=1000)
if API_PAGE_SIZE > API_MAX_PAGE_SIZE:
    raise ImproperlyConfigured("API_PAGE_SIZE must not exceed API_MAX_PAGE_SIZE")
# Largest request body (bytes); a bigger one is answered 413.
DATA_UPLOAD_MAX_MEMORY_SIZE = env.int("MAX_REQUEST_BODY_BYTES", 2_621_440, minimum=1024)
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "orchestration.api.authentication.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_THROTTLE_CLASSES": ["orchestration.api.throttling.RoleRateThrottle"],
    "DEFAULT_PARSER_CLASSES": ["orchestration.api.parsers.LimitedJSONParser"],
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
    "DEFAULT_CONTENT_NEGOTIATION_CLASS": "orchestration.api.negotiation.FormatParameterNegotiation",
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_PAGINATION_CLASS": "orchestration.api.pagination.KeysetPagination",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "orchestration.api.errors.problem_exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "AgentLedger API",
    "DESCRIPTION": (
        "Submit multi-agent workflows, follow their tasks, attempts and events, read agents and their "
        "statistics, converse with agents, and (admins) export training data. Authenticate with "
        "`Authorization: Bearer <API key>` (create one with `manage.py create_api_key USER --name NAME`) "
        "or a console session. "
        "Errors are RFC 9457 problem details (`application/problem+json`)."
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SCHEMA_PATH_PREFIX": "/api/v1",
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {
        "WorkflowStatusEnum": "orchestration.models.workflows.WorkflowStatus",
        "TaskStatusEnum": "orchestration.models.workflows.TaskExecutionStatus",
        "AttemptStatusEnum": "orchestration.models.workflows.TaskAttemptStatus",
        "AgentStatusEnum": "orchestration.models.agents.AgentStatus",
        "PriorityEnum": "orchestration.models.workflows.Priority",
        "MessageRoleEnum": "orchestration.models.conversations.AgentPlaygroundMessageRole",
    },
    "SECURITY": [{"ApiKey": []}, {"Session": []}],
    "APPEND_COMPONENTS": {
        "securitySchemes": {
            "ApiKey": {"type": "http", "scheme": "bearer", "description": "al_<prefix>_<secret>"},
            "Session": {"type": "apiKey", "in": "cookie", "name": "sessionid"},
        }
    },
    "AUTHENTICATION_WHITELIST": [],
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "orchestration.api.schema.document_negotiation_problems",
    ],
    # Swagger UI served from our own static files, not a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# --- Auth, i18n, static ---------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# Failed console sign-ins per user name in a fixed window, counted in Redis like the API's rate
# limits: past the limit the login form refuses the name, without checking a password (a
# PBKDF2 hash, a third of a second of CPU each), until the window ends.
CONSOLE_LOGIN_FAILURE_LIMIT = env.int("CONSOLE_LOGIN_FAILURE_LIMIT", 10, minimum=1)
CONSOLE_LOGIN_FAILURE_WINDOW_SECONDS = env.int("CONSOLE_LOGIN_FAILURE_WINDOW_SECONDS", 900, minimum=1)

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(env.str("STATIC_ROOT", str(VAR_DIR / "static")))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}

# --- Logging --------------------------------------------------------------------------
LOG_LEVEL = env.choice("LOG_LEVEL", "INFO", {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"})
# plain: one line of text per record; json: one JSON object per line (observability/logs.py).
LOG_FORMAT = env.choice("LOG_FORMAT", "plain", {"plain", "json"})
# Names of further environment variables whose values are masked in every log line (SECRET_KEY,
# INFLUXDB_TOKEN, URL passwords and the agents' api_key_env variables always are).
LOG_REDACT_ENV = env.list("LOG_REDACT_ENV", [])
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        "task_context": {"()": "observability.logs.TaskContextFilter"},
        "redact": {"()": "observability.logs.RedactFilter"},
        "beat_broker_away": {"()": "observability.logs.BeatBrokerAwayFilter"},
        "revoke_without_backend": {"()": "observability.logs.RevokeWithoutBackendFilter"},
    },
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s%(task_context)s %(message)s"},
        "json": {"()": "observability.logs.JsonFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["task_context", "beat_broker_away", "revoke_without_backend", "redact"],
        }
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    # Django's DEFAULT_LOGGING gives `django` handlers of its own (a console one while DEBUG is
    # on) before this configuration runs: its records would be printed twice, once unformatted
    # and unmasked. Listed without handlers, it keeps its level and reaches only the root's.
    # gunicorn's workers inherit its master's plain-text handlers, which print the access log's
    # request line as the client sent it, query string and its credentials included
    # (`?api_key=...`); without them its records, like django's, reach the root's handler
    # (this format, secrets masked) once the application is loaded.
    "loggers": {
        "django": {"handlers": [], "propagate": True},
        "gunicorn.access": {"handlers": [], "propagate": True},
        "gunicorn.error": {"handlers": [], "propagate": True},
    },
}
