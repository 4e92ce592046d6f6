#!/usr/bin/env bash
# Create .venv with CellProfiler 4.2.8.1 (headless), torch and cp2image installed editable.
# Called by `make`; safe to re-run (pip skips what is already there).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

find_python39() {
  local c
  for c in "${PYTHON:-}" python3.9; do
    [ -n "$c" ] || continue
    if "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 9))' 2>/dev/null; then echo "$c"; return 0; fi
    # a pyenv shim exists on PATH but fails unless 3.9 is selected
    if command -v pyenv >/dev/null 2>&1; then
      for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.9(\.|$)' | sort -V -r); do
        if PYENV_VERSION=$v "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 9))' 2>/dev/null; then
          echo "$(PYENV_VERSION=$v pyenv which python3.9)"; return 0
        fi
      done
    fi
  done
  for c in "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/3.9.*/bin/python3.9 /usr/bin/python3.9 /usr/local/bin/python3.9; do
    if [ -x "$c" ] && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 9))' 2>/dev/null; then echo "$c"; return 0; fi
  done
  return 1
}

find_java_home() {
  if [ -n "${JAVA_HOME:-}" ] && [ -x "$JAVA_HOME/bin/javac" ]; then echo "$JAVA_HOME"; return 0; fi
  local j
  for j in /usr/lib/jvm/java-17-openjdk-* /usr/lib/jvm/java-11-openjdk-* /usr/lib/jvm/*; do
    if [ -x "$j/bin/javac" ]; then echo "$j"; return 0; fi
  done
  if command -v javac >/dev/null 2>&1; then dirname "$(dirname "$(readlink -f "$(command -v javac)")")"; return 0; fi
  return 1
}

if [ ! -x "$VENV/bin/python" ]; then
  PY39=$(find_python39) || {
    echo "ERROR: CellProfiler 4.2.8.1 needs Python 3.9, and none was found." >&2
    echo "  Looked for: \$PYTHON, python3.9 on PATH, pyenv versions 3.9.*, /usr/bin/python3.9." >&2
    echo "  Install it (e.g. 'pyenv install 3.9.18') or run: make PYTHON=/path/to/python3.9" >&2
    exit 1
  }
  echo "== creating $VENV with $PY39"
  "$PY39" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade "pip<25" >/dev/null

if ! "$VENV/bin/python" -c 'import javabridge' 2>/dev/null; then
  JAVA_HOME=$(find_java_home) || {
    echo "ERROR: a Java JDK is needed to build python-javabridge (CellProfiler's Java bridge)." >&2
    echo "  On Debian/Ubuntu: apt-get install -y openjdk-17-jdk-headless" >&2
    exit 1
  }
  export JAVA_HOME
  echo "== python-javabridge (JAVA_HOME=$JAVA_HOME)"
  $PIP install -q "numpy<2" "cython<3" wheel setuptools
  $PIP install -q --no-build-isolation "python-javabridge==4.0.4"
fi
echo "== cellprofiler-core, cellprofiler 4.2.8.1 (headless)"
$PIP install -q "cellprofiler-core==4.2.8.1"
$PIP install -q --no-deps "cellprofiler==4.2.8.1"
$PIP install -q -r requirements-cellprofiler.txt
echo "== torch and cp2image (editable)"
$PIP install -q "torch==2.8.0"
$PIP install -q -e ".[dev]"
echo "== installed into $VENV"
