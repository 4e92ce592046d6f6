"""The CP2Image module's throughput inside a real headless CellProfiler run vs the raw generator and the roofline.

    .venv/bin/python benchmarks/module_overhead.py [--model M.safetensors | --speed-only cp2image-paper@68]
        [--batch-size 64] [--precision auto|fp32|bf16|fp16] [--fields 01_POS002 01_POS076 01_POS218]
        [--among-neighbours]

Runs pipelines/ExampleFly_CP2Image.cppipe headless on the ExampleFly fields (with the chosen model and batch
size), reads CellProfiler's own per-module wall times, and prints CP2Image's cells/s, its share of the
pipeline's time, the ratio to the raw generator's cells/s at the same batch size measured right after, and both
as a % of the roofline: this machine's fp32 matmul rate (measured before and after the run; the faster of MKL's
GEMM and oneDNN's) / dense FLOPs per cell. CellProfiler runs with ``-L DEBUG``, so that the module logs how its
time splits (loading the model, reading the features, the generator, composing the synthetic field, writing),
which is printed too.
``--speed-only ARCH@CROP`` writes a model file with fresh weights (speed does not depend on them; its
images mean nothing) with the shipped model's features and channels.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from generator_throughput import _dense_flops, flops_per_cell, matmul_rate  # noqa: E402

from cp2image_core import archs  # noqa: E402
from cp2image_core.dataset import _numeric, _read_csv  # noqa: E402
from cp2image_core.modelfile import read_spec, save_model  # noqa: E402
from cp2image_core.report_demo import module_times  # noqa: E402
from cp2image_core.synthesize import build_generator, load_synthesizer_uncached  # noqa: E402

sys.path.insert(0, str(ROOT / "plugins"))
from cp2image import PRECISION_AUTO, PRECISIONS  # noqa: E402

SHIPPED = ROOT / "weights/cp2image-default.safetensors"


def speed_only_model(item: str, folder: Path) -> Path:
    """A model file of architecture ARCH at CROP pixels with fresh weights and the shipped model's features."""
    import dataclasses

    arch, crop = item.split("@")
    spec = dataclasses.replace(read_spec(SHIPPED), arch=arch, arch_params={}, crop_size=int(crop),
                               training={"note": "fresh weights, for speed measurements only"})
    gen = archs.build(arch, spec.n_features, spec.n_channels, spec.crop_size)
    return save_model(folder / f"speed-only-{arch}-{crop}.safetensors", gen.state_dict(), spec)


def dense_flops(model: Path) -> float:
    spec = read_spec(model)
    gen = build_generator(spec).eval()
    return _dense_flops(gen, spec.n_features) if hasattr(gen, "net") else flops_per_cell(gen, spec.n_features)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fields", nargs="+", default=["01_POS002", "01_POS076", "01_POS218"])
    p.add_argument("--batch-size", type=int, default=64, help="the module's batch size (the demo pipeline's: 64)")
    p.add_argument("--model", default=str(SHIPPED), help="model file the module runs (default: the shipped one)")
    p.add_argument("--precision", default="auto", choices=list(PRECISIONS.values()),
                   help="the module's Precision setting, and the raw generator's (auto: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--speed-only", default=None, metavar="ARCH@CROP",
                   help="run a fresh-weights model of this architecture and crop size instead, e.g. cp2image-paper@68")
    p.add_argument("--among-neighbours", action="store_true",
                   help="the module's *Draw each object among its synthesized neighbours?* on (default: off)")
    a = p.parse_args()
    import torch

    rate_before = matmul_rate(torch.device("cpu"))
    import cellprofiler

    src = Path(cellprofiler.__file__).parent / "data/examples/ExampleFly/images"
    (ROOT / "build").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT / "build") as tmp:
        model = speed_only_model(a.speed_only, Path(tmp)) if a.speed_only else Path(a.model).resolve()
        text = (ROOT / "pipelines/ExampleFly_CP2Image.cppipe").read_text()
        for old, new in (("Model:Default model (shipped)", "Model:Model file"),
                         ("Model file:\n", f"Model file:{model}\n"), ("Batch size:64", f"Batch size:{a.batch_size}"),
                         (f"Precision:{PRECISION_AUTO}", "Precision:" + next(k for k, v in PRECISIONS.items()
                                                                             if v == a.precision))):
            assert old in text, old
            text = text.replace(old, new)
        if a.among_neighbours:  # the demo's module is saved at revision 2: state every later setting
            old = "variable_revision_number:2|show_window:False|notes:[\"Synthesize each nucleus"
            assert text.count(old) == 1, old
            text = text.replace(old, old.replace(":2|", ":6|")).replace(
                "    Name the synthetic field image:SyntheticField\n",
                "    Name the synthetic field image:SyntheticField\n    Image bit depth:32-bit floating point\n"
                "    Match each object's stated shape?:No\n    Fill the field between objects?:No\n"
                "    Draw each object among its synthesized neighbours?:Yes\n")
        pipeline = Path(tmp) / "pipeline.cppipe"
        pipeline.write_text(text)
        images = Path(tmp) / "images"
        images.mkdir()
        for f in a.fields:
            for ch in "DFR":
                shutil.copy(src / f"{f}_{ch}.TIF", images)
        t = time.time()
        proc = subprocess.run([str(Path(sys.executable).parent / "cellprofiler"), "-c", "-r", "-L", "DEBUG", "-p",
                               str(pipeline), "--plugins-directory",
                               str(ROOT / "plugins"), "-i", str(images), "-o", str(Path(tmp) / "out")],
                              capture_output=True, text=True, check=True)
        wall = time.time() - t
        ih, irows = _read_csv(Path(tmp) / "out" / "Image.csv")
        cells = _numeric(Path(tmp) / "out" / "Image.csv", ih, irows, "CP2Image_Count_Nuclei")
        flops = dense_flops(model)
        t = time.perf_counter()
        synth = load_synthesizer_uncached(model, "auto", a.precision)
        load_s = time.perf_counter() - t
    times = module_times(proc.stdout + proc.stderr)
    steps = step_times(proc.stdout + proc.stderr)
    runs = np.array(run_times(proc.stdout + proc.stderr))
    cp = np.array(times["CP2Image"])
    total = sum(sum(v) for v in times.values())
    module_rate = cells.sum() / cp.sum()
    z = np.random.default_rng(0).standard_normal((int(cells.sum()), synth.spec.n_features)).astype(np.float32)
    synth.generate(z[: a.batch_size], a.batch_size)
    raw_rate = max(_rate(synth, z, a.batch_size) for _ in range(3))
    rate = (rate_before + matmul_rate(torch.device("cpu"))) / 2
    roof = rate / flops
    print(f"model {model.name} [{synth.spec.arch}], precision {a.precision} ({synth.amp or torch.float32}) "
          f"{synth.spec.n_channels}x{synth.spec.crop_size}x"
          f"{synth.spec.crop_size}, {flops / 1e6:.0f} MFLOP/cell dense; fp32 matmul {rate / 1e9:.0f} GFLOP/s "
          f"(MKL's or oneDNN's, the faster) "
          f"({torch.get_num_threads()} threads) -> roofline {roof:.0f} cells/s")
    print(f"{int(cells.sum())} cells in {len(cp)} image sets; whole headless run {wall:.0f} s"
          + ("; each object drawn among its synthesized neighbours" if a.among_neighbours else ""))
    print(f"CP2Image module: {cp.mean():.2f} s per image set, {module_rate:.0f} cells/s "
          f"({100 * cp.sum() / total:.1f}% of the pipeline's module time), {100 * module_rate / roof:.0f}% of roofline")
    print(f"raw generator at batch {a.batch_size}: {raw_rate:.0f} cells/s ({100 * raw_rate / roof:.0f}% of roofline)")
    print(f"model load (file to ready generator): {load_s:.2f} s")
    print(f"module / raw = {module_rate / raw_rate:.2f} "
          f"(overhead {100 * (raw_rate / module_rate - 1):.0f}%)")
    if len(cp) > 1:  # the first image set also inflates every feature's HDF5 chunk, once per run (current_values)
        steady = cells[1:].sum() / cp[1:].sum()
        print(f"after the first image set ({cp[0]:.2f} s): {steady:.0f} cells/s, module / raw = "
              f"{steady / raw_rate:.2f} (overhead {100 * (raw_rate / steady - 1):.0f}%)")
    if len(steps) == len(cp):  # the module's own clock and split of its time (its debug log line per image set)
        own = cells.sum() / runs.sum()
        print(f"by the module's own clock (CellProfiler prints each image set's time to 10 ms): {runs.sum():.3f} s "
              f"against CellProfiler's {cp.sum():.2f} s; {own:.0f} cells/s, {100 * own / roof:.0f}% of roofline, "
              f"module / raw = {own / raw_rate:.2f}")
        print(f"model load inside CellProfiler (first image set): {steps[0]['load model']:.3f} s")
        total_steps = {k: sum(row[k] for row in steps) for k in steps[0]}
        outside = runs.sum() - sum(total_steps.values())
        print("where CP2Image's time goes (all image sets): " + ", ".join(
            f"{k} {v:.3f} s ({100 * v / runs.sum():.0f}%)" for k, v in total_steps.items())
            + f", the rest of the module's run {outside:.3f} s ({100 * outside / runs.sum():.0f}%); the generator "
            f"inside the module {cells.sum() / total_steps['generate']:.0f} cells/s")
        print("image set by image set: " + "; ".join(
            f"{int(c)} cells, the generator {c / row['generate']:.0f} cells/s, read features "
            f"{row['read features']:.3f} s, write {row['write']:.3f} s" for c, row in zip(cells, steps)))


STEP = re.compile(r"CP2Image: image set \d+, \d+ \w+, run ([\d.]+) s: (.*)")


def step_times(log_text: str) -> list[dict[str, float]]:
    """Seconds per step of each image set, from the module's debug log line (``synthesize_and_write``'s split)."""
    return [{k: float(v) for k, v in re.findall(r"([a-z ]+?) ([\d.]+) s(?:, |$)", m.group(2))}
            for m in STEP.finditer(log_text)]


def run_times(log_text: str) -> list[float]:
    """Seconds of the module's run per image set by its own clock (the same debug line; 0.1 ms resolution)."""
    return [float(m.group(1)) for m in STEP.finditer(log_text)]


def _rate(synth, z: np.ndarray, batch_size: int) -> float:
    t = time.perf_counter()
    synth.generate(z, batch_size)
    return len(z) / (time.perf_counter() - t)


if __name__ == "__main__":
    main()
