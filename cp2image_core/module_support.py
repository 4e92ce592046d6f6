"""What the CellProfiler module delegates to: read features from measurements, synthesize, write.

Kept apart from plugins/cp2image.py so the module stays settings and glue.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

import h5py
import numpy as np
import tifffile

from .crops import FieldComposer, FieldPainter, crop_objects, paste_into_objects
from .errors import CP2ImageError
from .features import producer_of, standardize
from .modelfile import read_spec
from .spec import ModelSpec
from .synthesize import Synthesizer, load_synthesizer, with_shape_matching
from .viz import to_rgb

__all__ = [
    "CP2ImageError",
    "check_channel_images",
    "default_model_path",
    "first_image",
    "load_synthesizer",
    "missing_features_message",
    "paste_into_objects",
    "read_spec",
    "real_crops",
    "realistic_model_path",
    "share_cpu_with_other_workers",
    "synthesize_and_write",
    "to_rgb",
    "with_shape_matching",
]

DEFAULT_MODEL = "cp2image-default.safetensors"
REALISTIC_MODEL = "cp2image-realistic.safetensors"
LOGGER = logging.getLogger(__name__)


def default_model_path() -> Path:
    """The model shipped in the repository's weights/ folder."""
    return Path(__file__).resolve().parent.parent / "weights" / DEFAULT_MODEL


def realistic_model_path() -> Path:
    """The shipped alternative that draws cells harder to tell from real crops (weights/README.md)."""
    return default_model_path().with_name(REALISTIC_MODEL)


_SHARED: list[int] = []  # thread counts set in this process (logged the first time)


def share_cpu_with_other_workers() -> int | None:
    """In a CellProfiler analysis worker, let PyTorch use this worker's share of the CPU cores; return it.

    The GUI's analysis runs up to *Maximum number of workers* processes (default: one per core) and PyTorch would
    start one thread per core in each: on 2 cores, two processes of 2 threads made 2.5x fewer cells per second
    than two of 1 thread. Headless runs (one process) and an explicit OMP_NUM_THREADS are left alone (None).
    """
    if "--work-announce" not in sys.argv or "OMP_NUM_THREADS" in os.environ:  # not a worker (CellProfiler's flag)
        return None
    import psutil
    import torch
    from cellprofiler_core.preferences import get_max_workers

    threads = max(1, (psutil.cpu_count(logical=False) or os.cpu_count() or 1) // max(1, get_max_workers()))
    if torch.get_num_threads() != threads or not _SHARED:
        torch.set_num_threads(threads)
        _SHARED.append(threads)
        LOGGER.info("CP2Image: analysis worker with %d worker(s) in all: PyTorch uses %d thread(s)",
                    get_max_workers(), threads)
    return threads


def missing_features_message(spec: ModelSpec, available: set[tuple[str, str]], objects_name: str,
                             limit: int = 8) -> str | None:
    """A message naming the model's features no earlier module measures, and who would; else None."""
    missing = [f for f in spec.features if f not in available]
    if not missing:
        return None
    groups: dict[tuple[str, str], list[str]] = {}
    for obj, feat in missing:
        groups.setdefault((producer_of(feat), obj), []).append(feat)
    parts = []
    for (module, obj), feats in groups.items():
        shown = ", ".join(feats[:limit]) + (f" and {len(feats) - limit} more" if len(feats) > limit else "")
        parts.append(f"{module} on {obj}: {shown}")
    return (f"The CP2Image model needs {len(missing)} of its {spec.n_features} features that no earlier "
            f"module measures (add or configure, before CP2Image, " + "; ".join(parts) + ")")


@dataclass
class Synthesized:
    count: int  # objects synthesized
    imputed: np.ndarray  # (N,) features imputed per object
    centers: np.ndarray  # (N, 2) x, y
    file_name: str  # the stack written, the per-object pattern, or "" when there were no objects
    field: np.ndarray | None  # (H, W, C) synthetic field, when asked for
    gallery: np.ndarray  # (k, C, S, S) the first synthesized images, for the module's display
    # wall seconds by step: "read features", "generate", "compose" (the synthetic field), "write" (and the rest)
    seconds: dict[str, float] = dataclass_field(default_factory=dict)


_OPEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # measurements store -> {feature: open dataset}


def current_values(measurements, obj: str, feat: str):
    """One feature's values for the objects of the current image set, as ``get_current_measurement`` gives them.

    CellProfiler opens the feature's HDF5 dataset through three h5py groups on every call and reads it through
    h5py's high-level slicing (≈0.2 ms per feature: for a 658-feature model a third of CP2Image's non-generator
    time). The dataset is opened once per measurements store with h5py's low-level API (one path lookup) and read
    straight into an array; it is dropped when CellProfiler deletes or rewrites the feature (which replaces the
    feature's index). Held open, it also keeps its chunk in HDF5's cache, which CellProfiler's writes of the next
    image sets share: CellProfiler stores each feature gzip-compressed in chunks of 1,024 values, and a read after
    the dataset was closed inflates its chunk (658 features: 45-60 ms in the first image set, 9-13 ms held open in
    the next ones; opening them ≈3 ms). Anything unusual (text features, an empty image set) takes CellProfiler's
    own path.
    """
    store = getattr(measurements, "hdf5_dict", None)
    index = getattr(store, "indices", {}).get((obj, feat))
    where = index.get(measurements.image_set_number) if isinstance(index, dict) else None
    if where is None or not isinstance(where[0], slice):
        return measurements.get_current_measurement(obj, feat)
    start, stop, step = where[0].indices(2**62)
    with store.lock:
        handles = _OPEN.setdefault(store, {})
        cached = handles.get((obj, feat))
        if cached is None or cached[0] is not index:
            dataset = h5py.h5d.open(store.top_group.id, f"{obj}/{feat}/data".encode())  # CellProfiler: hdf5_dict.DATA
            cached = handles[(obj, feat)] = (index, dataset, dataset.dtype)
        dataset, dtype = cached[1], cached[2]
        if dtype.kind not in "fiub" or step != 1 or stop <= start:
            return measurements.get_current_measurement(obj, feat)
        space = dataset.get_space()
        if space.get_simple_extent_ndims() != 1 or stop > space.shape[0]:
            return measurements.get_current_measurement(obj, feat)
        space.select_hyperslab((start,), (stop - start,))
        values = np.empty(stop - start, dtype)
        dataset.read(h5py.h5s.create_simple((stop - start,)), space, values)
        return values


def read_feature_matrix(measurements, spec: ModelSpec, n: int) -> np.ndarray:
    """(n, F) raw features of objects 1..n in spec order; other object sets joined by object number."""
    raw = np.full((n, spec.n_features), np.nan)
    for j, (obj, feat) in enumerate(spec.features):
        if not measurements.has_feature(obj, feat):
            raise CP2ImageError(f"CP2Image: feature {feat} of {obj} was not measured in this image set "
                                f"(add {producer_of(feat)} for {obj} before CP2Image)")
        values = current_values(measurements, obj, feat)
        values = np.asarray([] if values is None else values, dtype=np.float64).ravel()
        if len(values) != n:
            LOGGER.warning("CP2Image: %s of %s has %d values for %d objects; %s", feat, obj, len(values), n,
                           "the missing ones are imputed" if len(values) < n else "the extra ones are ignored")
        values = values[:n]
        raw[:len(values), j] = values
    return raw


def object_centers(measurements, objects_name: str, n: int) -> np.ndarray:
    centers = np.full((n, 2), np.nan)
    cx = measurements.get_current_measurement(objects_name, "Location_Center_X")
    cy = measurements.get_current_measurement(objects_name, "Location_Center_Y")
    if cx is not None and cy is not None and n:
        m = min(n, len(cx), len(cy))
        centers[:m, 0], centers[:m, 1] = np.asarray(cx)[:m], np.asarray(cy)[:m]
    return centers


def synthesize_and_write(synth: Synthesizer, measurements, objects_name: str, labels: np.ndarray, *,
                         batch_size: int, folder: str, base: str, per_object: bool, overwrite: bool,
                         want_field: bool, fill_field: bool = False, keep: int = 6,
                         bit_depth: int = 32, among_neighbours: bool = False) -> Synthesized:
    """Synthesize every object of the image set batch by batch, streaming pages to disk.

    Memory stays bounded by the batch (plus the field image), whatever the number of objects. ``bit_depth`` 16
    writes uint16 pages (see ``to_pixels``), 32 float32 ones. ``fill_field`` composes the whole field
    (``FieldComposer``, radii from the objects' areas in ``labels``) instead of painting inside the outlines.
    ``among_neighbours`` writes each object's crop cut from that composed field (its neighbours drawn from their own
    features in their real places) instead of its own synthesized crop; objects without a centre keep their own.
    """
    began = time.perf_counter()
    seconds = dict.fromkeys(("read features", "generate", "compose", "write"), 0.0)
    spec = synth.spec
    n = int(labels.max()) if labels.size else 0
    centers = object_centers(measurements, objects_name, n)
    z, imputed = standardize(read_feature_matrix(measurements, spec, n), spec, clip=False)
    seconds["read features"] = time.perf_counter() - began
    out = Path(folder)
    names = ([f"{base}_Object{k:04d}.tiff" for k in range(1, n + 1)] if per_object
             else [f"{base}.tiff"] if n else [])
    check_writable(out, names, overwrite)
    field = painter = composer = None
    if among_neighbours or (want_field and fill_field):
        radii = np.sqrt(np.bincount(labels.ravel(), minlength=n + 1)[1:n + 1] / np.pi)  # equivalent radii
        composer = FieldComposer(labels.shape, centers, radii, spec.crop_size, spec.n_channels)
    if want_field and not fill_field:
        field = np.zeros((*labels.shape, spec.n_channels), np.float32)
        painter = FieldPainter(labels, centers, spec.crop_size)
    gallery: list[np.ndarray] = []

    def synthesized():
        batches, t = synth.iter_generate(z, batch_size), time.perf_counter()
        for start, images in batches:
            seconds["generate"] += time.perf_counter() - t
            with adding_time(seconds, "compose"):
                if painter is not None:
                    painter.paint(images, start + 1, field)
                if composer is not None:
                    composer.add(images, start + 1)
            yield start, images
            t = time.perf_counter()

    def cut_from_field():
        """Every object synthesized and composed first; then each crop cut from the field, a batch at a time."""
        nonlocal field
        unplaced = ~np.isfinite(centers).all(1)
        own = {start + i: image.copy() for start, images in synthesized() for i, image in enumerate(images)
               if unplaced[start + i]}
        with adding_time(seconds, "compose"):
            composed = composer.field()
        if want_field and fill_field:
            field = composed
        for start in range(0, n, batch_size):
            with adding_time(seconds, "compose"):
                images = crop_objects(composed, centers[start:start + batch_size], spec.crop_size)
                for k in start + np.flatnonzero(unplaced[start:start + len(images)]):
                    images[k - start] = own[k]
            yield start, images

    def batches():
        for start, images in cut_from_field() if among_neighbours else synthesized():
            gallery.extend(images[: max(0, keep - len(gallery))])
            yield start, images

    dtype = PIXEL_TYPES[bit_depth]
    if per_object:
        for start, images in batches():
            pages = to_pixels(images, dtype)  # once per batch, not once per object
            for i, page in enumerate(pages):
                _atomic_tiff(out / names[start + i], page, "CYX", dtype=dtype)
    elif n:
        _atomic_tiff(out / names[0], batches(), "TCYX", shape=(n, spec.n_channels, spec.crop_size, spec.crop_size),
                     dtype=dtype)
    if want_field and fill_field and field is None:
        with adding_time(seconds, "compose"):
            field = composer.field()
    s = spec.crop_size
    seconds["write"] = time.perf_counter() - began - sum(seconds.values())
    return Synthesized(
        count=n, imputed=imputed, centers=centers,
        file_name=(f"{base}_Object####.tiff" if per_object and n else names[0] if names else ""),
        field=field, gallery=np.stack(gallery) if gallery else np.zeros((0, spec.n_channels, s, s), np.float32),
        seconds=seconds,
    )


@contextmanager
def adding_time(seconds: dict[str, float], step: str):
    """Add the wall time of the ``with`` block to ``seconds[step]``."""
    began = time.perf_counter()
    try:
        yield
    finally:
        seconds[step] += time.perf_counter() - began


def check_writable(out: Path, names: list[str], overwrite: bool) -> None:
    """Create the folder; refuse (before anything is written) to replace files unless ``overwrite``."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CP2ImageError(f"CP2Image cannot create the output folder {out}: {e.strerror or e}") from None
    if not os.access(out, os.W_OK):
        raise CP2ImageError(f"CP2Image cannot write to the output folder {out}: permission denied")
    if not overwrite:
        existing = [n for n in names if (out / n).exists()]
        if existing:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise CP2ImageError(f"CP2Image will not overwrite {out / existing[0]}{more}: choose another output "
                                "folder or set 'Overwrite existing files?' to Yes")


PIXEL_TYPES = {32: np.float32, 16: np.uint16}  # bit depth -> pixel type of the pages written


def to_pixels(images: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Pages as written: float32 as synthesized (CellProfiler's 0-1 intensities), or uint16 = value x 65535
    rounded, the scale CellProfiler divides a 16-bit image by when it loads it (half the bytes, within 1/131070)."""
    if images.dtype == dtype:  # already pages
        return np.ascontiguousarray(images)
    if dtype == np.uint16:
        scaled = np.clip(images, 0.0, 1.0)
        scaled *= 65535.0
        scaled += 0.5
        return scaled.astype(np.uint16, order="C")  # C order: tofile copies a strided array element by element
    return np.ascontiguousarray(images, np.float32)


def _atomic_tiff(path: Path, data, axes: str, shape: tuple | None = None, dtype=np.float32) -> None:
    """Write an ImageJ TIFF of ``dtype`` pages (``to_pixels``) under a temporary name, then rename it.

    With ``shape``, ``data`` yields (start, block) pairs of consecutive blocks along the first axis: tifffile
    writes the header for the final size, then each block goes to its place in the file, so a stack of any length
    streams in batch-sized writes (tifffile's page iterator costs a Python call per plane: 4-10x the time of the
    writes for 64-pixel crops).
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        if shape is None:
            tifffile.imwrite(str(tmp), to_pixels(data, dtype), imagej=True, metadata={"axes": axes})
        else:
            offset, _ = tifffile.imwrite(str(tmp), shape=shape, dtype=dtype, imagej=True,
                                         metadata={"axes": axes}, returnoffset=True)
            item = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
            with open(tmp, "r+b") as f:
                for start, block in data:
                    f.seek(offset + start * item)
                    to_pixels(block, dtype).tofile(f)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CP2ImageError(f"CP2Image could not write {path}: {e.strerror or e}. Check that the output "
                            "folder exists, is writable and has free space.") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def first_image(image_set, names: list[str]):
    """The first of ``names`` present in the image set (parent for a new image), else None."""
    for name in names:
        if name in image_set.names:
            return image_set.get_image(name)
    return None


def check_channel_images(image_set, spec: ModelSpec, shape: tuple[int, ...]) -> list[str]:
    """Check the image set's images named like the model's channels; return the channels it lacks.

    The generator needs only features, but its channels are meant to be these images (the gallery and
    the synthetic field line up with them): a color image or another size is a clear error, not a guess.
    """
    missing = []
    for name in spec.channels:
        if name not in image_set.names:
            missing.append(name)
            continue
        pixels = image_set.get_image(name).pixel_data
        if pixels.ndim != 2:
            raise CP2ImageError(
                f"CP2Image: image {name!r} has {pixels.shape[-1]} channels, but the model makes one grayscale "
                f"channel per image ({', '.join(spec.channels)}). Load {name!r} as grayscale in NamesAndTypes "
                "or split it with ColorToGray, and name the channels as the model does.")
        if pixels.shape != tuple(shape[:2]):
            raise CP2ImageError(
                f"CP2Image: image {name!r} is {pixels.shape[1]}x{pixels.shape[0]} pixels but the objects "
                f"are on a {shape[1]}x{shape[0]} image: the model's channels must be the images the objects "
                "were found on.")
    return missing


def real_crops(image_set, spec: ModelSpec, centers: np.ndarray) -> np.ndarray | None:
    """Real (N, C, S, S) crops of the model's channels, for the gallery; None if a channel is absent."""
    if not all(c in image_set.names for c in spec.channels):
        return None
    planes = [image_set.get_image(c).pixel_data for c in spec.channels]
    return crop_objects(np.stack(planes, axis=-1), centers, spec.crop_size)
