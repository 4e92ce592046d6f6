#!/usr/bin/env bash
# Retrain the shipped default model on CellProfiler's ExampleFly cells (held-out field: image set 1).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
WORK=${WORK:-build/examplefly}
ARCH=${ARCH:-cp2image-decoder}
OUT=${OUT:-weights/cp2image-default.safetensors}
STEPS=${STEPS:-3000}
VENV="$VENV" WORK="$WORK" bash scripts/examplefly_features.sh
"$VENV/bin/python" -m cp2image_core.train --export-dir "$WORK/features" --objects Nuclei \
  --feature-objects Nuclei Cells Cytoplasm --channels DNA FITC Rhodamine --crop-size 64 --val-images 1 \
  --arch "$ARCH" --loss l1 --steps "$STEPS" --val-every 500 --seed 0 --mask-image NucleiLabels --threads 2 \
  --arch-param n_up=3 subpixel=1 smooth=1 low_res_first=1 icnr=1 anchor=1 --texture-loss 0.05 --intensity-loss 0.05 \
  --edge-loss 0.05 --shape-loss 0.05 --pattern-loss 0.5 --level-loss 0.2 \
  --out "$OUT" --run-dir "runs/$(basename "$OUT" .safetensors)" "$@"
