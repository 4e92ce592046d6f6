"""The demo pipeline through CellProfiler's analysis workers, as the GUI's *Analyze Images* runs it, headless.

    .venv/bin/python benchmarks/analysis_workers.py [--workers 2] [--out build/analysis-workers]
        [--fields 01_POS002 01_POS076 01_POS218]

Starts CellProfiler's own analysis (``cellprofiler_core`` Analysis: one worker process per image set, up to
``--workers``), on the ExampleFly fields, and prints each image set's CP2Image wall time (from the workers' own
per-module timing), the cells/s of CP2Image summed over image sets, the whole analysis' wall time, and the thread
count each worker's PyTorch used. Run it with ``OMP_NUM_THREADS=<cores>`` in the environment to see what one
PyTorch thread per core in every worker costs (CP2Image then leaves the thread count alone).
"""
from __future__ import annotations

import argparse
import logging
import re
import shutil
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIELDS = ("01_POS002", "01_POS076", "01_POS218")
TIMING = re.compile(r"Worker (\d+): .*Image # (\d+), module CP2Image # \d+: CPU_time = ([\d.]+) secs, "
                    r"Wall_time = ([\d.]+) secs")
THREADS = re.compile(r"Worker (\d+): CP2Image: analysis worker .*PyTorch uses (\d+) thread")


class Lines(logging.Handler):
    """Keeps the workers' output, which the analysis runner logs line by line."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "build" / "analysis-workers"))
    p.add_argument("--fields", nargs="+", default=list(FIELDS), help="ExampleFly fields, one image set each")
    a = p.parse_args()
    import cellprofiler
    import cellprofiler_core.preferences as prefs

    prefs.set_headless()
    prefs.set_plugin_directory(str(ROOT / "plugins"))
    prefs.set_max_workers(a.workers)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    prefs.set_default_output_directory(str(out))
    lines = Lines()
    logging.getLogger().addHandler(lines)
    logging.getLogger().setLevel(logging.INFO)

    from cellprofiler_core.analysis._analysis import Analysis
    from cellprofiler_core.analysis._runner import Runner
    from cellprofiler_core.analysis.event import Finished
    from cellprofiler_core.image import ImageSetList
    from cellprofiler_core.measurement import Measurements
    from cellprofiler_core.pipeline import Pipeline
    from cellprofiler_core.utilities.core.modules import fill_modules
    from cellprofiler_core.utilities.java import start_java, stop_java
    from cellprofiler_core.workspace import Workspace

    logging.getLogger().setLevel(logging.ERROR)  # not CellProfiler's module-loading chatter
    fill_modules()
    logging.getLogger().setLevel(logging.INFO)
    src = Path(cellprofiler.__file__).parent / "data/examples/ExampleFly/images"
    images = out / "images"  # CellProfiler skips images under hidden folders such as .venv
    images.mkdir(exist_ok=True)
    for f in a.fields:
        for c in "DFR":
            shutil.copy(src / f"{f}_{c}.TIF", images)
    pipeline = Pipeline()
    pipeline.load(str(ROOT / "pipelines" / "ExampleFly_CP2Image.cppipe"))
    pipeline.add_pathnames_to_file_list([str(f) for f in sorted(images.glob("*.TIF"))])
    finished, result = threading.Event(), {}

    def on_event(event) -> None:
        if isinstance(event, Finished):
            result["measurements"] = event.measurements
            finished.set()

    start_java()
    try:
        measurements = Measurements()
        if not pipeline.prepare_run(Workspace(pipeline, None, None, None, measurements, ImageSetList())):
            raise SystemExit("the pipeline's prepare_run failed")
        t = time.time()
        Analysis(pipeline, initial_measurements=measurements).start(on_event, num_workers=a.workers)
        ok = finished.wait(900)
        wall = time.time() - t
    finally:
        Runner.stop_workers()
        stop_java()
    if not ok or result.get("measurements") is None:
        raise SystemExit("the analysis did not finish")
    counts = [int(c) for c in result["measurements"].get_all_measurements("Image", "CP2Image_Count_Nuclei")]
    times = {int(m[2]): float(m[4]) for m in map(TIMING.search, lines.lines) if m}
    threads = {int(m[1]): int(m[2]) for m in map(THREADS.search, lines.lines) if m}
    for k in sorted(times):
        print(f"image set {k}: {counts[k - 1]} cells, CP2Image {times[k]:.2f} s")
    print(f"{a.workers} workers, PyTorch threads per worker: "
          f"{threads or 'left alone (OMP_NUM_THREADS is set, or not a worker)'}")
    print(f"CP2Image {sum(counts) / sum(times.values()):.0f} cells/s over the image sets; whole analysis {wall:.0f} s")
    print(f"written: {', '.join(sorted(f.name for f in out.glob('CP2Image_*.tiff')))}")
    for m in (measurements, result["measurements"]):  # CellProfiler removes their temporary HDF5 files on close only
        m.close()


if __name__ == "__main__":
    main()
