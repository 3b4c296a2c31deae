#!/usr/bin/env bash
# `make demo`: set up the database, run a real workflow on a real Celery worker, and print
# how to open the console. With nothing configured this uses SQLite and a filesystem
# broker under var/; with DATABASE_URL / REDIS_URL set, PostgreSQL and Redis.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
logs=${VAR_DIR:-var}
mkdir -p "$logs"

echo "== database"
$PY manage.py migrate --noinput -v0
echo "== agents (agents/definitions/)"
$PY manage.py load_agents

echo "== a worker (log: $logs/demo-worker.log)"
$PY -m celery -A config worker -P prefork -c 2 -l warning -Q critical,high,normal,low -n "demo-$$@%h" \
  > "$logs/demo-worker.log" 2>&1 &
worker=$!
trap 'kill "$worker" 2>/dev/null || true; wait "$worker" 2>/dev/null || true' EXIT

echo "== running examples/demo.yaml (fan-out, a flaky step retried, fan-in)"
$PY manage.py submit_workflow examples/demo.yaml --wait --timeout 120 | tee "$logs/demo-run.txt"
workflow_id=$(head -n 1 "$logs/demo-run.txt" | cut -d' ' -f1)
echo
echo "== the record: every task and every attempt"
$PY manage.py workflow_status "$workflow_id"
echo
echo "== sample data for the console"
$PY manage.py load_sample_data
