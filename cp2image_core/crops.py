"""Cut, pad and paste square crops around objects, vectorized over objects (no per-object loop)."""
from __future__ import annotations

import numpy as np


def _channels_last(image: np.ndarray) -> np.ndarray:
    return image[:, :, None] if image.ndim == 2 else image


def crop_objects(image: np.ndarray, centers_xy: np.ndarray, size: int, chunk: int = 1024) -> np.ndarray:
    """(N, C, size, size) crops of ``image`` (H, W) or (H, W, C) centred on ``centers_xy`` (N, 2).

    Centres are CellProfiler's Location_Center_X/Y (column, row), rounded; the centre pixel lands at
    index ``size // 2``. Pixels outside the image are zero (padded, not shifted).
    """
    img = _channels_last(np.asarray(image))
    h, w, c = img.shape
    centers = np.asarray(centers_xy, dtype=np.float64).reshape(-1, 2)
    n = len(centers)
    out = np.zeros((n, c, size, size), dtype=np.float32)
    if n == 0:
        return out
    half = size // 2
    padded = np.zeros((h + 2 * size, w + 2 * size, c), dtype=np.float32)
    padded[size:size + h, size:size + w] = img
    cx = np.clip(np.nan_to_num(np.round(centers[:, 0])), -size, w + size).astype(np.int64)
    cy = np.clip(np.nan_to_num(np.round(centers[:, 1])), -size, h + size).astype(np.int64)
    offs = np.arange(size) - half + size
    for s in range(0, n, chunk):
        rows = (cy[s:s + chunk, None] + offs)[:, :, None]
        cols = (cx[s:s + chunk, None] + offs)[:, None, :]
        rows = np.clip(rows, 0, h + 2 * size - 1)
        cols = np.clip(cols, 0, w + 2 * size - 1)
        out[s:s + chunk] = padded[rows, cols].transpose(0, 3, 1, 2)
    return out


class FieldPainter:
    """Paints synthesized crops inside their objects' masks, batch by batch.

    The labelled pixels are found, sorted by object and placed in crop coordinates once (flat indices, so each batch
    is one gather and one scatter per channel), and each batch only touches its own objects' pixels.
    """

    def __init__(self, labels: np.ndarray, centers_xy: np.ndarray, size: int) -> None:
        centers = np.asarray(centers_xy, dtype=np.float64).reshape(-1, 2)
        n = len(centers)
        flat = np.asarray(labels).ravel()
        pix = np.flatnonzero((flat > 0) & (flat <= n))
        k = flat[pix].astype(np.int64) - 1
        ok = np.isfinite(centers).all(axis=1)
        corner = np.where(ok[:, None], np.round(centers), 0).astype(np.int64) - size // 2  # crop's top-left (x, y)
        ys, xs = np.divmod(pix, labels.shape[1])
        dy, dx = ys - corner[k, 1], xs - corner[k, 0]
        inside = ok[k] & (dy >= 0) & (dy < size) & (dx >= 0) & (dx < size)
        k = k[inside]
        order = np.argsort(k.astype(np.uint16) if n <= 2**16 else k, kind="stable")  # a radix sort for 16 bits
        self.k = k[order]
        self.pix = pix[inside][order]  # flat index in the field
        self.offset = (dy * size + dx)[inside][order]  # flat index in a crop's plane
        self.size = size

    def paint(self, crops: np.ndarray, first: int, field: np.ndarray) -> np.ndarray:
        """Paint crop i as object number ``first + i`` into ``field`` (H, W, C), C-contiguous."""
        if not field.flags.c_contiguous:
            raise ValueError("FieldPainter.paint needs a C-contiguous field to paint in place")
        lo, hi = np.searchsorted(self.k, [first - 1, first - 1 + len(crops)])
        c, plane = crops.shape[1], self.size * self.size
        src = (self.k[lo:hi] - (first - 1)) * (c * plane) + self.offset[lo:hi]
        dst = self.pix[lo:hi] * c
        crops_flat, field_flat = np.ascontiguousarray(crops).reshape(-1), field.reshape(-1)
        for ch in range(c):
            field_flat[dst + ch] = crops_flat[src + ch * plane]
        return field


def paste_into_objects(crops: np.ndarray, labels: np.ndarray, centers_xy: np.ndarray) -> np.ndarray:
    """A (H, W, C) field: crop k (object number k + 1) painted inside that object's mask, zero elsewhere.

    Each crop is placed with its centre on the object's centre, as ``crop_objects`` cut it.
    """
    _, c, size, _ = crops.shape
    field = np.zeros((*labels.shape, c), dtype=np.float32)
    return FieldPainter(labels, centers_xy, size).paint(crops, 1, field)
