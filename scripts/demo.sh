#!/usr/bin/env bash
# Run the quickstart and the nightly batch generation example DAGs end to end with `airflow dags test` in a throwaway
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
  export AIRFLOW_CONN_FAL_DEFAULT="{\"conn_type\": \"fal\", \"host\": \"$URL\", \"password\": \"$FAL_EMULATOR_KEY\", \"extra\": {\"queue_url\": \"$URL/queue\", \"api_url\": \"$URL\", \"rest_url\": \"$URL\", \"cdn_url\": \"$URL\"}}"
  echo "==> No FAL_KEY set: using the fal emulator at $URL"
else
  echo "==> FAL_KEY is set: calling the real fal.ai (this is billed)"
fi

echo "==> Airflow home: $AIRFLOW_HOME"
"$PY" -m airflow db migrate > "$WORK/db-migrate.log" 2>&1 || { tail -50 "$WORK/db-migrate.log"; exit 1; }
"$PY" -m airflow dags reserialize > "$WORK/reserialize.log" 2>&1 || { tail -50 "$WORK/reserialize.log"; exit 1; }

run_dag() {  # airflow dags test <dag id>; prints the interesting lines, fails the demo if the run failed
  local dag_id=$1 log="$WORK/dag-test-$1.log" status
  echo "==> airflow dags test $dag_id"
  set +e
  "$PY" -m airflow dags test "$dag_id" > "$log" 2>&1
  status=$?
  set -e
  grep -E "fal request|Stored as|Summary written|prompts generated|Images and the batch manifest|resuming from|DagRun Finished|ERROR|Error" "$log" \
    | sed -E 's/^[0-9T:.-]+Z \[[a-z ]+\] +//; s/(DagRun Finished: dag_id=[^,]+).*(state=[a-z]+).*/\1, \2/' | cut -c1-220 | tail -12 || true
  if [ $status -ne 0 ] || ! grep -q "state=success" "$log"; then
    echo "==> $dag_id FAILED (full log: $log)"
    exit 1
  fi
}

# The quickstart (one image), then the main job: scheduled batch generation of the shipped prompts.
for dag_id in ${DAG_IDS:-$DAG_ID fal_batch_generation}; do
  run_dag "$dag_id"
done

echo "==> Success. Results under $FAL_EXAMPLE_OUTPUT_DIR"
SUMMARY=$(ls "$FAL_EXAMPLE_OUTPUT_DIR"/fal_batch_generation/*/summary.json 2>/dev/null | head -1 || true)
if [ -n "$SUMMARY" ]; then
  RUN_DIR=$(dirname "$SUMMARY")
  echo "    batch report:   $RUN_DIR/report.jsonl (manifest: $RUN_DIR/images/generate_images__manifest.jsonl)"
  echo "    batch images:   $RUN_DIR/images/ ($(ls "$RUN_DIR/images"/*.png | wc -l) files)"
  "$PY" - "$SUMMARY" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))
if summary.get("cost") is not None:
    cost_text = (f", billed {summary['billed_units']:g} {summary['unit']}: {summary['cost']:g} {summary['currency']}"
                 f" at {summary['unit_price']:g} each")
elif summary.get("billed_units"):
    cost_text = f", billed {summary['billed_units']:g} units (no price could be read; see your fal dashboard)"
else:
    cost_text = ", cost not reported (fal bills per output; see your fal dashboard)"
print(f"    batch summary:  {summary['succeeded']} generated, {summary['failed']} failed of {summary['total']}{cost_text}")
PY
fi
QUICK=$(ls "$FAL_EXAMPLE_OUTPUT_DIR"/fal_quickstart_result.json 2>/dev/null || true)
[ -n "$QUICK" ] && echo "    quickstart:     $QUICK and $FAL_EXAMPLE_OUTPUT_DIR/images/"
echo "==> Full DAG logs: $WORK/dag-test-*.log"
