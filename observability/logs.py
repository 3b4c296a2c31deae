"""Structured logs: the task context on every record, secrets masked, JSON on request.

- `TaskContextFilter` copies `workflow_id`, `execution_id` and `attempt` from a contextvar
  onto every record (set while `orchestration.run_task` runs: the execution id when the
  task starts, the workflow and attempt once the attempt is claimed; cleared when it ends).
- `RedactFilter` masks secrets by value in the message, its arguments and the traceback:
  SECRET_KEY, INFLUXDB_TOKEN, passwords in configured URLs, the values of the API-key
  variables that agent definitions name (`api_key_env`) and of LOG_REDACT_ENV, plus
  bearer tokens, Authorization header credentials of any scheme, `sk-...` style keys and
  credentials inside URLs wherever they appear.
- `redact_public` masks text meant for readers outside the deployment (the unauthenticated
  /readyz, command errors) further: configured URL passwords whatever their length, and the
  whole user part of any URL (`scheme://***@host`), user names included.
- `JsonFormatter` (LOG_FORMAT=json): one JSON object per line with timestamp, level,
  logger, message and the context fields.
"""

from __future__ import annotations

import contextvars
import logging
import re
import threading
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote, urlsplit

from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

CONTEXT_FIELDS = ("workflow_id", "execution_id", "attempt")
MASK = "***"
# Shorter values are not masked by value: masking "1" or "true" everywhere would wreck logs.
MIN_SECRET_LENGTH = 6

_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "agentledger_log_context", default=None
)

# A credential's label and separator ("password=", "api_key: ", '"token": '), group 1 of the patterns below.
_CREDENTIAL_LABEL = r"(?i)((?:api[_-]?key|x-api-key|token|password|secret)[\"']?\s*[:=]\s*"
_SECRET_WORDS = ("key", "token", "password", "secret")
# A key sent without a scheme as the second of a pair: what no header name has (the training
# data's _AUTH_PAIR_KEY in config/settings/base.py, which says why).
_PAIR_KEY = r"(?>[0-9]|[a-z0-9_-]*?(?:[^a-z0-9_\-\s\"'\\,)\]]|[0-9](?:[a-z]|[0-9]{3})))[^\s\"'\\]*+"


def _authorization_patterns() -> list[tuple[re.Pattern[str], tuple[str, ...]]]:
    """HTTP Authorization (and Proxy-Authorization) credentials, whatever the scheme, as a header
    line, key=value, JSON, a Python literal, a pair ("Authorization", "Basic ...") whose value
    has a scheme or is shaped like a key (a list of header names has neither: see _AUTH_PAIR_KEY
    in the settings), print arguments (`print("Authorization:", "...")`), an XML element or a
    YAML block scalar. The label and the scheme are kept ("Authorization: Digest ***"); a quoted
    credential is masked up to its closing quote, a bare one is the header's parameters (Digest,
    AWS4-HMAC-SHA256) or one token."""
    # (the label's quote escaped in a JSON text inside a string, `=>` of a Ruby or PHP hash, the
    # first value of a list: multiValueHeaders, Go's Authorization:[...])
    key = r"(?i)(authorization(?:\\?[\"'])?\]?\s*(?:=>|[:=])\s*(?:\[\s*)?"
    pair = r"(?i)(authorization[\"']\s*,\s*"
    scheme = r"[a-z][a-z0-9!#$%&*+.^_`|~-]*[ \t]+"
    param = (
        r"[a-z0-9!#$%*+.^_`|~-]+[ \t]*=[ \t]*"
        r"(?:\"(?:[^\"\\\n]|\\.)*\"?|\\\"(?:[^\"\\\n]|\\[^\"\n])*(?:\\\")?|[^\s\"',]*)"
    )
    # (the label and its separator as one string, the value the next argument)
    split = r"(?i)(authorization[ \t]*[:=][ \t]*\\?[\"'][ \t]*,\s*"
    # (a YAML block scalar: the value on the next, indented line)
    block = key + rf"[|>][0-9+-]{{0,2}}[ \t]*\r?\n[ \t]+(?:{scheme})?)\S[^\r\n]*"
    xml = (
        r"(?i)(authorization(?:\s+[a-z_][a-z0-9_.:-]*[ \t]*=[ \t]*(?:\"[^\"<>]*+\"|'[^'<>]*+'))*+"
        rf"[ \t]*>\s*(?:{scheme})?)[^<>\s][^<>]*?"
        r"(?=\s*</(?:[a-z0-9_.-]+:)?(?:proxy-|http_)?authorization[ \t]*>)"
    )
    patterns = [block, xml, pair + r"[bfru]{0,2}[\"'])" + _PAIR_KEY]
    for quote in ('"', "'"):
        char = rf"(?:[^{quote}\\\n]|\\.)"
        # (or continued by adjacent literals, as pprint splits a long value)
        quoted = rf"(?:{char}*(?:{quote}\s*{quote}{char}*)+|{char}{{6,}})"
        patterns.append(split + rf"[bfru]{{0,2}}{quote}(?:{scheme})?)" + quoted)
        # (not the label's own closing quote before a comma: `print("Authorization:", value)`)
        patterns.append(key + rf"[bfru]{{0,2}}{quote}(?![ \t]*,)(?:{scheme})?)" + quoted)
        patterns.append(pair + rf"[bfru]{{0,2}}{quote}{scheme})" + quoted)
    patterns.append(split + rf"\\\"(?:{scheme})?)(?:[^\"\\\n]|\\[^\"\n]){{6,}}")
    patterns.append(key + rf"\\\"(?![ \t]*,)(?:{scheme})?)(?:[^\"\\\n]|\\[^\"\n]){{6,}}")
    patterns.append(key + rf"(?:{scheme})?)(?:{param}(?:[ \t]*,[ \t]*{param})*|[^\s\"',;&*]{{6,}})")
    return [(re.compile(pattern), ("authorization",)) for pattern in patterns]


# (pattern, words one of which the lower-cased text must contain for the pattern to be tried:
# most log lines contain none, and a substring test is much cheaper than a regex scan)
PATTERNS = (
    # (before the bearer/basic pattern: a header's scheme is kept, and its credential masked once)
    *_authorization_patterns(),
    (re.compile(r"(?i)(\b(?:bearer|basic)\s+)[A-Za-z0-9._~+/=-]{8,}"), ("bearer", "basic")),
    # key=value and "key": "value": a quoted value is masked up to its closing quote (a
    # passphrase has spaces, a value may hold commas), an unquoted one up to a separator.
    (re.compile(_CREDENTIAL_LABEL + r"\")[^\"\n]{6,}"), _SECRET_WORDS),
    (re.compile(_CREDENTIAL_LABEL + r"')[^'\n]{6,}"), _SECRET_WORDS),
    (re.compile(_CREDENTIAL_LABEL + r")[^\s\"',;&]{6,}"), _SECRET_WORDS),
    (re.compile(r"\b(sk-(?:ant-|proj-)?)[A-Za-z0-9_-]{12,}"), ("sk-",)),
    # The platform's own API keys (al_<prefix>_<secret>): the prefix names the key (as the
    # console and the audit log do), the secret is masked.
    (re.compile(r"\b(al_[0-9a-f]{8}_)[A-Za-z0-9_-]{16,}"), ("al_",)),
    (re.compile(r"(?i)([a-z][a-z0-9+.-]*://[^/@\s:]*:)[^/@\s]+(?=@)"), ("://",)),
)
_ANY_WORD = re.compile("|".join(re.escape(word) for _, words in PATTERNS for word in words))
_URL_USERINFO = re.compile(r"(?i)([a-z][a-z0-9+.-]*://)[^/@\s]*@")
CONFIGURED_URLS = ("REDIS_URL", "CELERY_BROKER_URL", "INFLUXDB_URL")
# The attributes every LogRecord has; any other one is an `extra` (Celery's `data` with the
# raw exception and traceback of a failed task, django.request's `request` with its query
# string), which the JSON format writes out and so must be masked too.
_RECORD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "task_context"}


def log_context_bind(**fields: Any) -> None:
    """Add fields to the current log context (None values are left out)."""
    current = dict(_context.get() or {})
    current.update({key: value for key, value in fields.items() if value is not None})
    _context.set(current)


def log_context_clear() -> None:
    _context.set(None)


def log_context() -> dict[str, Any]:
    return dict(_context.get() or {})


class TaskContextFilter(logging.Filter):
    """Puts workflow_id, execution_id and attempt on every record (None outside a task), and
    `task_context`, their text form for the plain format (empty outside a task)."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = _context.get() or {}
        for key in CONTEXT_FIELDS:
            if getattr(record, key, None) is None:
                setattr(record, key, current.get(key))
        shown = [f"{key}={getattr(record, key)}" for key in CONTEXT_FIELDS if getattr(record, key) is not None]
        record.task_context = f" [{' '.join(shown)}]" if shown else ""
        return True


def configured_secrets(extra_env_names: Iterable[str] = ()) -> set[str]:
    """Secret values known from settings and from the environment variables agents name (in
    their definition files, and `extra_env_names`: those only the agents table names)."""
    from django.conf import settings

    from config.env import env

    values = configured_url_passwords()
    for name in ("SECRET_KEY", "INFLUXDB_TOKEN"):
        value = getattr(settings, name, None)
        if value:
            values.add(str(value))
    for database in getattr(settings, "DATABASES", {}).values():
        if database.get("PASSWORD"):
            values.add(str(database["PASSWORD"]))
    from orchestration.runtime.llm import ENV_NAME

    # Every variable an agent names, whether or not AGENT_API_KEY_ENV_ALLOWED admits it now:
    # the allow-list decides what is read and sent from now on (new agents naming PATH are
    # refused on creation), but an agent made before it, or before the operator narrowed it,
    # may have sent that value already, and the records of those calls are still exported.
    # Read with agent_secret, never a recording getter: a name read here must not become one
    # of the platform's own settings, which agents may not name.
    agent_names = {name for name in {*api_key_env_names(), *extra_env_names} if ENV_NAME.match(name)}
    for name in sorted(agent_names | set(getattr(settings, "LOG_REDACT_ENV", []))):
        value = env.agent_secret(name)
        if value:
            values.add(value)
    with _registered_lock:
        values |= _registered
    return {value for value in values if len(value) >= MIN_SECRET_LENGTH}


_registered: set[str] = set()  # secrets this process has read at run time (secret_register)
_registered_version = 0
_registered_lock = threading.Lock()


def secret_register(value: str) -> None:
    """Mask `value` in this process's log lines from now on: a secret read at run time, such
    as the key of an agent made through the API, which no definition file names."""
    global _registered_version
    with _registered_lock:
        if len(value) >= MIN_SECRET_LENGTH and value not in _registered:
            _registered.add(value)
            _registered_version += 1


def configured_url_passwords() -> set[str]:
    """The passwords in the configured service URLs (REDIS_URL, CELERY_BROKER_URL, INFLUXDB_URL),
    as the URL spells them and, when percent-encoded, as the clients send them (decoded)."""
    from django.conf import settings

    passwords = set()
    for name in CONFIGURED_URLS:
        url = getattr(settings, name, None)
        password = urlsplit(url).password if url else None
        if password:
            passwords.add(password)
            passwords.add(unquote(password))
    return passwords


def api_key_env_names() -> Iterable[str]:
    """The `api_key_env` names in the agent definition files (definitions are code)."""
    from orchestration.services.agents import default_definitions_dir, definition_load

    directory = default_definitions_dir()
    if not directory.is_dir():
        return []
    names = []
    for path in sorted(directory.iterdir()):
        if path.suffix.lower() not in (".json", ".yaml", ".yml"):
            continue
        try:
            definition = definition_load(path)
        except Exception:  # noqa: S112 - a broken definition is load_agents' to report, not the logger's
            continue
        name = definition.get("api_key_env") if isinstance(definition, dict) else None
        if isinstance(name, str) and name:
            names.append(name)
    return names


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every known secret value and every secret-looking pattern masked. Pass
    `secrets` longest first (RedactFilter.secrets does), so that a secret containing another
    is masked whole."""
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    lowered = text.lower()
    if not _ANY_WORD.search(lowered):
        return text
    for pattern, words in PATTERNS:
        if any(word in lowered for word in words):
            text = pattern.sub(lambda m: m.group(1) + MASK, text)
    return text


def redact_public(text: str) -> str:
    """`text` for readers outside the deployment: `redact` with every configured secret, and
    besides the configured URL passwords of any length and the whole user part of any URL.
    Reads the settings at each call (it runs on error paths, not per log record)."""
    secrets = configured_secrets() | configured_url_passwords()
    text = redact(text, sorted(secrets, key=len, reverse=True))
    return _URL_USERINFO.sub(rf"\g<1>{MASK}@", text)


class RedactFilter(logging.Filter):
    """Masks secrets in the rendered message and the traceback of every record."""

    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        # (the registration version they were read at, the secret values): one attribute,
        # replaced whole and read once per record, so that a thread logging while another
        # re-reads them never sees the values of one reading with the version of another, nor
        # None (an exception in a filter reaches the code that logged).
        self._read: tuple[int, tuple[str, ...]] | None = None
        self._computing = threading.local()

    def secrets(self) -> tuple[str, ...]:
        """The configured secret values and those registered since (secret_register), longest
        first (computed once, and again after a registration)."""
        read = self._read
        if read is not None and read[0] == _registered_version:
            return read[1]
        if getattr(self._computing, "active", False):
            return read[1] if read is not None else ()  # a record logged while they are being read
        version = _registered_version
        self._computing.active = True
        try:
            secrets = tuple(sorted(configured_secrets(), key=len, reverse=True))
        except Exception:
            # Settings or apps not ready yet (a record during start-up): what was read before
            # (patterns only at first), and try again on the next record.
            return read[1] if read is not None else ()
        finally:
            self._computing.active = False
        self._read = (version, secrets)
        return secrets

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = self.secrets()
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        record.msg = redact(message, secrets)
        record.args = None
        if record.exc_info:
            formatter = logging.Formatter()
            record.exc_text = redact(formatter.formatException(record.exc_info), secrets)
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = redact(record.exc_text, secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, secrets)
        for key in record.__dict__.keys() - _RECORD_ATTRIBUTES:
            record.__dict__[key] = _redact_value(record.__dict__[key], secrets)
        return True


def _broker_unreachable(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from or while handling, says the broker
    could not be reached (kombu's OperationalError, redis-py's connection errors, a socket's)."""
    import redis
    from kombu.exceptions import OperationalError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OperationalError | redis.ConnectionError | redis.TimeoutError | OSError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


class BeatBrokerAwayFilter(logging.Filter):
    """celery beat logs each run it could not send with the stack it was sent from and the whole
    exception chain: with the broker away, some 130 lines a second (the relay's schedule), for
    every second of the outage. Those records become their one line, the run it could not send
    and the broker's error; any other failure to send keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "celery.beat" or not record.exc_info or record.exc_info[1] is None:
            return True
        from celery.beat import SchedulingError

        exc = record.exc_info[1]
        # Only a run it could not send (apply_async's SchedulingError): beat's other records
        # (its schedule file unreadable, the disk full: OSErrors too) keep their message and
        # traceback.
        if not isinstance(exc, SchedulingError) or not _broker_unreachable(exc):
            return True
        record.msg = "%s (the broker is not answering: this run was not sent)"
        record.args = (exc,)
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        return True


class RevokeWithoutBackendFilter(logging.Filter):
    """Celery 5.6+ marks a revoked task in the result backend on every worker the revoke reaches
    (a broadcast: each of them), and with no result backend configured (this project records a
    cancellation itself, in PostgreSQL) logs "Failed to mark task ... as revoked in backend: No
    result backend is configured" as a WARNING for each task of each cancel, on each worker.
    Those records are dropped; a backend that is configured and fails keeps its warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "celery.worker.control" or not str(record.msg).startswith("Failed to mark task"):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        # celery.backends.base.DisabledBackend raises NotImplementedError for every call.
        return not (len(args) == 2 and isinstance(args[1], NotImplementedError))


_EXTRA_DEPTH = 8  # containers nested deeper (or holding themselves) are masked as their text


def _redact_value(value: Any, secrets: tuple[str, ...], depth: int = 0) -> Any:
    """An `extra` with its secrets masked: strings, and the strings inside dicts, lists and
    tuples (copies: the caller's objects are left alone); any other object that renders a
    secret is replaced by its masked text, the rest kept as they are."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return redact(value, secrets)
    if depth < _EXTRA_DEPTH and isinstance(value, dict):
        return {key: _redact_value(item, secrets, depth + 1) for key, item in value.items()}
    if depth < _EXTRA_DEPTH and type(value) in (list, tuple):
        return type(value)(_redact_value(item, secrets, depth + 1) for item in value)
    try:
        text = str(value)
    except Exception:
        return value
    masked = redact(text, secrets)
    return value if masked == text else masked


class JsonFormatter(_JsonFormatter):
    """One JSON object per line: timestamp, level, logger, message, the task context, extras."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("fmt", "%(asctime)s %(levelname)s %(name)s %(message)s")
        kwargs.setdefault("rename_fields", {"asctime": "timestamp", "levelname": "level", "name": "logger"})
        kwargs.setdefault("json_ensure_ascii", False)
        kwargs.setdefault("timestamp", False)
        super().__init__(*args, **kwargs)

    def add_fields(self, log_record: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        super().add_fields(log_record, record, message_dict)
        log_record.pop("task_context", None)  # the plain format's rendering of the fields below
        for key in CONTEXT_FIELDS:
            log_record.setdefault(key, getattr(record, key, None))

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        import datetime as dt

        return dt.datetime.fromtimestamp(record.created, tz=dt.UTC).isoformat(timespec="milliseconds")
