#!/usr/bin/env bash
# The GPU check: bench/gpu_check.sh OUT_DIR [--cpu-smoke]. See bench/gpu_check.py for the parts.
# Writes OUT_DIR/gpu_check.json and one log per part; exits non-zero when any part failed.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: bench/gpu_check.sh OUT_DIR [--cpu-smoke]" >&2; exit 2; }
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" bench/gpu_check.py "$@"
