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

    The labelled pixels are found, sorted by object and placed in crop coordinates once, so each batch
    only slices its own objects' pixels (no rescan of the label image per batch).
    """

    def __init__(self, labels: np.ndarray, centers_xy: np.ndarray, size: int) -> None:
        centers = np.asarray(centers_xy, dtype=np.float64).reshape(-1, 2)
        n = len(centers)
        ys, xs = np.nonzero((labels > 0) & (labels <= n))
        k = labels[ys, xs].astype(np.int64) - 1
        ok = np.isfinite(centers[k]).all(axis=1)
        ys, xs, k = ys[ok], xs[ok], k[ok]
        dy = ys - np.round(centers[k, 1]).astype(np.int64) + size // 2
        dx = xs - np.round(centers[k, 0]).astype(np.int64) + size // 2
        inside = (dy >= 0) & (dy < size) & (dx >= 0) & (dx < size)
        order = np.argsort(k[inside], kind="stable")
        self.ys, self.xs, self.k, self.dy, self.dx = (a[inside][order] for a in (ys, xs, k, dy, dx))

    def paint(self, crops: np.ndarray, first: int, field: np.ndarray) -> np.ndarray:
        """Paint crop i as object number ``first + i`` into ``field`` (H, W, C)."""
        lo, hi = np.searchsorted(self.k, [first - 1, first - 1 + len(crops)])
        sl = slice(lo, hi)
        field[self.ys[sl], self.xs[sl]] = crops[self.k[sl] - (first - 1), :, self.dy[sl], self.dx[sl]]
        return field


def paste_into_objects(crops: np.ndarray, labels: np.ndarray, centers_xy: np.ndarray) -> np.ndarray:
    """A (H, W, C) field: crop k (object number k + 1) painted inside that object's mask, zero elsewhere.

    Each crop is placed with its centre on the object's centre, as ``crop_objects`` cut it.
    """
    _, c, size, _ = crops.shape
    field = np.zeros((*labels.shape, c), dtype=np.float32)
    return FieldPainter(labels, centers_xy, size).paint(crops, 1, field)
