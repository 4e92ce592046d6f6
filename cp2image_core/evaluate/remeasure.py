"""Re-measure crops with CellProfiler's own measurement modules, in-process, many crops per call.

Crops are tiled into one mosaic (crop i labelled i + 1) and the MeasureObjectSizeShape,
MeasureObjectIntensity and MeasureTexture modules of the features pipeline run on it once, configured
exactly as in that pipeline (same images, texture scale and gray levels), restricted to one object set.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..errors import CP2ImageError

SHAPE, INTENSITY, TEXTURE = "MeasureObjectSizeShape", "MeasureObjectIntensity", "MeasureTexture"
IDENTIFY = "IdentifyPrimaryObjects"
SECONDARY, TERTIARY = "IdentifySecondaryObjects", "IdentifyTertiaryObjects"


def _cp():
    import cellprofiler_core.preferences as prefs

    prefs.set_headless()
    from cellprofiler_core.image import Image, ImageSetList
    from cellprofiler_core.measurement import Measurements
    from cellprofiler_core.object import Objects, ObjectSet
    from cellprofiler_core.pipeline import Pipeline
    from cellprofiler_core.workspace import Workspace

    return Image, ImageSetList, Measurements, Objects, ObjectSet, Pipeline, Workspace


def tile_windows(n: int, size: int, gap: int = 2) -> tuple[tuple[int, int], list[tuple[slice, slice]]]:
    """The mosaic's (H, W) and the window of each of ``n`` crops of ``size`` pixels, ``gap`` pixels apart."""
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    step = size + gap
    windows = [(slice(r * step, r * step + size), slice(q * step, q * step + size))
               for r, q in (divmod(i, cols) for i in range(n))]
    return (rows * step, cols * step), windows


def centre_label(labels: np.ndarray) -> int:
    """The label covering most of the 5 x 5 pixels at the centre of one crop's labels (0: none)."""
    c = labels.shape[0] // 2
    ids = labels[c - 2:c + 3, c - 2:c + 3]
    ids = ids[ids > 0]
    return int(np.bincount(ids).argmax()) if ids.size else 0


def tile(crops: np.ndarray, masks: np.ndarray, gap: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mosaic (C, H, W) of the crops with ``gap`` zero pixels between tiles, labels (H, W), and the crop of each
    label (label k + 1 is crop ``rows[k]``: only crops with a non-empty mask are labelled, consecutively).

    Labels are consecutive because MeasureObjectSizeShape (4.2) returns its radius features packed over the
    labels present but as long as the largest label: with a gap, the values after it would belong to other crops.
    """
    n, c, s, _ = crops.shape
    shape, windows = tile_windows(n, s, gap)
    mosaic = np.zeros((c, *shape), np.float32)
    labels = np.zeros(shape, np.int32)
    rows = np.flatnonzero(masks.reshape(n, -1).any(1))
    for i, (ys, xs) in enumerate(windows):
        mosaic[:, ys, xs] = crops[i]
    for k, i in enumerate(rows):
        ys, xs = windows[i]
        labels[ys, xs][masks[i]] = k + 1
    return mosaic, labels, rows


class Remeasurer:
    """The features pipeline's measurement modules, applied to crops of one object set."""

    def __init__(self, features_pipeline: str | Path, object_name: str, channels: list[str]) -> None:
        *_, Pipeline, _ = _cp()
        self.object_name, self.channels = object_name, channels
        pipeline = Pipeline()
        pipeline.load(str(features_pipeline))
        self.modules = {}
        for m in pipeline.modules():
            if m.module_name in (SHAPE, INTENSITY, TEXTURE) and m.module_name not in self.modules:
                m.objects_list.value = object_name
                if m.module_name == SHAPE:
                    m.calculate_zernikes.value = False
                self.modules[m.module_name] = m
        # the module that made these objects, for re-segmenting crops as the pipeline would (None if absent)
        self.identify = next((m for m in pipeline.modules() if m.module_name == IDENTIFY
                              and m.y_name.value == object_name), None)
        self.around = around_modules(pipeline, object_name, channels)
        missing = {SHAPE, INTENSITY, TEXTURE} - set(self.modules)
        if missing:
            raise ValueError(f"{features_pipeline} lacks {', '.join(sorted(missing))}")

    @property
    def can_segment_like_pipeline(self) -> bool:
        """True if the pipeline's IdentifyPrimaryObjects makes these objects from one of the crops' channels."""
        return self.identify is not None and self.identify.x_name.value in self.channels

    def segment_like_pipeline(self, crops: np.ndarray, gap: int = 2) -> np.ndarray:
        """(N, S, S) masks: the object at each crop's centre as the pipeline's own IdentifyPrimaryObjects finds it.

        All crops are segmented at once on their mosaic (one global threshold, as for a field of such cells),
        with its size limits, declumping and border rule; a crop whose centre holds no object gets an empty mask.
        """
        return self.segment_around_like_pipeline(crops, gap, around=False)[self.object_name]

    def segment_around_like_pipeline(self, crops: np.ndarray, gap: int = 2,
                                     around: bool = True) -> dict[str, np.ndarray]:
        """Object set -> (N, S, S) masks of each crop's centre object and, with ``around``, of the objects the
        features pipeline builds on it (``self.around``: its IdentifySecondaryObjects seeded by these objects, e.g.
        Cells, and IdentifyTertiaryObjects, e.g. Cytoplasm), all run on the mosaic of every crop as in the pipeline.
        A crop whose centre holds no object gets empty masks; the objects around it share its number, as in
        CellProfiler.
        """
        if not self.can_segment_like_pipeline:
            raise CP2ImageError(f"--shape-segmentation pipeline: the features pipeline has no {IDENTIFY} module that "
                                f"makes {self.object_name} from one of the channels {self.channels}; "
                                "use --shape-segmentation otsu")
        Image, ImageSetList, Measurements, _, ObjectSet, Pipeline, Workspace = _cp()
        n, _, s, _ = crops.shape
        shape, windows = tile_windows(n, s, gap)
        image_set_list = ImageSetList()
        image_set = image_set_list.get_image_set(0)
        for c, name in enumerate(self.channels):  # a gap at the top and left too: no tile touches the border
            image = np.zeros((shape[0] + gap, shape[1] + gap), np.float32)
            for i, (ys, xs) in enumerate(windows):
                image[gap + ys.start:gap + ys.stop, gap + xs.start:gap + xs.stop] = crops[i, c]
            image_set.add(name, Image(image))
        object_set, measurements = ObjectSet(), Measurements()
        for module in [self.identify, *(self.around.values() if around else ())]:
            module.run(Workspace(Pipeline(), module, image_set, object_set, measurements, image_set_list))
        names = [self.object_name, *(self.around if around else ())]
        labels = {name: object_set.get_objects(name).segmented[gap:, gap:] for name in names}
        masks = {name: np.zeros((n, s, s), bool) for name in names}
        for i, window in enumerate(windows):
            pick = centre_label(labels[self.object_name][window])
            if pick:
                for name in names:
                    masks[name][i] = labels[name][window] == pick
        return masks

    def real_masks_around(self, masks: np.ndarray, cells: np.ndarray) -> dict[str, np.ndarray]:
        """Object set -> (N, S, S) masks of the objects around each crop's object, from real label images: the first
        IdentifySecondaryObjects' objects are ``cells`` (e.g. each crop's own cell in the exported CellsLabels), an
        IdentifyTertiaryObjects' are that cell less the object ``masks`` (less its inside, the object without its
        outline, where the module shrinks it first, as IdentifyTertiaryObjects does)."""
        from centrosome.outline import outline

        out: dict[str, np.ndarray] = {}
        for name, module in self.around.items():
            if module.module_name == SECONDARY and not out:
                out[name] = cells
            elif module.module_name == TERTIARY and module.secondary_objects_name.value in out:
                inside = masks
                if module.shrink_primary.value:
                    inside = masks & ~np.stack([outline(m.astype(np.int32)) > 0 for m in masks])
                out[name] = out[module.secondary_objects_name.value] & ~inside
        return out

    def measure(self, crops: np.ndarray, masks: np.ndarray, modules: tuple[str, ...],
                object_name: str | None = None) -> dict[str, np.ndarray]:
        """Feature name -> (N,) values of each crop's masked object (NaN where a mask is empty); ``object_name``
        (default: the model's objects) names the object set the features belong to, e.g. Cells."""
        Image, ImageSetList, Measurements, Objects, ObjectSet, Pipeline, Workspace = _cp()
        object_name = object_name or self.object_name
        n = len(crops)
        mosaic, labels, rows = tile(crops, masks)
        image_set_list = ImageSetList()
        image_set = image_set_list.get_image_set(0)
        for c, name in enumerate(self.channels):
            image_set.add(name, Image(mosaic[c]))
        object_set = ObjectSet()
        objects = Objects()
        objects.segmented = labels
        object_set.add_objects(objects, object_name)
        measurements = Measurements()
        pipeline = Pipeline()
        for name in modules:
            module = self.modules[name]
            module.objects_list.value = object_name
            try:
                module.run(Workspace(pipeline, module, image_set, object_set, measurements, image_set_list))
            finally:
                module.objects_list.value = self.object_name
        out = {}
        for feat in measurements.get_feature_names(object_name):
            v = np.asarray(measurements.get_current_measurement(object_name, feat), dtype=np.float64)
            if len(v) != len(rows):
                raise RuntimeError(f"{feat}: {len(v)} values for {len(rows)} objects")
            full = np.full(n, np.nan)
            full[rows] = v
            out[feat] = full
        return out


def around_modules(pipeline, object_name: str, channels: list[str]) -> dict:
    """Object set -> the features pipeline's module that builds it on ``object_name``: IdentifySecondaryObjects
    seeded by those objects on one of ``channels`` (e.g. Cells from Nuclei on FITC), then IdentifyTertiaryObjects
    of such a set minus them (e.g. Cytoplasm), in pipeline order."""
    out: dict = {}
    for m in pipeline.modules():
        if not m.enabled:
            continue
        if (m.module_name == SECONDARY and m.x_name.value == object_name and m.image_name.value in channels
                and not (m.wants_discard_edge.value and m.wants_discard_primary.value)):  # keeps the numbering
            out[m.y_name.value] = m
        elif (m.module_name == TERTIARY and m.primary_objects_name.value == object_name
              and m.secondary_objects_name.value in out):
            out[m.subregion_objects_name.value] = m
    return out


def segment(crops: np.ndarray, channel: int = 0, sigma: float = 1.0) -> np.ndarray:
    """(N, S, S) masks: the Otsu-thresholded component at each crop's centre in ``channel``.

    Shape features of a synthesized cell must come from its image, so they are measured on this
    segmentation (the same procedure applied to the real crops gives the ceiling).
    """
    from scipy import ndimage
    from skimage.filters import gaussian, threshold_otsu

    n, _, s, _ = crops.shape
    masks = np.zeros((n, s, s), bool)
    for i in range(n):  # per crop: each has its own threshold
        img = gaussian(crops[i, channel], sigma=sigma)
        if img.max() <= img.min():
            continue
        fg = ndimage.binary_fill_holes(img > threshold_otsu(img))
        lab, k = ndimage.label(fg)
        if k == 0:
            continue
        pick = centre_label(lab) or np.bincount(lab[lab > 0]).argmax()
        masks[i] = lab == pick
    return masks
