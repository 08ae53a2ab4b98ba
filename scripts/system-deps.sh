#!/usr/bin/env bash
# Debian packages the tests drive for real: Prometheus (scrapes a node and `swarm monitor`) and
# Chromium (renders the status page). Installed only when a binary is missing, so a machine
# that has them pays nothing; CI runs this from `make test` as root.
set -euo pipefail
missing=()
command -v prometheus >/dev/null || missing+=(prometheus)
command -v chromium >/dev/null || missing+=(chromium)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
