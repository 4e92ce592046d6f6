"""Where a CUDA synthesis call spends its time: the generator alone, + the copy back to the host, the module's
batch iterator, ``Synthesizer.generate``; then PyTorch's profiler on one ``generate`` call.

    python benchmarks/gpu_breakdown.py [--model weights/cp2image-default.safetensors] [--batches 64 256 1024]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cp2image_core.synthesize import PRECISIONS, load_synthesizer_uncached  # noqa: E402


def rate(fn, cells: int, seconds: float = 1.5) -> float:
    fn()
    torch.cuda.synchronize()
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        fn()
        n += cells
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "weights/cp2image-default.safetensors"))
    p.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--cells", type=int, default=4096)
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    a = p.parse_args()
    synth = load_synthesizer_uncached(a.model, "cuda", a.precision)
    z = np.random.default_rng(0).standard_normal((a.cells, synth.spec.n_features)).astype(np.float32)
    zt = torch.from_numpy(z).cuda()
    gen, amp = synth.generator, synth.amp
    print(f"{Path(a.model).name}, {a.cells} cells per pass, precision {amp or torch.float32}, "
          f"{torch.cuda.get_device_name()}; cells/s")
    print(f"{'batch':>5s} {'generator':>10s} {'+ .float':>10s} {'+ to host':>10s} {'iter_generate':>13s} "
          f"{'+ host check':>14s} {'generate':>9s} {'np copy':>9s}")
    for bs in a.batches:
        def forward(cast: bool = False, host: bool = False, bs: int = bs) -> None:
            with torch.inference_mode(), torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
                for i in range(0, a.cells, bs):
                    out = gen(zt[i:i + bs])
                    if cast:
                        out = out.float()
                    if host:
                        out.to("cpu", non_blocking=True)  # pageable: synchronous
            torch.cuda.synchronize()

        def iterate(bs: int = bs, check: bool = False) -> None:
            for _, images in synth.iter_generate(z, bs):
                if check:  # what the host did before the check moved to the GPU
                    np.isfinite(images).all()

        images = synth.generate(z, bs)
        out = np.empty_like(images)
        rates = [rate(lambda: forward(), a.cells), rate(lambda: forward(cast=True), a.cells),
                 rate(lambda: forward(cast=True, host=True), a.cells), rate(iterate, a.cells),
                 rate(lambda: iterate(check=True), a.cells), rate(lambda bs=bs: synth.generate(z, bs), a.cells),
                 rate(lambda out=out, images=images: np.copyto(out, images), a.cells)]
        print(f"{bs:5d} " + " ".join(f"{r:>{w}.0f}" for r, w in zip(rates, (10, 10, 10, 13, 14, 9, 9))))

    from torch.profiler import ProfilerActivity, profile

    bs = a.batches[-1]
    synth.generate(z, bs)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        synth.generate(z, bs)
        torch.cuda.synchronize()
    for key in ("self_cpu_time_total", "self_cuda_time_total"):
        print(f"\nprofile of generate at batch {bs}, by {key}:")
        print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=40))


if __name__ == "__main__":
    main()
