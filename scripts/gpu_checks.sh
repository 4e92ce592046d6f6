#!/usr/bin/env bash
# The checks that need a GPU, in one run on a CUDA node whose Python has PyTorch (CellProfiler is not needed):
# tests/test_cuda.py, the generator and synthesis-path benchmarks, training throughput, and the shipped default
# recipe trained on the GPU (bf16 autocast), each step under its own time limit, logs in $OUT.
#   OUT=runs/gpu-checks [PY=python3] [SECONDS_LEFT=520] bash scripts/gpu_checks.sh
# Needs the ExampleFly export that `make train-default` makes (build/examplefly: features and images).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-runs/gpu-checks}
DEADLINE=$(( $(date +%s) + ${SECONDS_LEFT:-520} ))
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
# The export's Image.csv names the images by the absolute path of the checkout that measured them.
IMAGES=$(awk -F, 'NR==1{for(i=1;i<=NF;i++) if($i=="PathName_DNA") c=i} NR==2{print $c; exit}' \
  build/examplefly/features/Image.csv)
if [ ! -d "$IMAGES" ]; then mkdir -p "$(dirname "$IMAGES")" && ln -s "$PWD/build/examplefly/images" "$IMAGES"; fi

step() {  # step NAME LIMIT_SECONDS COMMAND...: run, log to $OUT/all.log, print the log's end
  local name=$1 limit=$2 left=$(( DEADLINE - $(date +%s) ))
  shift 2
  (( limit > left )) && limit=$left
  if (( limit < 20 )); then echo "== $name: skipped (time)" | tee -a "$OUT/all.log"; return; fi
  echo "== $name ($(date +%T), limit ${limit}s): $*" | tee -a "$OUT/all.log"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/step.log" 2>&1
  local rc=$?
  cat "$OUT/step.log" >> "$OUT/all.log"
  echo "== $name: rc=$rc in $(( SECONDS - t0 ))s" | tee -a "$OUT/all.log"
  tail -n 30 "$OUT/step.log"
}

step env 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; \
  $PY -c 'import torch, numpy; print(torch.__version__, numpy.__version__, torch.cuda.get_device_name())'"
step tests 150 "$PY" -m pytest tests/test_cuda.py -q -rA -s -p no:cacheprovider
step generator 150 "$PY" benchmarks/generator_throughput.py --device cuda --batches 64 256 1024 4096 \
  --models weights/cp2image-default.safetensors weights/cp2image-realistic.safetensors --precision fp32 bf16 fp16 \
  --match-shape
step synthesis 60 "$PY" benchmarks/synthesis_path.py --device cuda --batch-size 64 256 1024
step synthesis-field 40 "$PY" benchmarks/synthesis_path.py --device cuda --batch-size 64 --field
step training-throughput 120 "$PY" benchmarks/training_throughput.py --device cuda --steps 100
mkdir -p /tmp/gpu-py/bin  # train_default.sh runs $VENV/bin/python
printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v "$PY")" > /tmp/gpu-py/bin/python && chmod +x /tmp/gpu-py/bin/python
step train-default 400 env VENV=/tmp/gpu-py OUT="$OUT/gpu-default.safetensors" STAGE1=/tmp/gpu-stage1.safetensors \
  bash scripts/train_default.sh --device cuda --threads 8
rm -f "$OUT/step.log"
