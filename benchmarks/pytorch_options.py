"""What each PyTorch option is worth for a shipped generator on this machine: cells/s at the module's batch size.

    .venv/bin/python benchmarks/pytorch_options.py [--model weights/cp2image-default.safetensors] [--batch-size 64]
        [--no-compile]

Each row adds one option to the row above it (the last rows vary one thing of the shipped path): autograd on;
``torch.inference_mode``; channels-last memory; the decoder's fused GroupNorm + SiLU; its MLP through oneDNN's fused
linear with packed weights (``packed_linear``: the module's fp32 path); bfloat16 autocast; ``torch.compile``
(inductor; its compile time is printed, and a failure is printed, not raised); one thread instead of this machine's
default. Speeds are ratios within one run, since machines differ.
"""
from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cp2image_core.archs import decoder
from cp2image_core.synthesize import build_generator, load_synthesizer_uncached

ROOT = Path(__file__).resolve().parent.parent


def cells_per_s(fn, z: torch.Tensor, min_seconds: float = 2.0) -> float:
    fn(z)  # warm-up (and, for compiled functions, the compilation)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < min_seconds:
        fn(z)
        n += len(z)
    return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "weights" / "cp2image-default.safetensors"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    a = p.parse_args()
    synth = load_synthesizer_uncached(a.model, "cpu", "fp32")
    spec = synth.spec
    plain = build_generator(spec).eval()
    plain.load_state_dict(synth.generator.state_dict())
    fast = synth.generator  # channels-last, as the module runs it
    z = torch.randn(a.batch_size, spec.n_features)
    fused, packed = decoder.group_norm_silu, decoder.packed_linear

    def unfused(x, norm):
        return F.silu(norm(x))

    def run(gen, grad=False, gn=fused, amp=None, pack=True):
        def fn(x):
            decoder.group_norm_silu, decoder.packed_linear = gn, packed if pack else (lambda *args, **kw: None)
            mode = torch.enable_grad() if grad else torch.inference_mode()
            cast = torch.autocast("cpu", dtype=amp) if amp else contextlib.nullcontext()
            try:
                with mode, cast:
                    return gen(x)
            finally:
                decoder.group_norm_silu, decoder.packed_linear = fused, packed
        return fn

    threads = torch.get_num_threads()
    rows = [("autograd on, NCHW, PyTorch GroupNorm", run(plain, grad=True)),
            ("+ inference_mode", run(plain, gn=unfused, pack=False)),
            ("+ channels_last", run(fast, gn=unfused, pack=False)),
            ("+ fused GroupNorm + SiLU", run(fast, pack=False)),
            ("+ MLP as oneDNN's packed, fused linear (module's fp32)", run(fast)),
            ("+ bfloat16 autocast (Precision: bfloat16)", run(fast, amp=torch.bfloat16))]
    print(f"{Path(a.model).name} [{spec.arch}] at batch {a.batch_size}, {threads} threads, torch {torch.__version__}")
    print(f"{'option':60s} cells/s  vs the first row")
    first = None
    for name, fn in rows:
        r = cells_per_s(fn, z)
        first = first or r
        print(f"{name:60s} {r:7.0f}  {r / first:5.2f}x")
    if not a.no_compile:
        for name, amp in (("torch.compile of the fp32 path", None), ("torch.compile of the bf16 path", torch.bfloat16)):
            torch._dynamo.reset()
            compiled = torch.compile(fast)
            t = time.perf_counter()
            try:
                run(compiled, amp=amp)(z)
            except Exception as e:  # a benchmark reports what failed, whatever it is
                print(f"{name:60s} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                continue
            compile_s = time.perf_counter() - t
            r = cells_per_s(run(compiled, amp=amp), z)
            print(f"{name:60s} {r:7.0f}  {r / first:5.2f}x  (compiled in {compile_s:.0f} s)")
    torch.set_num_threads(1)
    r = cells_per_s(run(fast), z)
    print(f"{'the fp32 path on 1 thread instead of ' + str(threads):60s} {r:7.0f}  {r / first:5.2f}x")


if __name__ == "__main__":
    main()
