#!/usr/bin/env bash
# System part of the execution-provider setup: Mesa >= 25 lavapipe (software Vulkan) for the WebGPU EP.
# Debian 12's own lavapipe (Mesa 22) is rejected by Dawn, so Mesa comes from bookworm-backports of the
# Debian mirror apt already uses. Needs root (CI runs as root) and no stdin. Optional argument: a venv
# into which the EP plugin wheels are installed (`pip install -e .[ep]` does the same).
# Usage: bash scripts/setup-ep.sh [VENV_DIR]
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
here="$(cd "$(dirname "$0")/.." && pwd)"

lavapipe_version() {  # the Mesa version of the installed lavapipe driver, or nothing
    dpkg-query -W -f='${Status} ${Version}\n' mesa-vulkan-drivers 2>/dev/null |
        awk '$3 == "installed" { split($4, v, "[.-]"); print v[1] }' || true
}

have="$(lavapipe_version)"
if [ -n "$have" ] && [ "$have" -ge 25 ]; then
    echo "lavapipe from Mesa $have is installed"
else
    if [ "$(id -u)" -ne 0 ]; then
        echo "error: installing Mesa lavapipe needs root; run: sudo bash scripts/setup-ep.sh" >&2
        exit 1
    fi
    . /etc/os-release
    if [ "${VERSION_CODENAME:-}" != "bookworm" ]; then
        echo "error: this script knows Debian 12 (bookworm); install Mesa >= 25 mesa-vulkan-drivers yourself" >&2
        exit 1
    fi
    # The mirror apt already uses for bookworm (deb822 or one-line format).
    mirror="$(grep -hE '^URIs:.*debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1 | awk '{print $2}')"
    if [ -z "$mirror" ]; then
        mirror="$(grep -hE '^deb .* bookworm( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
                  grep -v security | head -1 | awk '{print $2}')"
    fi
    mirror="${mirror:-http://deb.debian.org/debian}"
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: %s\n' \
        "$mirror" /usr/share/keyrings/debian-archive-keyring.gpg >/etc/apt/sources.list.d/edgegen-backports.sources
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends -t bookworm-backports mesa-vulkan-drivers libvulkan1 >/dev/null
    echo "installed lavapipe from Mesa $(lavapipe_version) ($mirror bookworm-backports)"
fi

if [ $# -ge 1 ]; then
    "$1/bin/pip" install -q -c "$here/constraints/ci.txt" -e "$here[ep]"
    echo "EP plugins installed in $1"
fi
