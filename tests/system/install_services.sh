#!/usr/bin/env bash
# Installs PostgreSQL and Redis for tests/system on Debian/Ubuntu (run as root; CI machines).
# The packages' own services are not started: the tests run their own throw-away instances.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
policy=/usr/sbin/policy-rc.d
created=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && created=1
fi
trap '[ "$created" = 1 ] && rm -f "$policy"' EXIT
apt-get update -q
apt-get install -y -q --no-install-recommends postgresql redis-server
