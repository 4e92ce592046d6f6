"""Training throughput (cells/s over optimizer steps) and peak memory for each architecture and loss.

    .venv/bin/python benchmarks/training_throughput.py [--steps 60] [--export-dir build/examplefly/features]

Each configuration trains in its own process (so its peak resident memory is its own) on the ExampleFly
export made by `make train-default`, for a few steps after the training set is cached.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# runs the trainer and reports its own peak resident memory (kB), and the GPU's peak allocation (bytes), at exit
WRAPPER = ("import atexit, resource, runpy, sys, torch; atexit.register(lambda: print('MAXRSS', "
           "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, 'MAXCUDA', torch.cuda.max_memory_allocated() "
           "if torch.cuda.is_initialized() else 0, file=sys.stderr)); sys.argv[0] = 'train'; "
           "runpy.run_module('cp2image_core.train', run_name='__main__')")


def shipped_recipe() -> list[str]:
    """The shipped model's training options, read from its spec, so the benchmark follows `make train-default`."""
    from cp2image_core.modelfile import read_spec

    cmd = shlex.split(read_spec(ROOT / "weights/cp2image-default.safetensors").training["command"])
    cmd = cmd[cmd.index("cp2image_core.train") + 1:]
    if "--init-from" in cmd:  # the recipe's last stage starts from its first; speed does not depend on it
        i = cmd.index("--init-from")
        del cmd[i:i + 2]
    return cmd


CONFIGS = {
    "cp2image-decoder, the shipped recipe (sub-pixel; L1 + texture, intensity, outline)": None,  # shipped_recipe()
    "cp2image-decoder, L1": ["--arch", "cp2image-decoder", "--loss", "l1"],
    "cp2image-decoder, adversarial": ["--arch", "cp2image-decoder", "--loss", "adversarial", "--adv-start", "0"],
    "cp2image-paper, paper losses": ["--arch", "cp2image-paper", "--loss", "paper", "--adv-start", "0"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export-dir", default=str(ROOT / "build/examplefly/features"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: bf16 autocast, as train does")
    a = p.parse_args()
    print(f"{a.steps} steps of {a.batch_size} cells, 3x64x64 crops, {a.device}")
    print(f"{'configuration':38s} cells/s   peak RSS" + ("   peak GPU memory" if a.device == "cuda" else ""))
    for name, extra in CONFIGS.items():
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "m.safetensors"
            # the benchmark's own data, length and output come last: they override the recipe's
            cmd = [sys.executable, "-c", WRAPPER, *(shipped_recipe() if extra is None else extra),
                   "--export-dir", a.export_dir,
                   "--feature-objects", "Nuclei", "Cells", "Cytoplasm", "--channels", "DNA", "FITC", "Rhodamine",
                   "--val-images", "1", "--steps", str(a.steps), "--batch-size", str(a.batch_size),
                   "--val-every", str(a.steps), "--ema", "0", "--out", str(out), "--run-dir", tmp, "--device", a.device]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode:
                print(f"{name:38s} failed: {proc.stderr.strip().splitlines()[-1]}")
                continue
            peak, _, gpu = proc.stderr.rsplit("MAXRSS", 1)[1].split()[:3]
            from cp2image_core.modelfile import read_spec

            rate = read_spec(out).training["cells_per_s"]
            print(f"{name:38s} {rate:7.0f}   {int(peak) / 1024:6.0f} MB"
                  + (f"   {int(gpu) / 2**20:8.0f} MB" if a.device == "cuda" else ""))
    print(json.dumps({"note": "cells/s includes validation at the end; first steps include warm-up"}))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
