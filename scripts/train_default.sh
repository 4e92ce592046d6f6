#!/usr/bin/env bash
# Retrain the shipped default model on CellProfiler's ExampleFly cells (held-out field: image set 1), in two stages:
# 6,000 steps from scratch, then 2,000 steps with the outline loss at the field's IdentifyPrimaryObjects threshold,
# the object's stated mean and SD intensities matched inside it (calibrate=1) and the lattice loss.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
WORK=${WORK:-build/examplefly}
ARCH=${ARCH:-cp2image-decoder}
OUT=${OUT:-weights/cp2image-default.safetensors}
STEPS=${STEPS:-6000}
STAGE1=${STAGE1:-runs/models/default-stage1.safetensors}
VENV="$VENV" WORK="$WORK" bash scripts/examplefly_features.sh
mkdir -p "$(dirname "$STAGE1")"
# the decoder: 96 channels, two x2 steps and a last x4 sub-pixel step (docs/speed.md, session 30)
PARAMS="n_up=2 subpixel=2 width=96 smooth=1 low_res_first=1 icnr=1 anchor=1"
# EXTRA_PARAMS: more --arch-param values for both stages, e.g. "width=32 hidden=128" (docs/speed.md, session 29)
stage() {  # stage OUT STEPS ARCH_PARAMS [extra train options]
  "$VENV/bin/python" -m cp2image_core.train --export-dir "$WORK/features" --objects Nuclei \
    --feature-objects Nuclei Cells Cytoplasm --channels DNA FITC Rhodamine --crop-size 64 --val-images 1 \
    --arch "$ARCH" --loss l1 --mask-image NucleiLabels --threads 2 \
    --arch-param $3 ${EXTRA_PARAMS:-} --texture-loss 0.05 --intensity-loss 0.05 \
    --edge-loss 0.05 --pattern-loss 0.5 --level-loss 0.2 \
    --out "$1" --steps "$2" --run-dir "runs/$(basename "$1" .safetensors)" --overwrite "${@:4}"
}
# Stage 1: learn the cell from its features; the outline loss at each crop's own Otsu threshold.
stage "$STAGE1" "$STEPS" "$PARAMS" --val-every 500 --seed 0 --shape-loss 0.05 "$@"
# Stage 2: put the nucleus's edge where IdentifyPrimaryObjects' threshold on the cell's field (Image.csv) cuts it,
# so CellProfiler's own segmentation finds the object the features describe; and draw each channel with the mean and
# SD the object's intensity features state (the decoder's calibrate=1: the contrast its texture features scale with);
# and no dots every 4 pixels of a bright nucleus (the x4 step's lattice, which gave the cell away: docs/results.md, session 32)
# and far fewer beside it (the lattice share, with the cell's FITC kept above the threshold IdentifySecondaryObjects used on its
# field, which the share loss alone lowered: docs/results.md, session 33).
stage "$OUT" 2000 "$PARAMS calibrate=1" --val-every 1000 --seed 5 --lr 2.5e-4 --shape-loss 0.2 --outline-threshold field \
  --lattice-loss 0.1 --lattice-share-loss 0.03 --cell-mask-image CellsLabels --cell-outline-channel FITC \
  --cell-shape-loss 0.05 --cell-outline-ring none --init-from "$STAGE1" "$@"
