#!/usr/bin/env bash
# One-shot GPU validation of nemotron-train (docs/gpu-validation.md): under 8 minutes on one
# H100/H200 with torch preinstalled. Installs what is missing from --wheels DIR (megatron-core
# and the GPU kernels, brought along: the GPU host needs no network), then runs every check
# and writes validate.json + validate.md into --out (default runs/gpu-validation).
#
#   bash bench/gpu/validate.sh [--out DIR] [--wheels DIR] [--budget-s S]
#   bash bench/gpu/validate.sh --dry-run      # every step on CPU, tiny (what CI runs)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$PY" -m bench.gpu.validate "$@"
