"""The CP2Image module's throughput inside a real headless CellProfiler run vs the raw generator.

    .venv/bin/python benchmarks/module_overhead.py [--fields 01_POS002 01_POS076 01_POS218]

Runs pipelines/ExampleFly_CP2Image.cppipe headless on the ExampleFly fields, reads CellProfiler's own
per-module wall times, and prints CP2Image's cells/s, its share of the pipeline's time, and the ratio to
the raw generator's cells/s at the module's batch size measured right after, on the same machine.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cp2image_core.dataset import _numeric, _read_csv  # noqa: E402
from cp2image_core.report_demo import module_times  # noqa: E402
from cp2image_core.synthesize import load_synthesizer_uncached  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fields", nargs="+", default=["01_POS002", "01_POS076", "01_POS218"])
    p.add_argument("--batch-size", type=int, default=64, help="the module's batch size in the demo pipeline")
    a = p.parse_args()
    import cellprofiler

    src = Path(cellprofiler.__file__).parent / "data/examples/ExampleFly/images"
    with tempfile.TemporaryDirectory(dir=ROOT / "build") as tmp:
        images = Path(tmp) / "images"
        images.mkdir()
        for f in a.fields:
            for ch in "DFR":
                shutil.copy(src / f"{f}_{ch}.TIF", images)
        t = time.time()
        proc = subprocess.run([str(Path(sys.executable).parent / "cellprofiler"), "-c", "-r", "-p",
                               str(ROOT / "pipelines/ExampleFly_CP2Image.cppipe"), "--plugins-directory",
                               str(ROOT / "plugins"), "-i", str(images), "-o", str(Path(tmp) / "out")],
                              capture_output=True, text=True, check=True)
        wall = time.time() - t
        ih, irows = _read_csv(Path(tmp) / "out" / "Image.csv")
        cells = _numeric(Path(tmp) / "out" / "Image.csv", ih, irows, "CP2Image_Count_Nuclei")
    times = module_times(proc.stdout + proc.stderr)
    cp = np.array(times["CP2Image"])
    total = sum(sum(v) for v in times.values())
    module_rate = cells.sum() / cp.sum()
    synth = load_synthesizer_uncached(ROOT / "weights/cp2image-default.safetensors", "auto")
    z = np.random.default_rng(0).standard_normal((int(cells.sum()), synth.spec.n_features)).astype(np.float32)
    synth.generate(z[: a.batch_size], a.batch_size)
    t = time.perf_counter()
    synth.generate(z, a.batch_size)
    raw_rate = len(z) / (time.perf_counter() - t)
    print(f"{int(cells.sum())} cells in {len(cp)} image sets; whole headless run {wall:.0f} s")
    print(f"CP2Image module: {cp.mean():.2f} s per image set, {module_rate:.0f} cells/s "
          f"({100 * cp.sum() / total:.1f}% of the pipeline's module time)")
    print(f"raw generator at batch {a.batch_size}: {raw_rate:.0f} cells/s; module / raw = {module_rate / raw_rate:.2f} "
          f"(overhead {100 * (raw_rate / module_rate - 1):.0f}%)")


if __name__ == "__main__":
    main()
