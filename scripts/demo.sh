#!/usr/bin/env bash
# Run the quickstart example DAG end to end with `airflow dags test` in a throwaway
# AIRFLOW_HOME (SQLite). Without FAL_KEY it starts the bundled fal emulator and points the
# `fal_default` connection at it; with FAL_KEY it calls the real fal.ai (billed!).
# Usage: scripts/demo.sh [python]   (the Makefile passes its virtualenv's python)
set -euo pipefail
PY=${1:-python3}
REPO=$(cd "$(dirname "$0")/.." && pwd)
DAG_ID=${DAG_ID:-fal_quickstart}
WORK=$(mktemp -d -t fal-demo-XXXXXX)
export AIRFLOW_HOME="$WORK/airflow"
export AIRFLOW__CORE__DAGS_FOLDER="$REPO/example_dags"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="sqlite:///$AIRFLOW_HOME/airflow.db"
export FAL_EXAMPLE_OUTPUT_DIR="$WORK/output"
mkdir -p "$AIRFLOW_HOME" "$FAL_EXAMPLE_OUTPUT_DIR"

EMULATOR_PID=""
cleanup() { [ -n "$EMULATOR_PID" ] && kill "$EMULATOR_PID" 2>/dev/null || true; }
trap cleanup EXIT

if [ -z "${FAL_KEY:-}" ]; then
  export FAL_EMULATOR_KEY="demo-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
  "$PY" -m airflow_provider_fal.emulator --port 0 --ready-file "$WORK/emulator.url" > "$WORK/emulator.log" 2>&1 &
  EMULATOR_PID=$!
  for _ in $(seq 1 100); do [ -s "$WORK/emulator.url" ] && break; sleep 0.1; done
  [ -s "$WORK/emulator.url" ] || { echo "emulator did not start:"; cat "$WORK/emulator.log"; exit 1; }
  URL=$(cat "$WORK/emulator.url")
  export AIRFLOW_CONN_FAL_DEFAULT="{\"conn_type\": \"fal\", \"host\": \"$URL\", \"password\": \"$FAL_EMULATOR_KEY\", \"extra\": {\"queue_url\": \"$URL/queue\"}}"
  echo "==> No FAL_KEY set: using the fal emulator at $URL"
else
  echo "==> FAL_KEY is set: calling the real fal.ai (this is billed)"
fi

echo "==> Airflow home: $AIRFLOW_HOME"
"$PY" -m airflow db migrate > "$WORK/db-migrate.log" 2>&1 || { tail -50 "$WORK/db-migrate.log"; exit 1; }
"$PY" -m airflow dags reserialize > "$WORK/reserialize.log" 2>&1 || { tail -50 "$WORK/reserialize.log"; exit 1; }
echo "==> airflow dags test $DAG_ID"
set +e
"$PY" -m airflow dags test "$DAG_ID" > "$WORK/dag-test.log" 2>&1
STATUS=$?
set -e
grep -E "fal request|Stored as|Summary written|state=|ERROR|Error" "$WORK/dag-test.log" | grep -v "^\s*$" | tail -20 || true
if [ $STATUS -ne 0 ] || ! grep -q "state=success" "$WORK/dag-test.log"; then
  echo "==> FAILED (full log: $WORK/dag-test.log)"
  exit 1
fi
echo "==> Success. Results: $FAL_EXAMPLE_OUTPUT_DIR"
find "$FAL_EXAMPLE_OUTPUT_DIR" -type f -exec ls -l {} +
echo "==> Full DAG log: $WORK/dag-test.log"
