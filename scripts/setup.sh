#!/usr/bin/env bash
# Create a virtual environment with edgegen, its exporter and test tools, CPU-only.
# Usage: bash scripts/setup.sh [VENV_DIR]   (default: .venv)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$here/.venv}"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
# torch first, from the CPU pin, so the export extra's `torch>=2.6` is already satisfied.
"$venv/bin/pip" install -q -c "$here/constraints/cpu.txt" torch
"$venv/bin/pip" install -q -c "$here/constraints/cpu.txt" -e "$here[export,dev,ep]"
echo "edgegen installed in $venv"
