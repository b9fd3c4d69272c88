#!/usr/bin/env bash
# Build the sdist and wheel, check their metadata, install the wheel (and nothing else from the
# repo) into a clean virtualenv with Airflow, and ask Airflow what it sees of the provider.
# Usage: scripts/release_check.sh [airflow version]   (make release-check)
set -euo pipefail
AIRFLOW_VERSION=${1:-3.3.2}
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d -t fal-release-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
PYTHON=${PYTHON:-python3}

echo "==> build sdist and wheel into $WORK/dist"
"$PYTHON" -m venv "$WORK/tools"
"$WORK/tools/bin/pip" install -q uv
VIRTUAL_ENV="$WORK/tools" "$WORK/tools/bin/uv" pip install -q twine
# from a copy of the tracked files only, so nothing local (venvs, egg-info) leaks into the sdist
git -C "$REPO" archive --format=tar HEAD | tar -x -C "$WORK" --one-top-level=src
"$WORK/tools/bin/uv" build -q --sdist --wheel --out-dir "$WORK/dist" "$WORK/src"
ls -l "$WORK/dist"

echo "==> twine check"
"$WORK/tools/bin/twine" check --strict "$WORK"/dist/*

echo "==> the wheel's metadata"
WHEEL=$(ls "$WORK"/dist/*.whl)
"$WORK/tools/bin/python" - "$WHEEL" <<'PY'
import sys, zipfile
from email.parser import Parser
with zipfile.ZipFile(sys.argv[1]) as wheel:
    names = wheel.namelist()
    meta = Parser().parsestr(wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode())
    entry = wheel.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
assert meta["Name"] == "airflow-provider-fal", meta["Name"]
assert meta["License-Expression"] == "Apache-2.0", meta["License-Expression"]
requires = meta.get_all("Requires-Dist")
assert any(r.startswith("apache-airflow<3.4,>=3.0.0") or r.startswith("apache-airflow>=3.0.0,<3.4") for r in requires), requires
assert "[apache_airflow_provider]" in entry and "get_provider_info" in entry, entry
assert not [n for n in names if n.startswith(("tests/", "example_dags/", "bench/"))], "test code in the wheel"
assert any(n.endswith("LICENSE") for n in names), "no LICENSE in the wheel"
print(f"{meta['Name']} {meta['Version']}: License-Expression {meta['License-Expression']}; requires {requires}")
PY

echo "==> install the wheel into a clean virtualenv with apache-airflow==$AIRFLOW_VERSION"
"$PYTHON" -m venv "$WORK/clean"
# CONSTRAINTS (set by make release-check): the pins CI's own venvs install with (constraints/)
VIRTUAL_ENV="$WORK/clean" "$WORK/tools/bin/uv" pip install -q ${CONSTRAINTS:+--constraint "$REPO/$CONSTRAINTS"} \
    "apache-airflow==$AIRFLOW_VERSION" "$WHEEL"
export AIRFLOW_HOME="$WORK/airflow" AIRFLOW__CORE__LOAD_EXAMPLES=False
cd "$WORK"
"$WORK/clean/bin/airflow" providers list > "$WORK/providers.txt"
"$WORK/clean/bin/airflow" providers hooks > "$WORK/hooks.txt"
grep -E "airflow-provider-fal" "$WORK/providers.txt"
grep -E "^fal\b|\bfal\b.*FalHook" "$WORK/hooks.txt"
grep -q "airflow-provider-fal" "$WORK/providers.txt" || { echo "provider not listed"; cat "$WORK/providers.txt"; exit 1; }
grep -q "FalHook" "$WORK/hooks.txt" || { echo "FalHook not listed"; cat "$WORK/hooks.txt"; exit 1; }
"$WORK/clean/bin/python" -c "import airflow_provider_fal, sys; assert 'site-packages' in airflow_provider_fal.__file__, airflow_provider_fal.__file__"
echo "==> release check passed"
