#!/usr/bin/env bash
# Make the CellProfiler 4.2.8 GUI runnable in .venv on a Debian machine without a screen.
#
#   bash scripts/gui_setup.sh          (or: make gui-setup)
#
# 1. Debian packages wxPython's build and a virtual screen need (apt-get; skipped when present).
# 2. wxPython 4.2.1 has no Linux wheel on PyPI: build one from its sdist ONCE into a cache outside
#    the repository ($WX_WHEEL_CACHE, default ~/.cache/cp2image/wheels; ~30 min on 2 cores), then
#    reuse it on every later run and checkout (`pip install` of the cached wheel takes seconds).
# 3. Install it into .venv. Its extensions look for libwx_*.so next to the base interpreter, not in
#    the wx package: scripts/gui_env.sh sets LD_LIBRARY_PATH for that.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
WX_VERSION=${WX_VERSION:-4.2.1}
WX_WHEEL_CACHE=${WX_WHEEL_CACHE:-$HOME/.cache/cp2image/wheels}

[ -x "$VENV/bin/python" ] || { echo "ERROR: $VENV not found: run 'make install' first." >&2; exit 1; }

pkgs=(libgtk-3-dev libnotify-dev libsdl2-dev freeglut3-dev libjpeg-dev libtiff-dev xvfb xdotool x11-utils)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "== apt-get install ${missing[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if "$VENV/bin/python" -c "import importlib.metadata as m; assert m.version('wxPython') == '$WX_VERSION'" 2>/dev/null; then
  echo "== wxPython $WX_VERSION already in $VENV"
else
  mkdir -p "$WX_WHEEL_CACHE"
  wheel=$(ls "$WX_WHEEL_CACHE"/wxPython-"$WX_VERSION"-cp39-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$wheel" ]; then
    echo "== building the wxPython $WX_VERSION wheel into $WX_WHEEL_CACHE (once; ~30 min on 2 cores)"
    base=$("$VENV/bin/python" -c 'import sys; print(sys.base_prefix)')
    # the build calls python3.9-config, which a venv lacks: the base interpreter's bin goes after the venv's
    start=$(date +%s)
    PATH="$PWD/$VENV/bin:$base/bin:$PATH" "$VENV/bin/python" -m pip wheel --no-deps -w "$WX_WHEEL_CACHE" \
      "wxPython==$WX_VERSION"
    echo "== wheel built in $(( ($(date +%s) - start) / 60 )) min"
    wheel=$(ls "$WX_WHEEL_CACHE"/wxPython-"$WX_VERSION"-cp39-*.whl | head -1)
  else
    echo "== reusing $wheel"
  fi
  "$VENV/bin/python" -m pip install -q --no-deps "$wheel"
fi

source scripts/gui_env.sh
"$VENV/bin/python" -c "import wx; print('== wx', wx.version())"
