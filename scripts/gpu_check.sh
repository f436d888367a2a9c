#!/usr/bin/env bash
# One command for a machine with a GPU: every CUDA check, one report (see scripts/gpu_check.py --help).
#   bash scripts/gpu_check.sh [--out DIR] [--parts ...] [--budget SECONDS] [--dry-run]
# It runs from the repository root: a relative --out is taken from there. PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python}" scripts/gpu_check.py "$@"
