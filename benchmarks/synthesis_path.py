"""The module's synthesis path, outside CellProfiler, against the raw generator on this machine's device.

    python benchmarks/synthesis_path.py [--model weights/cp2image-default.safetensors] [--batch-size 64]
        [--device auto|cpu|cuda] [--precision auto] [--field] [--fill-field] [--among-neighbours]
        [--bit-depth 32|16] [--export-dir ...]

What CP2Image's ``run`` does for each image set once CellProfiler hands it the measurements
(``module_support.synthesize_and_write``): read the model's features, standardize them, generate in batches
(on CUDA each batch is written while the next one runs) and write the TIFF stack, pasting the synthetic field
too with ``--field`` (composed between the objects with ``--fill-field``), each crop cut from the composed field
with ``--among-neighbours``. The measurements are the features pipeline's exported values of each ExampleFly image set,
served by a stand-in with CellProfiler's two calls, so this runs where CellProfiler is not installed (a GPU node's
Python); inside a real pipeline, reading comes from CellProfiler's HDF5 store: `benchmarks/module_overhead.py`.
Prints cells/s of the path and of the raw generator (``Synthesizer.generate`` on the same features and batch
size, images copied back to the host), their ratio, and how long reading and writing take alone.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cp2image_core.dataset import _numeric, _read_csv, load_labels  # noqa: E402
from cp2image_core.features import standardize  # noqa: E402
from cp2image_core.module_support import (  # noqa: E402
    PIXEL_TYPES,
    _atomic_tiff,
    read_feature_matrix,
    synthesize_and_write,
)
from cp2image_core.synthesize import PRECISIONS, load_synthesizer_uncached  # noqa: E402


class ExportedMeasurements:
    """One image set's exported object measurements behind the two calls the module makes."""

    def __init__(self, values: dict[tuple[str, str], np.ndarray], image_set_number: int) -> None:
        self.values, self.image_set_number = values, image_set_number

    def has_feature(self, obj: str, feat: str) -> bool:
        return (obj, feat) in self.values

    def get_current_measurement(self, obj: str, feat: str):
        return self.values.get((obj, feat))


def image_sets(export: Path, spec, objects: str) -> list[tuple[ExportedMeasurements, np.ndarray]]:
    """(measurements, object labels) per image set of the export, for the model's features."""
    header, rows = _read_csv(export / "Image.csv")
    numbers = _numeric(export / "Image.csv", header, rows, "ImageNumber").astype(int)
    label_files = [r[header.index("FileName_NucleiLabels")] for r in rows]
    per_object: dict[str, tuple[list[str], list[list[str]]]] = {}
    for obj in sorted({o for o, _ in spec.features} | {objects}):
        per_object[obj] = _read_csv(export / f"{obj}.csv")
    out = []
    for number, label_file in zip(numbers, label_files):
        values = {}
        for obj, (h, r) in per_object.items():
            mine = [row for row in r if int(float(row[h.index("ImageNumber")])) == number]
            wanted = {f for o, f in spec.features if o == obj} | {"Location_Center_X", "Location_Center_Y"}
            for feat in wanted & set(h):
                values[(obj, feat)] = _numeric(export / f"{obj}.csv", h, mine, feat)
        out.append((ExportedMeasurements(values, int(number)), load_labels(export / label_file)))
    return out


def best_of(fn, passes: int) -> float:
    times = []
    for _ in range(passes):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "weights/cp2image-default.safetensors"))
    p.add_argument("--export-dir", default=str(ROOT / "build/examplefly/features"))
    p.add_argument("--objects", default="Nuclei")
    p.add_argument("--batch-size", type=int, nargs="+", default=[64])
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--field", action="store_true", help="also paste the synthetic field (the module's option)")
    p.add_argument("--fill-field", action="store_true",
                   help="with --field: compose the field between the objects too (the module's Fill the field option)")
    p.add_argument("--among-neighbours", action="store_true",
                   help="cut each object's crop from the composed field (the module's Draw each object among its "
                        "synthesized neighbours option)")
    p.add_argument("--bit-depth", type=int, default=32, choices=sorted(PIXEL_TYPES),
                   help="pixel type of the pages written: 32 float, 16 integer (the module's Image bit depth)")
    p.add_argument("--passes", type=int, default=3, help="timed passes after one warm-up; the best is kept")
    a = p.parse_args()
    synth = load_synthesizer_uncached(a.model, a.device, a.precision)
    sets = image_sets(Path(a.export_dir), synth.spec, a.objects)
    cells = sum(int(labels.max()) for _, labels in sets)
    z_all = [standardize(read_feature_matrix(m, synth.spec, int(labels.max())), synth.spec, clip=False)[0]
             for m, labels in sets]
    name = torch.cuda.get_device_name() if synth.device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    field = "composed" if a.field and a.fill_field else "on" if a.field else "off"
    among = "each object among its synthesized neighbours; " if a.among_neighbours else ""
    print(f"{Path(a.model).name} on {name}, precision {synth.amp or torch.float32}; {len(sets)} image sets, "
          f"{cells} {a.objects}; synthetic field {field}; {among}{a.bit_depth}-bit pages; best of {a.passes} passes")
    print(f"{'batch':>5s} {'path cells/s':>12s} {'raw cells/s':>11s} {'path/raw':>8s} {'read s':>7s} "
          f"{'write s':>7s} {'raw s':>6s} {'path s':>6s}")
    with tempfile.TemporaryDirectory() as tmp:
        for bs in a.batch_size:
            def path(bs: int = bs) -> None:
                for m, labels in sets:
                    synthesize_and_write(synth, m, a.objects, labels, batch_size=bs, folder=tmp,
                                         base=f"CP2Image_{a.objects}_ImageSet{m.image_set_number:04d}",
                                         per_object=False, overwrite=True, want_field=a.field, keep=0,
                                         bit_depth=a.bit_depth, fill_field=a.fill_field,
                                         among_neighbours=a.among_neighbours)

            def raw(bs: int = bs) -> None:
                for z in z_all:
                    synth.generate(z, bs)

            def read() -> None:
                for m, labels in sets:
                    standardize(read_feature_matrix(m, synth.spec, int(labels.max())), synth.spec, clip=False)

            images = [synth.generate(z, bs) for z in z_all]

            def write(images: list[np.ndarray] = images) -> None:
                for k, im in enumerate(images):
                    _atomic_tiff(Path(tmp) / f"w{k}.tiff", im, "TCYX", dtype=PIXEL_TYPES[a.bit_depth])

            path(), raw()  # warm-up: kernels chosen, pinned memory and files allocated
            t_path, t_raw = best_of(path, a.passes), best_of(raw, a.passes)
            t_read, t_write = best_of(read, a.passes), best_of(write, a.passes)
            print(f"{bs:5d} {cells / t_path:12.0f} {cells / t_raw:11.0f} {t_raw / t_path:8.2f} {t_read:7.3f} "
                  f"{t_write:7.3f} {t_raw:6.3f} {t_path:6.3f}")


if __name__ == "__main__":
    main()
