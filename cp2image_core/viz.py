"""Crops as pictures: channels to RGB for figures and the module's display."""
from __future__ import annotations

import numpy as np


def to_rgb(crop: np.ndarray, ref: np.ndarray | None = None) -> np.ndarray:
    """(C, H, W) -> (H, W, 3) in [0, 1]; channel i is stretched by the 99.5th percentile of ``ref``
    (default: itself). Three channels map to blue, green, red in order (DNA first shows blue)."""
    crop = np.asarray(crop, dtype=np.float32)
    ref = crop if ref is None else np.asarray(ref, dtype=np.float32)
    c = crop.shape[0]
    rgb = np.zeros((*crop.shape[1:], 3), dtype=np.float32)
    for i in range(min(c, 3)):
        hi = float(np.percentile(ref[i], 99.5)) if ref[i].size else 0.0
        plane = crop[i] / hi if hi > 0 else crop[i]
        rgb[:, :, 2 - i if c == 3 else i] = np.clip(plane, 0, 1)
    if c == 1:
        rgb[:] = rgb[:, :, :1]
    return rgb
