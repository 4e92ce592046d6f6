"""Summarize a headless CP2Image run: what was written, how long CP2Image took, a real-vs-synthetic gallery.

``python -m cp2image_core.report_demo --results OUT --log cellprofiler.log --images IMAGES``
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import tifffile

from .crops import crop_objects
from .dataset import _numeric, _read_csv, load_image

TIMING = re.compile(r"Image # (\d+), module (\w+) # \d+: CPU_time = ([\d.]+) secs, Wall_time = ([\d.]+) secs")


def module_times(log_text: str) -> dict[str, list[float]]:
    """Wall seconds per image set for each module, from CellProfiler's headless log."""
    times: dict[str, list[float]] = {}
    for m in TIMING.finditer(log_text):
        times.setdefault(m.group(2), []).append(float(m.group(4)))
    return times


def gallery(results: Path, images: Path, objects: str, channels: list[str], n: int = 8) -> Path | None:
    """PNG of the first ``n`` objects of image set 1: real crop above its synthesized image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .viz import to_rgb

    ih, irows = _read_csv(results / "Image.csv")
    stack_col = f"FileName_CP2Image_{objects}"
    if stack_col not in ih or not irows or not irows[0][ih.index(stack_col)]:
        return None
    stack = tifffile.imread(str(results / irows[0][ih.index(stack_col)]))
    stack = stack.reshape(-1, len(channels), *stack.shape[-2:])
    oh, orows = _read_csv(results / f"{objects}.csv")
    first = _numeric(results / f"{objects}.csv", oh, orows, "ImageNumber") == _numeric(
        results / "Image.csv", ih, irows, "ImageNumber")[0]
    cx = _numeric(results / f"{objects}.csv", oh, orows, "Location_Center_X")[first]
    cy = _numeric(results / f"{objects}.csv", oh, orows, "Location_Center_Y")[first]
    planes = [load_image(images / irows[0][ih.index(f"FileName_{c}")]) for c in channels]
    real = crop_objects(np.stack(planes, -1), np.stack([cx, cy], 1)[:n], stack.shape[-1])
    n = min(n, len(real))
    fig, ax = plt.subplots(2, n, figsize=(1.6 * n, 3.4), squeeze=False)
    for i in range(n):
        ax[0, i].imshow(to_rgb(real[i]))
        ax[1, i].imshow(to_rgb(stack[i], ref=real[i]))
        ax[0, i].set_title(f"real #{i + 1}", fontsize=7)
        ax[1, i].set_title(f"synthetic #{i + 1}", fontsize=7)
        for a in ax[:, i]:
            a.set_axis_off()
    fig.tight_layout()
    path = results / "gallery.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--results", required=True, type=Path)
    p.add_argument("--log", required=True, type=Path)
    p.add_argument("--images", required=True, type=Path)
    p.add_argument("--objects", default="Nuclei")
    p.add_argument("--channels", nargs="+", default=["DNA", "FITC", "Rhodamine"])
    p.add_argument("--wall", type=float, default=None, help="wall seconds of the whole run")
    a = p.parse_args(argv)
    ih, irows = _read_csv(a.results / "Image.csv")
    counts = _numeric(a.results / "Image.csv", ih, irows, f"CP2Image_Count_{a.objects}")
    files = [r[ih.index(f"FileName_CP2Image_{a.objects}")] for r in irows]
    times = module_times(a.log.read_text(errors="replace"))
    cp = times.get("CP2Image", [])
    total = sum(sum(v) for v in times.values())
    print(f"CP2Image synthesized {int(counts.sum())} {a.objects} in {len(irows)} image sets:")
    for f, c in zip(files, counts):
        print(f"  {a.results / f}  ({int(c)} cells)")
    if cp:
        print(f"CP2Image module: {np.mean(cp):.2f} s per image set (wall, CellProfiler's timing; "
              f"{100 * sum(cp) / max(total, 1e-9):.1f}% of all modules' time"
              + (f"; whole run {a.wall:.0f} s" if a.wall else "") + ")")
    g = gallery(a.results, a.images, a.objects, a.channels)
    if g:
        print(f"gallery (real above synthetic): {g}")
    print(f"measurements: {a.results / 'Image.csv'}, {a.results / (a.objects + '.csv')}")
    print(f"output folder: {a.results.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
