#!/usr/bin/env bash
# Shared set-up: system packages (apt-get, when missing) and the project virtualenv in .venv.
# Usage: scripts/setup.sh [extra]   -- extra is a pip extra such as "test".
set -euo pipefail
cd "$(dirname "$0")/.."

packages=()
python3 -c 'import ensurepip, venv' 2>/dev/null || packages+=(python3-venv)
if [ "${1:-}" = "test" ]; then
    command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)
    # The Redis Cluster tests create their cluster with redis-cli (Debian: redis-tools).
    command -v redis-cli >/dev/null 2>&1 || packages+=(redis-tools)
    # The dashboard tests drive Debian's Chromium (Playwright's own browsers are not used).
    command -v chromium >/dev/null 2>&1 || packages+=(chromium)
fi
if [ ${#packages[@]} -gt 0 ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "Installing system packages: ${packages[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
    else
        echo "Please install these system packages first: ${packages[*]}" >&2
        echo "(on Debian or Ubuntu, as root: apt-get install ${packages[*]})" >&2
        exit 1
    fi
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
spec="."
[ -n "${1:-}" ] && spec=".[$1]"
.venv/bin/python -m pip install -q -c constraints.txt -e "$spec"
