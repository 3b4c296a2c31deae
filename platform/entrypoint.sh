#!/usr/bin/env bash
# Entrypoint of the application image (web, worker, beat, synapse).
#
#   entrypoint.sh web           wait for the dependencies, migrate, sync agent definitions, serve with gunicorn on :8000
#   entrypoint.sh serve         the same without migrating or syncing: further web containers of a release
#   entrypoint.sh check-deps    one quick try at every configured dependency; exit 1 if one is
#                               unreachable (used as a container healthcheck)
#   entrypoint.sh CMD [ARG...]  wait for the dependencies, then exec CMD (a `celery ... worker`
#                               with WORKER_METRICS_PORT set gets an empty PROMETHEUS_MULTIPROC_DIR)
#
# Dependencies are the hosts named by DATABASE_URL, REDIS_URL and CELERY_BROKER_URL, when
# those are set and name a network service (sqlite:// and filesystem:// need no waiting).
# WAIT_TIMEOUT (seconds, default 60) bounds the wait.
set -euo pipefail

log() { echo "entrypoint: $*" >&2; }

# Prints "host port" for the URL $1 (named $2 in errors) if it names a network service,
# nothing otherwise. Python parses the URL: a password may hold characters that shell
# patterns trip over.
endpoint() {
  python - "$1" "$2" <<'PY'
import sys
from urllib.parse import urlsplit

DEFAULT_PORTS = {
    "postgres": 5432, "postgresql": 5432, "pgsql": 5432,
    "redis": 6379, "rediss": 6379,  # redis-py and kombu: TLS on the same default port
    "amqp": 5672, "pyamqp": 5672, "amqps": 5671,
}
url = urlsplit(sys.argv[1])
try:
    port = url.port
except ValueError as exc:
    sys.exit(f"entrypoint: {sys.argv[2]} is not a usable URL: {exc}")
if url.scheme in DEFAULT_PORTS and url.hostname:
    print(url.hostname, port or DEFAULT_PORTS[url.scheme])
PY
}

reachable() {
  timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2" 2>/dev/null
}

wait_for() {
  local name=$1 url=${2:-} limit=$3 target host port deadline
  [[ -n $url ]] || return 0
  target=$(endpoint "$url" "$name")
  [[ -n $target ]] || return 0
  read -r host port <<<"$target"
  deadline=$((SECONDS + limit))
  until reachable "$host" "$port"; do
    if ((SECONDS >= deadline)); then
      log "$name at $host:$port is not reachable (gave up after ${limit}s)"
      return 1
    fi
    log "waiting for $name at $host:$port"
    sleep 1
  done
}

wait_for_dependencies() {
  local limit=${1:-${WAIT_TIMEOUT:-60}}
  # Checked here: bash's arithmetic would read "60s" or "abc" with an error naming neither the
  # variable nor what it wants, a negative number as no wait, and "08" as octal.
  if [[ ! $limit =~ ^[0-9]+$ ]]; then
    log "WAIT_TIMEOUT='$limit' is not a whole number of seconds"
    exit 1
  fi
  limit=$((10#$limit))
  wait_for DATABASE_URL "${DATABASE_URL:-}" "$limit"
  wait_for REDIS_URL "${REDIS_URL:-}" "$limit"
  wait_for CELERY_BROKER_URL "${CELERY_BROKER_URL:-}" "$limit"
}

if [[ $# -eq 0 ]]; then
  set -- web
fi

case "$1" in
  web | serve)
    wait_for_dependencies
    # One container per release migrates (web); the others only serve, as it does.
    if [[ $1 == web ]]; then
      # Migrations may rewrite or validate big tables: the web's statement and idle-transaction
      # limits are for requests, not for them.
      DATABASE_STATEMENT_TIMEOUT_SECONDS=0 DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS=0 \
        python manage.py migrate --noinput
      python manage.py load_agents
    fi
    # gunicorn runs several worker processes; prometheus_client's multiprocess mode (which
    # django_prometheus's /metrics view honours) aggregates them. Set only after migrate,
    # and emptied first, so no other or earlier process's samples are reported.
    export PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus-multiproc
    rm -rf "$PROMETHEUS_MULTIPROC_DIR"
    mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
    # Worker count: gunicorn reads WEB_CONCURRENCY itself. The control socket would go under
    # $HOME, which the app user cannot write, and nothing in a container uses it. Threaded
    # workers: a sync worker is killed once a request has run 30 s (--timeout), which cuts a
    # large export download off mid-file with a 200 already sent; a gthread worker's timeout
    # only watches that the process is alive. Each thread holds its own database connection.
    # The request limits (compose's WEB_*; see docker-compose.yml) for the server only: a
    # one-off command in this container (migrate, exec ... manage.py) runs without them.
    export DATABASE_STATEMENT_TIMEOUT_SECONDS="${WEB_STATEMENT_TIMEOUT_SECONDS:-${DATABASE_STATEMENT_TIMEOUT_SECONDS:-0}}"
    export DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS="${WEB_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS:-${DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS:-0}}"
    exec gunicorn config.wsgi:application \
      --bind 0.0.0.0:8000 \
      --worker-class gthread \
      --threads 4 \
      --worker-tmp-dir /dev/shm \
      --no-control-socket \
      --access-logfile -
    ;;
  check-deps)
    wait_for_dependencies 0
    ;;
  *)
    wait_for_dependencies
    # A Celery worker serving metrics (WORKER_METRICS_PORT) collects its pool processes'
    # samples with prometheus_client's multiprocess mode, from a directory emptied at each
    # start. Only the worker gets the variable: a healthcheck's `celery inspect` (run by
    # docker exec, not through here) must not leave its own files in that directory.
    if [[ ${1:-} == celery && " $* " == *" worker "* && -n ${WORKER_METRICS_PORT:-} ]]; then
      export PROMETHEUS_MULTIPROC_DIR=${PROMETHEUS_MULTIPROC_DIR:-/tmp/prometheus-multiproc}
      rm -rf "$PROMETHEUS_MULTIPROC_DIR"
      mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
    fi
    exec "$@"
    ;;
esac
