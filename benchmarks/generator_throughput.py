"""Raw generator throughput vs batch size, FLOPs per cell and the roofline of this machine.

    .venv/bin/python benchmarks/generator_throughput.py [--models ...] [--batches 1 16 64 256]

Prints, for each architecture at its model's crop size: dense FLOPs per cell (PyTorch's FLOP
counter), cells/s per batch size, and the fraction of the roofline = (this run's fp32 matmul
rate) / (FLOPs per cell). Speeds are ratios measured in the same run, since machines differ.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from cp2image_core import archs
from cp2image_core.modelfile import read_spec
from cp2image_core.synthesize import load_synthesizer_uncached, resolve_device

ROOT = Path(__file__).resolve().parent.parent


def matmul_rate(device: torch.device, n: int = 2048, reps: int = 10) -> float:
    """Achieved fp32 FLOP/s of an n x n matmul (the roofline's ceiling)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def flops_per_cell(gen: torch.nn.Module, n_features: int) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        gen(torch.zeros(4, n_features))
    return counter.get_total_flops() / 4


def cells_per_s(synth, batch: int, min_seconds: float = 2.0) -> float:
    z = torch.randn(max(batch, 256), synth.spec.n_features).numpy()
    synth.generate(z[:batch], batch)  # warm-up
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < min_seconds:
        synth.generate(z[: max(batch, 256)], batch)
        n += max(batch, 256)
    return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=[str(ROOT / "weights" / "cp2image-default.safetensors")])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 32, 64, 256])
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    device = resolve_device(a.device)
    rate = matmul_rate(device)
    print(f"device {device}, {torch.get_num_threads()} threads; fp32 2048^2 matmul: {rate / 1e9:.0f} GFLOP/s")
    for m in a.models:
        spec = read_spec(m)
        synth = load_synthesizer_uncached(m, a.device)
        gen = archs.build(spec.arch, spec.n_features, spec.n_channels, spec.crop_size, **spec.arch_params).eval()
        f = flops_per_cell(gen, spec.n_features)
        roof = rate / f
        print(f"\n{Path(m).name} [{spec.arch}] {spec.n_channels}x{spec.crop_size}x{spec.crop_size}: "
              f"{f / 1e6:.0f} MFLOP/cell (dense) -> roofline {roof:.0f} cells/s")
        print("batch  cells/s  % of roofline")
        for b in a.batches:
            c = cells_per_s(synth, b)
            print(f"{b:5d}  {c:7.0f}  {100 * c / roof:6.1f}%")


if __name__ == "__main__":
    main()
