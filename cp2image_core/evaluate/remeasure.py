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
        if not self.can_segment_like_pipeline:
            raise CP2ImageError(f"--shape-segmentation pipeline: the features pipeline has no {IDENTIFY} module that "
                                f"makes {self.object_name} from one of the channels {self.channels}; "
                                "use --shape-segmentation otsu")
        Image, ImageSetList, Measurements, _, ObjectSet, Pipeline, Workspace = _cp()
        n, _, s, _ = crops.shape
        channel = self.channels.index(self.identify.x_name.value)
        shape, windows = tile_windows(n, s, gap)
        image = np.zeros((shape[0] + gap, shape[1] + gap), np.float32)  # a gap at the top and left too: no tile
        for i, (ys, xs) in enumerate(windows):                        # touches the image's border
            image[gap + ys.start:gap + ys.stop, gap + xs.start:gap + xs.stop] = crops[i, channel]
        image_set_list = ImageSetList()
        image_set = image_set_list.get_image_set(0)
        image_set.add(self.identify.x_name.value, Image(image))
        object_set = ObjectSet()
        workspace = Workspace(Pipeline(), self.identify, image_set, object_set, Measurements(), image_set_list)
        self.identify.run(workspace)
        labels = object_set.get_objects(self.object_name).segmented[gap:, gap:]
        masks = np.zeros((n, s, s), bool)
        for i, window in enumerate(windows):
            pick = centre_label(labels[window])
            if pick:
                masks[i] = labels[window] == pick
        return masks

    def measure(self, crops: np.ndarray, masks: np.ndarray, modules: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Feature name -> (N,) values of each crop's masked object (NaN where a mask is empty)."""
        Image, ImageSetList, Measurements, Objects, ObjectSet, Pipeline, Workspace = _cp()
        n = len(crops)
        mosaic, labels, rows = tile(crops, masks)
        image_set_list = ImageSetList()
        image_set = image_set_list.get_image_set(0)
        for c, name in enumerate(self.channels):
            image_set.add(name, Image(mosaic[c]))
        object_set = ObjectSet()
        objects = Objects()
        objects.segmented = labels
        object_set.add_objects(objects, self.object_name)
        measurements = Measurements()
        pipeline = Pipeline()
        for name in modules:
            module = self.modules[name]
            module.run(Workspace(pipeline, module, image_set, object_set, measurements, image_set_list))
        out = {}
        for feat in measurements.get_feature_names(self.object_name):
            v = np.asarray(measurements.get_current_measurement(self.object_name, feat), dtype=np.float64)
            if len(v) != len(rows):
                raise RuntimeError(f"{feat}: {len(v)} values for {len(rows)} objects")
            full = np.full(n, np.nan)
            full[rows] = v
            out[feat] = full
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
