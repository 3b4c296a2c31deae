#!/usr/bin/env bash
# Makes sure PostgreSQL and Redis answer on loopback, starting (and, on a bare Debian
# machine, installing) them when they do not. Used by `make test` and .ci/run.
set -euo pipefail

PG_HOST=127.0.0.1
PG_PORT=5432
REDIS_PORT=6379

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

pg_up() { pg_isready -q -h "$PG_HOST" -p "$PG_PORT" 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; }

install_missing() {
  local missing=()
  command -v pg_ctlcluster >/dev/null 2>&1 || missing+=(postgresql)
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

if ! pg_up; then
  install_missing
  echo "starting PostgreSQL"
  version=$(ls /etc/postgresql | sort -V | tail -1)
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
fi
if ! redis_up; then
  install_missing
  echo "starting Redis"
  as_root mkdir -p /var/lib/redis /var/log/redis
  as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi

for _ in $(seq 1 30); do
  if pg_up && redis_up; then
    # The suite's default database (its test database is created from it by pytest-django).
    if ! psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -Atc "SELECT 1 FROM pg_database WHERE datname = 'agentledger'" \
        | grep -q 1; then
      createdb -h "$PG_HOST" -p "$PG_PORT" -U postgres agentledger
    fi
    echo "PostgreSQL and Redis are up"
    exit 0
  fi
  sleep 1
done
pg_up || echo "PostgreSQL is not answering on $PG_HOST:$PG_PORT" >&2
redis_up || echo "Redis is not answering on 127.0.0.1:$REDIS_PORT" >&2
exit 1
