#!/usr/bin/env bash
# Create a virtual environment with edgegen, its exporter and test tools, CPU-only, at the versions CI pins
# (constraints/ci.txt). Usage: bash scripts/setup.sh [VENV_DIR]   (default: .venv)
# EDGEGEN_CONSTRAINTS=FILE installs against another constraints file (.ci/run: the newest versions).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$here/.venv}"
constraints="${EDGEGEN_CONSTRAINTS:-$here/constraints/ci.txt}"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
# torch first, from the CPU pin, so the export extra's `torch>=2.6` is already satisfied.
"$venv/bin/pip" install -q -c "$constraints" torch
"$venv/bin/pip" install -q -c "$constraints" -e "$here[export,dev,ep]"
echo "edgegen installed in $venv"
