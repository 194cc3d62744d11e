#!/usr/bin/env bash
# README command 1: install Herald into .venv and run `herald serve` (memory engine).
# Extra arguments go to `herald serve`, e.g. scripts/serve.sh --port 9000
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/herald serve "$@"
