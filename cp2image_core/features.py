"""Choose, standardize and impute CellProfiler features — shared by training and the module."""
from __future__ import annotations

import re

import numpy as np

from .spec import ModelSpec

# Columns that identify, locate or count objects, or name files: never features (DESIGN.md).
_NOT_FEATURE = re.compile(
    r"^(ImageNumber|ObjectNumber|Number_|Parent_|Children_|Location_|Metadata_|FileName_|PathName_|"
    r"URL_|Series_|Frame_|Channel_|Group_|ModuleError_|ExecutionTime_|Count_|Classify_|TrackObjects_|"
    # where the object sits in the field, not what it looks like
    r"AreaShape_Center_|AreaShape_BoundingBoxM(in|ax)imum_|CP2Image_|"
    # which object is a neighbour is an id, not a measurement
    r"Neighbors_(First|Second)ClosestObjectNumber_)"
)

# Which CellProfiler module measures a feature family (for "add this module" messages).
PRODUCER = {
    "AreaShape": "MeasureObjectSizeShape",
    "Intensity": "MeasureObjectIntensity",
    "Texture": "MeasureTexture",
    "Granularity": "MeasureGranularity",
    "RadialDistribution": "MeasureObjectIntensityDistribution",
    "Neighbors": "MeasureObjectNeighbors",
    "Location": "an Identify or MeasureObjectIntensity module",
    "Correlation": "MeasureColocalization",
}


def producer_of(feature: str) -> str:
    """The CellProfiler module that measures ``feature`` (e.g. AreaShape_Area -> MeasureObjectSizeShape)."""
    return PRODUCER.get(feature.split("_", 1)[0], "the module that measures it")


def is_candidate(column: str) -> bool:
    """True for a column that may be a feature (not an id, location, count, metadata or file name)."""
    return not _NOT_FEATURE.match(column)


def select_features(
    names: list[tuple[str, str]], values: np.ndarray, max_missing: float = 0.1
) -> tuple[list[int], dict[str, list[str]]]:
    """Indices of usable feature columns and, per reason, the dropped ones.

    Drops non-feature columns, columns missing (NaN/inf) in more than ``max_missing`` of the
    objects, and constant columns.
    """
    keep: list[int] = []
    dropped: dict[str, list[str]] = {"not a feature": [], "mostly missing": [], "constant": []}
    finite = np.isfinite(values)
    for i, (obj, feat) in enumerate(names):
        label = f"{obj}.{feat}"
        if not is_candidate(feat):
            dropped["not a feature"].append(label)
        elif 1.0 - finite[:, i].mean() > max_missing:
            dropped["mostly missing"].append(label)
        else:
            col = values[finite[:, i], i]
            if col.size == 0 or np.nanstd(col) <= 1e-12 * max(1.0, float(np.abs(col).max())):
                dropped["constant"].append(label)
            else:
                keep.append(i)
    return keep, dropped


def fit_standardizer(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of each column over its finite values (std floored so it is > 0)."""
    v = np.where(np.isfinite(values), values, np.nan).astype(np.float64)
    mean = np.nanmean(v, axis=0)
    std = np.nanstd(v, axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    return mean, std


def standardize(raw: np.ndarray, spec: ModelSpec, clip: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Standardized features (float32, imputed, clipped) and per-object count of imputed values.

    ``raw`` is (objects, features) in the spec's feature order; NaN/inf become the training mean. ``clip=False``
    leaves them unclipped, for a generator made by ``build_generator``: it clips its network's input itself, and
    the features it reads as values (``anchor``, ``calibrate``) must keep their measured range.
    """
    raw = np.asarray(raw, dtype=np.float64).reshape(-1, spec.n_features)
    bad = ~np.isfinite(raw)
    z = (raw - np.asarray(spec.feature_mean)) / np.asarray(spec.feature_std)
    z[bad] = 0.0
    if clip:
        np.clip(z, -spec.clip, spec.clip, out=z)
    return z.astype(np.float32), bad.sum(axis=1).astype(np.int64)
