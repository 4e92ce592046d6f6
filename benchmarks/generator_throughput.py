"""Raw generator throughput vs batch size, FLOPs per cell and the roofline of this machine.

    .venv/bin/python benchmarks/generator_throughput.py [--models ...] [--batches 1 16 64 256]
        [--precision auto fp32 bf16 fp16] [--device auto|cpu|cuda] [--match-shape]

Prints, for each architecture at its model's crop size: dense FLOPs per cell (PyTorch's FLOP
counter), cells/s per batch size, and the fraction of the roofline = (this run's fp32 matmul
rate, the faster of MKL's and oneDNN's) / (FLOPs per cell). Speeds are ratios measured in the same run, since
machines differ. On CUDA the shipped models' cells/s include the copy of every image back to (pinned) host
memory, as in the module; the speed-only generators' outputs stay on the GPU and run in the last precision asked for.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from cp2image_core import archs
from cp2image_core.modelfile import read_spec
from cp2image_core.synthesize import (
    PRECISIONS,
    autocast_dtype,
    build_generator,
    load_synthesizer_uncached,
    resolve_device,
)

ROOT = Path(__file__).resolve().parent.parent


def matmul_rate(device: torch.device, n: int = 2048, reps: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """Achieved FLOP/s of an n x n matrix product (the roofline's ceiling): fp32 unless ``dtype`` says otherwise.

    On the CPU the faster of two libraries: MKL's GEMM (``a @ b``) and oneDNN's, which runs the convolutions, as a
    1x1 convolution of n channels over n pixels (the same product). On AMD CPUs MKL can take a narrower vector
    path: on a Zen 5 here its fp32 GEMM ran at 214 GFLOP/s, oneDNN's at 457, so MKL alone would halve the ceiling.
    """
    return max(matmul_rates(device, n, reps, dtype).values())


def matmul_rates(device: torch.device, n: int = 2048, reps: int = 10,
                 dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """FLOP/s of an n x n matrix product per library: {"gemm": a @ b} and, on the CPU, {"onednn": 1x1 conv}."""
    if device.type == "cuda":  # a GPU needs a larger product to be busy
        n, reps = max(n, 8192), max(reps, 20)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    paths = matmul_paths(a, b)
    rates = {}
    with torch.inference_mode():
        for name, fn in paths.items():
            for _ in range(2):
                fn()
            _sync(device)
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            _sync(device)
            rates[name] = 2 * n ** 3 * reps / (time.perf_counter() - t)
    return rates


def matmul_paths(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Callables giving ``a @ b`` (m x n) per library: MKL's GEMM and, on the CPU, oneDNN's 1x1 convolution of the
    k channels of m pixels (a, m x k) with n filters (b, k x n)."""
    paths = {"gemm": lambda: a @ b}
    if a.device.type == "cpu":
        x = a.T[None, :, :, None].contiguous(memory_format=torch.channels_last)  # (1, k channels, m pixels, 1)
        w = b.T[:, :, None, None].contiguous(memory_format=torch.channels_last)  # (n, k, 1, 1)
        paths["onednn"] = lambda: torch.nn.functional.conv2d(x, w)[0, :, :, 0].T
    return paths


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def flops_per_cell(gen: torch.nn.Module, n_features: int) -> float:
    """Multiply-adds x 2 per cell, counted on the autograd path: oneDNN's fused inference ops (``packed_linear``)
    are not seen by PyTorch's counter."""
    with FlopCounterMode(display=False) as counter, torch.enable_grad():
        gen(torch.zeros(4, n_features))
    return counter.get_total_flops() / 4


def _dense_flops(gen, n_features: int) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        gen.net(torch.zeros(4, n_features, 1, 1))
    return counter.get_total_flops() / 4


def cells_per_s(synth, batch: int, min_seconds: float = 2.0) -> float:
    z = torch.randn(max(batch, 256), synth.spec.n_features).numpy()
    synth.generate(z[:batch], batch)  # warm-up
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < min_seconds:
        synth.generate(z[: max(batch, 256)], batch)
        n += max(batch, 256)
    return n / (time.perf_counter() - t)


def time_module(fn, n_features: int, batch: int, min_seconds: float = 2.0, device: torch.device | None = None,
                amp: torch.dtype | None = None) -> float:
    """cells/s of ``fn`` on batches of ``batch`` (on the GPU: the output stays there, timed to the last kernel)."""
    device = device or torch.device("cpu")
    total = max(batch, 256)
    z = torch.randn(total, n_features, device=device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        fn(z[:batch])
        _sync(device)
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < min_seconds:
            for i in range(0, total, batch):
                fn(z[i:i + batch])
            n += total
            _sync(device)
    return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=[str(ROOT / "weights" / "cp2image-default.safetensors")])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 32, 64, 256])
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", nargs="+", default=["auto"], choices=PRECISIONS,
                   help="arithmetic of the shipped models' runs (auto: fp16 on CUDA, fp32 on the CPU)")
    p.add_argument("--match-shape", action="store_true",
                   help="also time each cp2image-decoder model with the module's 'Match each object's stated shape'")
    p.add_argument("--speed-only", nargs="*", default=["cp2image-paper@68"],
                   help="ARCH@CROP generators timed with fresh weights (speed does not depend on weights), "
                        "with the default model's feature count and 3 channels; the paper generator is timed "
                        "on its dense path and on its phase-decomposed eval path")
    a = p.parse_args()
    device = resolve_device(a.device)
    rates = matmul_rates(device)
    rate = max(rates.values())
    if device.type == "cuda":
        half = {x: matmul_rate(device, dtype=x) for x in (torch.float16, torch.bfloat16)}
        print(f"device {torch.cuda.get_device_name()}; fp32 8192^2 matmul: {rate / 1e12:.1f} TFLOP/s (TF32 "
              f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}); fp16 {half[torch.float16] / 1e12:.0f}, "
              f"bf16 {half[torch.bfloat16] / 1e12:.0f} TFLOP/s; the roofline below is the fp32 one")
    else:
        print(f"device {device}, {torch.get_num_threads()} threads; fp32 2048^2 matmul: {rate / 1e9:.0f} GFLOP/s "
              f"(the faster of MKL's GEMM and oneDNN's: "
              + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in rates.items()) + ")"
              + (f"; bf16 {matmul_rate(device, dtype=torch.bfloat16) / 1e9:.0f} GFLOP/s (the roofline below is the "
                 "fp32 one)" if "bf16" in a.precision else ""))
    best: dict[str, float] = {}  # best cells/s over batch sizes, per model and per speed-only path
    runs = [(m, x, False) for m in a.models for x in a.precision]
    if a.match_shape:
        runs += [(m, x, True) for m, x, _ in runs if read_spec(m).arch == "cp2image-decoder"]
    for m, precision, match in runs:
        spec = read_spec(m)
        synth = load_synthesizer_uncached(m, a.device, precision, match_shape=match)
        gen = build_generator(spec).eval()
        f = flops_per_cell(gen, spec.n_features)
        roof = rate / f
        name = Path(m).name + (f" {precision} ({synth.amp or torch.float32})" if len(a.precision) > 1 else "") + (
            " + shape match" if match else "")
        print(f"\n{name} [{spec.arch}] {spec.n_channels}x{spec.crop_size}x{spec.crop_size}: "
              f"{f / 1e6:.0f} MFLOP/cell (dense) -> roofline {roof:.0f} cells/s (fp32)")
        print("batch  cells/s  % of roofline")
        for b in a.batches:
            c = cells_per_s(synth, b)
            best[name] = max(best.get(name, 0.0), c)
            print(f"{b:5d}  {c:7.0f}  {100 * c / roof:6.1f}%")
    n_features = read_spec(a.models[0]).n_features
    speed_amp = autocast_dtype(device, a.precision[-1])
    for item in a.speed_only:
        arch, crop = item.split("@")
        gen = archs.build(arch, n_features, 3, int(crop)).eval()
        f = flops_per_cell(gen, n_features) if not hasattr(gen, "net") else _dense_flops(gen, n_features)
        gen = gen.to(device)
        roof = rate / f
        paths = {"dense": lambda z, g=gen: g.net(z[:, :, None, None])} if hasattr(gen, "net") else {}
        paths["eval path"] = gen
        print(f"\n{arch} at 3x{crop}x{crop}, {n_features} features (fresh weights, speed only, "
              f"{speed_amp or torch.float32}): {f / 1e6:.0f} MFLOP/cell dense -> roofline {roof:.0f} cells/s")
        print("batch  " + "  ".join(f"{k:>10s} cells/s (% roofline)" for k in paths))
        for b in a.batches:
            rates = [time_module(fn, n_features, b, device=device, amp=speed_amp) for fn in paths.values()]
            for k, r in zip(paths, rates):
                best[f"{arch} {k}"] = max(best.get(f"{arch} {k}", 0.0), r)
            print(f"{b:5d}  " + "  ".join(f"{r:18.0f} ({100 * r / roof:5.1f}%)" for r in rates))

    if len(best) > 1:
        top = max(best.values())
        print("\nbest cells/s over the batch sizes, and as a fraction of the fastest:")
        for k, v in sorted(best.items(), key=lambda kv: -kv[1]):
            print(f"  {k:45s} {v:7.0f}  {v / top:5.2f}")


if __name__ == "__main__":
    main()
