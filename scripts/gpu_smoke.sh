#!/bin/sh
# Run first on a new GPU machine: bf16 + resume, 2 processes = 1, fine-tuning kill + resume (PASS/FAIL each).
# Usage: sh scripts/gpu_smoke.sh [--device cuda|cpu] [--work DIR]      (see scripts/gpu_smoke.py)
set -eu
PYTHON=${PYTHON:-python}
exec "$PYTHON" "$(dirname "$0")/gpu_smoke.py" "$@"
