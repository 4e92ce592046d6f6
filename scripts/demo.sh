#!/usr/bin/env bash
# The demo: CellProfiler's bundled ExampleFly images -> nuclei, cells, cytoplasm, their features ->
# CP2Image with the shipped default model -> synthesized cells in output/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
OUT=${OUT:-output/demo}
PY="$VENV/bin/python"
SRC=$("$PY" -c 'import cellprofiler, os; print(os.path.join(os.path.dirname(cellprofiler.__file__), "data/examples/ExampleFly/images"))')
[ -d "$SRC" ] || { echo "ERROR: ExampleFly images not found at $SRC (is cellprofiler 4.2.8.1 installed?)" >&2; exit 1; }
# CellProfiler skips images under hidden folders (such as .venv/): copy them to a visible folder.
mkdir -p "$OUT/images" "$OUT/results"
cp -u "$SRC"/*.TIF "$OUT/images/"
echo "== running pipelines/ExampleFly_CP2Image.cppipe headless on $(ls "$OUT/images" | wc -l) images (3 fields x 3 channels)"
start=$(date +%s)
"$VENV/bin/cellprofiler" -c -r -p pipelines/ExampleFly_CP2Image.cppipe --plugins-directory plugins \
  -i "$OUT/images" -o "$OUT/results" > "$OUT/cellprofiler.log" 2>&1 || {
  tail -30 "$OUT/cellprofiler.log" >&2; echo "ERROR: CellProfiler failed; full log: $OUT/cellprofiler.log" >&2; exit 1; }
"$PY" -m cp2image_core.report_demo --results "$OUT/results" --log "$OUT/cellprofiler.log" \
  --images "$OUT/images" --wall "$(( $(date +%s) - start ))"
