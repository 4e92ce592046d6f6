"""Cut, pad and paste square crops around objects, vectorized over objects (no per-object loop)."""
from __future__ import annotations

import numpy as np


def _channels_last(image: np.ndarray) -> np.ndarray:
    return image[:, :, None] if image.ndim == 2 else image


def crop_objects(image: np.ndarray, centers_xy: np.ndarray, size: int) -> np.ndarray:
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
    # top-left corners in the image; a crop wholly outside the image stays zero
    top = np.clip(np.nan_to_num(np.round(centers[:, 1])) - half, -size, h).astype(np.int64)
    left = np.clip(np.nan_to_num(np.round(centers[:, 0])) - half, -size, w).astype(np.int64)
    for i, (y, x) in enumerate(zip(top.tolist(), left.tolist())):  # a slice per crop: no padded copy of the image
        y0, y1, x0, x1 = max(y, 0), min(y + size, h), max(x, 0), min(x + size, w)
        if y0 < y1 and x0 < x1:
            out[i, :, y0 - y:y1 - y, x0 - x:x1 - x] = img[y0:y1, x0:x1].transpose(2, 0, 1)
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


class FieldComposer:
    """The whole synthetic field from every object's synthesized crop, added batch by batch.

    Each crop only guesses at its neighbours, so no crop is pasted whole: a pixel is drawn by the objects whose cell
    it lies in — a soft partition by distance to each object's centre (``Location_Center_X/Y``) in which larger
    objects reach farther (``radii``: each object's equivalent radius, from its area) — and, beyond every object's
    radius + ``grow`` pixels, by the darkest of the crops that cover it (their background without the guessed
    neighbours), fading over a crop's outer ``fade`` pixels to the field's background: each channel's 10th percentile,
    over crops, of the 10th percentile of each crop's outermost pixels (on ExampleFly's held-out field: DNA, FITC,
    Rhodamine 0, 0.017, 0.032 against the real field's 0.004, 0.016, 0.027 far from any nucleus; the median over crops
    is 2x too bright in FITC, crops in clusters being the many). Memory: a few field-sized arrays.
    """

    def __init__(self, shape: tuple[int, int], centers_xy: np.ndarray, radii: np.ndarray, size: int,
                 n_channels: int, grow: float = 8.0, sigma: float = 3.0, edge: float = 1.5, fade: int = 8) -> None:
        h, w = shape
        self.centers = np.asarray(centers_xy, dtype=np.float64).reshape(-1, 2)
        self.radii = np.nan_to_num(np.asarray(radii, dtype=np.float64).ravel(), nan=0.0).clip(0)
        self.size, self.grow, self.sigma, self.edge = size, grow, sigma, edge
        # channels first, as the crops are (the field is made channels-last only once, in ``field``)
        self.num = np.zeros((n_channels, h, w))  # sum of weight x pixel (float64: weights reach 1e-50)
        self.den = np.zeros((h, w))
        self.low = np.full((n_channels, h, w), np.inf, np.float32)  # darkest covering crop
        self.member = np.zeros((h, w), np.float32)  # how surely the pixel lies in some object's cell
        self.cover = np.zeros((h, w), np.float32)  # how far inside some crop (1: at least ``fade`` pixels)
        self.rims: list[np.ndarray] = []  # each crop's outermost pixels' 10th percentile per channel
        self._index = np.arange(size)
        inward = np.minimum(self._index, self._index[::-1]) + 1
        self._fade = np.clip(np.minimum(inward[:, None], inward[None, :]) / max(fade, 1), 0, 1).astype(np.float32)
        self._rim = np.ones((size, size), bool)
        self._rim[2:-2, 2:-2] = False

    def add(self, crops: np.ndarray, first: int) -> None:
        """Add crop i (C, S, S) as object number ``first + i``; objects without a centre are skipped."""
        h, w = self.den.shape
        s = self.size
        k = np.arange(first - 1, first - 1 + len(crops))
        placed = np.isfinite(self.centers[k]).all(1)
        self.rims.extend(np.percentile(crops[placed][:, :, self._rim], 10, axis=2))  # once per batch
        k, crops = k[placed], crops[placed]
        corner = np.round(self.centers[k]).astype(np.int64) - s // 2  # each crop's top-left pixel: x0, y0
        # the soft partition's weights for the whole batch at once: (n, S, S)
        dy = self._index[None, :] + corner[:, 1:] - self.centers[k, 1:]
        dx = self._index[None, :] + corner[:, :1] - self.centers[k, :1]
        d2 = dy[:, :, None] ** 2 + dx[:, None, :] ** 2
        r = self.radii[k][:, None, None]
        member = 1 / (1 + np.exp(((np.sqrt(d2) - r - self.grow) / self.edge).astype(np.float32)))  # in [0, 1]
        weight = member * np.exp(-(d2 - r * r) / (2 * self.sigma ** 2))
        for i, (x0, y0) in enumerate(corner.tolist()):
            r0, r1, c0, c1 = max(0, y0), min(h, y0 + s), max(0, x0), min(w, x0 + s)
            if r0 >= r1 or c0 >= c1:
                continue
            rows, cols, at = slice(r0 - y0, r1 - y0), slice(c0 - x0, c1 - x0), np.s_[r0:r1, c0:c1]  # crop, field
            wgt, px, low = weight[i, rows, cols], crops[i, :, rows, cols], self.low[:, r0:r1, c0:c1]
            self.num[:, r0:r1, c0:c1] += wgt * px
            self.den[at] += wgt
            np.minimum(low, px, out=low)
            np.maximum(self.member[at], member[i, rows, cols], out=self.member[at])
            np.maximum(self.cover[at], self._fade[rows, cols], out=self.cover[at])

    def field(self) -> np.ndarray:
        """The (H, W, C) float32 field composed so far (float64 only for the weighted mean's sums)."""
        rims = np.percentile(self.rims, 10, axis=0) if self.rims else np.zeros(len(self.low))
        fill = rims.astype(np.float32)
        out = np.empty((*self.den.shape, len(fill)), np.float32)
        inverse = 1 / np.maximum(self.den, 1e-300)
        for ch, low in enumerate(self.low):  # a channel at a time: no broadcasting over 3 interleaved channels
            background = np.where(np.isfinite(low), low, fill[ch])
            background -= fill[ch]
            background *= self.cover
            background += fill[ch]  # cover x low + (1 - cover) x fill
            mix = (self.num[ch] * inverse).astype(np.float32)  # the weighted mean
            mix -= background
            mix *= self.member
            mix += background  # member x mean + (1 - member) x background
            out[:, :, ch] = mix
        return out


def compose_field(crops: np.ndarray, shape: tuple[int, int], centers_xy: np.ndarray, radii: np.ndarray,
                  **options) -> np.ndarray:
    """A (H, W, C) field drawn from the crops of objects 1..N (see ``FieldComposer``)."""
    composer = FieldComposer(shape, centers_xy, radii, crops.shape[-1], crops.shape[1], **options)
    composer.add(crops, 1)
    return composer.field()
