#!/usr/bin/env bash
# Set up napari-sartorius on a fresh Debian machine (run as root from the repository root).
#   bash scripts/setup.sh          -> .venv with the package (runtime dependencies)
#   bash scripts/setup.sh --test   -> also Xvfb, Mesa and the Qt libraries for GUI tests, and the
#                                     testing extra (pytest, pytest-qt, hypothesis, PyQt5)
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

apt_install() {
    # Install the Debian packages among "$@" that this release knows (names differ between releases).
    local missing=() p
    for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || { echo "setup: apt-get not found; install ${missing[*]} by hand" >&2; return 1; }
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    local known=()
    for p in "${missing[@]}"; do
        if apt-cache show "$p" >/dev/null 2>&1; then known+=("$p"); else echo "setup: no Debian package $p here, skipped" >&2; fi
    done
    [ ${#known[@]} -eq 0 ] || apt-get install -y -qq --no-install-recommends "${known[@]}" >/dev/null
}

python3 -m venv --help >/dev/null 2>&1 && python3 -c "import ensurepip" 2>/dev/null || apt_install python3-venv python3-pip
if [ "$want_test" = 1 ]; then
    # napari draws with OpenGL: Xvfb plus Mesa's software renderer, and the X/XCB libraries Qt 5 loads.
    apt_install xvfb xauth libgl1-mesa-dri libgl1 libegl1 libxkbcommon-x11-0 libxcb-cursor0 \
        libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 \
        libxcb-xinerama0 libxcb-shape0 libxcb-xfixes0 libfontconfig1 libdbus-1-3
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned to the versions the suite is tested with. On Linux x86-64 this registry wheel is a
# CUDA build (NVIDIA runtime wheels included, ~6.4 GB venv, GPU or not); a CPU build installed into
# .venv beforehand (see README) satisfies the pin and is kept.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
if [ "$want_test" = 1 ]; then
    .venv/bin/python -m pip install -q -e ".[testing]"
else
    .venv/bin/python -m pip install -q -e ".[all]"
fi
echo "setup: ready ($(.venv/bin/python -c 'import napari_sartorius as n; print("napari-sartorius", n.__version__)'))"
