#!/usr/bin/env bash
# Install what the browser test needs, only where it is missing:
#   - Chromium from Debian's packages (apt-get; needs root),
#   - the Playwright Python package into the venv of PYTHON (default: python3 on PATH).
# Playwright drives that system Chromium; it never downloads a browser of its own
# (`playwright install` is never run, and PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD is set).
#
# Usage: tests/browser/install_browser.sh [/path/to/venv/bin/python]
set -euo pipefail

PYTHON="${1:-${PYTHON:-python3}}"
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1

if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "install_browser: Chromium is missing and apt-get as root is not available" >&2
        exit 2
    fi
    echo "install_browser: installing Chromium from Debian's packages" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi

if ! "$PYTHON" -c "import playwright.sync_api" >/dev/null 2>&1; then
    echo "install_browser: installing the playwright package into $PYTHON" >&2
    # the venv's own uv first (make's venvs have one): it honours UV_CONSTRAINT, the pins `make test` sets
    UV="$(dirname "$PYTHON")/uv"
    [ -x "$UV" ] || UV="$(command -v uv || true)"
    if [ -n "$UV" ]; then
        "$UV" pip install --quiet --python "$PYTHON" playwright
    elif "$PYTHON" -m pip --version >/dev/null 2>&1; then
        "$PYTHON" -m pip install --quiet playwright
    else
        "$PYTHON" -m ensurepip --upgrade >/dev/null
        "$PYTHON" -m pip install --quiet playwright
    fi
fi

command -v chromium
"$PYTHON" -c "import playwright.sync_api; print('playwright ok')"
