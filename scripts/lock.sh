#!/usr/bin/env bash
# Rewrite constraints/ci.txt from a venv whose test suite passed (pins every installed package but edgegen).
# Usage: bash scripts/lock.sh [VENV_DIR]   (default: .venv)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$here/.venv}"
{
    cat <<'HEADER'
# Every package CI installs, pinned: scripts/setup.sh and .ci/run install with `-c constraints/ci.txt`, so a
# fresh clone gets the versions the suite last passed with. pyproject.toml keeps open ranges for users.
# torch is the CPU build (a plain `torch` requirement would pull a multi-GB CUDA build).
# .ci/run also runs the suite against the newest versions the pyproject ranges allow (torch stays pinned)
# and names the packages that moved. Rewritten by: bash scripts/lock.sh [VENV_DIR]
HEADER
    "$venv/bin/pip" freeze --exclude-editable | sed 's/+cpu$//'
} >"$here/constraints/ci.txt.new"
mv "$here/constraints/ci.txt.new" "$here/constraints/ci.txt"
echo "wrote constraints/ci.txt ($(grep -vc '^#' "$here/constraints/ci.txt") packages)"
