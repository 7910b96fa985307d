#!/usr/bin/env bash
# The prepared GPU report in one call (issue 8): build for the visible GPU, self-check, the CUDA and
# Triton tests, the benchmarks; writes gpu_report.md and gpu_report.json (see benchmarks/gpu_report.py).
#   bash benchmarks/gpu_check.sh [--out DIR] [--budget SECONDS]    # on a CUDA machine, <= 8 minutes
#   bash benchmarks/gpu_check.sh --dry-run [--out DIR]             # the same steps on the CPU, tiny sizes
# Installs nothing and needs no network. Without a GPU (and without --dry-run) it says so and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
"$py" -c 'import torch' 2>/dev/null || py=python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$py" benchmarks/gpu_report.py "$@"
