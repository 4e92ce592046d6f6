#!/usr/bin/env bash
# Measure the ExampleFly features once (pipelines/ExampleFly_features.cppipe, headless) into $WORK/features.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
WORK=${WORK:-build/examplefly}
PY="$VENV/bin/python"
# (again when the pipeline changed since: e.g. the cells' label image, CellsLabels, added 2026-12-06)
if [ ! -f "$WORK/features/Nuclei.csv" ] || [ pipelines/ExampleFly_features.cppipe -nt "$WORK/features/Nuclei.csv" ]; then
  SRC=$("$PY" -c 'import cellprofiler, os; print(os.path.join(os.path.dirname(cellprofiler.__file__), "data/examples/ExampleFly/images"))')
  mkdir -p "$WORK/images"
  cp -u "$SRC"/*.TIF "$WORK/images/"
  echo "== measuring features: pipelines/ExampleFly_features.cppipe on $WORK/images"
  "$VENV/bin/cellprofiler" -c -r -p pipelines/ExampleFly_features.cppipe -i "$WORK/images" -o "$WORK/features" \
    > "$WORK/features.log" 2>&1
fi
