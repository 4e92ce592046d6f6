#!/usr/bin/env bash
# Screenshots of CP2Image in the real CellProfiler GUI, on a virtual screen (see scripts/gui_screenshots.py).
#   bash scripts/gui_screenshots.sh [--out docs/gui]      (or: make gui-screenshots)
# Needs `make gui-setup` once (wxPython, Xvfb). Uses a throwaway HOME: your CellProfiler preferences are untouched.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
"$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('wx') is None)" 2>/dev/null || {
  echo "ERROR: wxPython is not installed in $VENV: run 'make gui-setup' first (builds it once, ~30 min)." >&2; exit 1; }
command -v Xvfb >/dev/null || { echo "ERROR: Xvfb not found: run 'make gui-setup' (apt-get install xvfb)." >&2; exit 1; }
source scripts/gui_env.sh
DISPLAY_NUM=${DISPLAY_NUM:-97}
Xvfb ":$DISPLAY_NUM" -screen 0 1600x1000x24 -nolisten tcp >/dev/null 2>&1 &
XVFB=$!
FAKE_HOME=$(mktemp -d)
trap 'kill $XVFB 2>/dev/null || true; rm -rf "$FAKE_HOME"' EXIT
for _ in $(seq 100); do xdpyinfo -display ":$DISPLAY_NUM" >/dev/null 2>&1 && break; sleep 0.1; done
DISPLAY=":$DISPLAY_NUM" HOME="$FAKE_HOME" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
  "$VENV/bin/python" scripts/gui_screenshots.py "$@"
