#!/usr/bin/env bash
# `make demo`: set up the database, start a Celery worker and beat, run the demo workflow
# (examples/demo.yaml) with live progress, print its record, and stop what it started.
# With nothing configured this uses SQLite and a filesystem broker under var/; with
# DATABASE_URL / REDIS_URL set, PostgreSQL and Redis.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
logs=${VAR_DIR:-var}
mkdir -p "$logs"

echo "== database"
$PY manage.py migrate --noinput -v0
echo "== agents (agents/definitions/)"
$PY manage.py load_agents

pids=()
stop() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop EXIT

echo "== a worker and beat in the background (logs: $logs/demo-worker.log, $logs/demo-beat.log)"
$PY -m celery -A config worker -P prefork -c 2 -l warning -Q system,critical,high,normal,low -n "demo-$$@%h" \
  > "$logs/demo-worker.log" 2>&1 &
pids+=($!)
$PY -m celery -A config beat -l warning -s "$logs/demo-beat-schedule" --pidfile= > "$logs/demo-beat.log" 2>&1 &
pids+=($!)

echo "== running examples/demo.yaml: a retried failure, fan-out, tool calls, a review hand-off, fan-in"
# Straight to the terminal, not through a pipe: submit_workflow redraws its progress only when
# its output is a terminal (through `| tee` a user saw nothing until the workflow had ended).
$PY manage.py submit_workflow examples/demo.yaml --wait --timeout 180
workflow_id=$($PY manage.py shell --no-imports -c "
from orchestration.models import Workflow
print(Workflow.objects.filter(workflow_type='demo', initiator='manage.py').latest('created_at').pk)
")
echo
echo "== the record: every task and every attempt, with durations, tokens and cost"
$PY manage.py workflow_status "$workflow_id"
echo
echo "== the report (output of the fan-in task)"
$PY manage.py shell --no-imports -c "
import json
from orchestration.models import TaskExecution
print(json.dumps(TaskExecution.objects.get(workflow_id='$workflow_id', task_name='report').output_data, indent=2))
"
echo
echo "== sample data for the console"
$PY manage.py load_sample_data
