"""Losses that aim at what CellProfiler re-measures, inside the real object's mask.

A pixel loss alone gives the conditional median: blurred cells whose texture (Haralick features at scale 3) and
intensity spread (quartiles, standard deviation, MAD) are too low. These terms compare the synthesized and the real
crop on the statistics those measurements are made of, without asking for pixel-exact detail.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# MeasureTexture's offsets at scale d: right, down-right, down, down-left (CellProfiler's 00, 01, 02, 03)
_EPS = 1e-6


def _shift_pairs(x: torch.Tensor, m: torch.Tensor, dy: int, dx: int):
    """Pixel pairs (a, b) at offset (dy, dx) with both pixels inside the mask; x (N,C,H,W), m (N,1,H,W)."""
    h, w = x.shape[-2:]
    ya, yb = slice(0, h - dy), slice(dy, h)
    xa, xb = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    a, b = x[..., ya, xa], x[..., yb, xb]
    pm = m[..., ya, xa] * m[..., yb, xb]
    return a, b, pm


def texture_stats(x: torch.Tensor, mask: torch.Tensor, scale: int = 3) -> torch.Tensor:
    """(N, C, 4 directions, 5) masked co-occurrence moments: the differentiable core of Haralick's features.

    Per pair (a, b): mean, variance, contrast E[(a-b)^2], correlation and sum variance Var(a+b).
    """
    out = []
    for dy, dx in ((0, scale), (scale, scale), (scale, 0), (scale, -scale)):
        a, b, pm = _shift_pairs(x, mask, dy, dx)
        n = pm.sum((-2, -1)).clamp_min(1.0)

        def mean(t, pm=pm, n=n):
            return (t * pm).sum((-2, -1)) / n

        ma, mb = mean(a), mean(b)
        va = mean(a * a) - ma * ma
        vb = mean(b * b) - mb * mb
        cov = mean(a * b) - ma * mb
        contrast = mean((a - b) ** 2)
        corr = cov / (va.clamp_min(_EPS) * vb.clamp_min(_EPS)).sqrt()
        out.append(torch.stack([0.5 * (ma + mb), 0.5 * (va + vb), contrast, corr, va + vb + 2 * cov], -1))
    return torch.stack(out, 2)


def texture_loss(fake: torch.Tensor, real: torch.Tensor, mask: torch.Tensor, scale: int = 3,
                 channel_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Log-ratio of the positive moments and difference of correlations, synthesized vs real, in the real mask.

    ``channel_weights`` (C,) scales each channel's term (the mean over channels when all are 1).
    """
    sf, sr = texture_stats(fake.float(), mask, scale), texture_stats(real.float(), mask, scale)
    pos = [0, 1, 2, 4]
    log_ratio = (torch.log(sf[..., pos].clamp_min(0) + _EPS) - torch.log(sr[..., pos].clamp_min(0) + _EPS)).abs()
    corr = (sf[..., 3] - sr[..., 3]).abs()
    if channel_weights is None:  # the plain mean, summed in the order the shipped models were trained with
        return log_ratio.mean() + corr.mean()
    per_channel = log_ratio.mean((0, 2, 3)) + corr.mean((0, 2))
    return (per_channel * channel_weights.to(per_channel)).mean()


def masked_quantiles(x: torch.Tensor, mask: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(N, C, len(q)) quantiles of each crop's pixels inside its mask (nearest rank; empty masks give 0)."""
    n, c = x.shape[:2]
    flat = x.flatten(2)
    inside = mask.flatten(2).expand(n, c, -1) > 0.5
    big = torch.finfo(x.dtype).max
    ordered = torch.where(inside, flat, torch.full_like(flat, big)).sort(-1).values
    count = inside.sum(-1, keepdim=True)
    idx = (q.to(x.device).view(1, 1, -1) * (count - 1).clamp_min(0)).round().long()
    vals = ordered.gather(-1, idx)
    return torch.where(count > 0, vals, torch.zeros_like(vals))


QUANTILES = torch.tensor([0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0])


def intensity_distribution_loss(fake: torch.Tensor, real: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L1 between the synthesized and real intensity quantiles inside the real mask (min, quartiles, max …),
    relative to the real crop's median so dim and bright channels count alike."""
    qf = masked_quantiles(fake.float(), mask, QUANTILES)
    qr = masked_quantiles(real.float(), mask, QUANTILES)
    scale = qr[..., 3:4].abs().clamp_min(1e-3)
    return ((qf - qr).abs() / scale).mean()


def level_loss(fake: torch.Tensor, real: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Relative L1 between the synthesized and real mean intensity inside the real mask, per channel
    (MeanIntensity, and IntegratedIntensity with it): the pixel loss aims at each pixel's median, which a
    skewed nuclear intensity distribution puts off the mean."""
    m = mask.float()
    area = m.sum((-2, -1)).clamp_min(1.0)
    mf, mr = (fake.float() * m).sum((-2, -1)) / area, (real.float() * m).sum((-2, -1)) / area
    return ((mf - mr).abs() / mr.abs().clamp_min(1e-3)).mean()


def object_edge(mask: torch.Tensor) -> torch.Tensor:
    """The object's edge pixels as MeasureObjectIntensity's *Edge* features take them (centrosome's outline: pixels
    of the object with a pixel outside it among their 8 neighbours); (N, 1, H, W) 0/1."""
    m = mask.float()
    return m * (1.0 - (-F.max_pool2d(-F.pad(m, (1, 1, 1, 1), value=1.0), 3, stride=1)))


def edge_intensity_loss(fake: torch.Tensor, real: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The intensity-distribution loss on the object's edge pixels only (MinIntensityEdge, MeanIntensityEdge, …):
    a synthesized nucleus whose outline is drawn as a soft ramp is too bright there."""
    return intensity_distribution_loss(fake, real, object_edge(mask))


def _gaussian_blur(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """skimage.filters.gaussian's default (truncate 4, edge mode 'nearest') for (N, 1, H, W)."""
    r = int(4 * sigma + 0.5)
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.pad(x, (r, r, r, r), mode="replicate")
    return F.conv2d(F.conv2d(x, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))


def fine_detail(x: torch.Tensor, sigma: float = 2.0) -> torch.Tensor:
    """Each channel minus its Gaussian blur (``sigma`` pixels): the detail finer than a few pixels."""
    n, c, h, w = x.shape
    flat = x.float().reshape(n * c, 1, h, w)
    return (flat - _gaussian_blur(flat, sigma)).reshape(n, c, h, w)


def pattern_loss(fake: torch.Tensor, real: torch.Tensor, sigma: float = 2.0,
                 detail: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """L1 between the batch means of the synthesized and real crops' fine detail, per pixel, in units of the real
    crops' detail SD per channel.

    Real cells' fine detail (dots, speckles) falls anywhere and averages out over a batch of cells; a pattern a
    generator draws into every cell at the same place — a grid locked to the pixel lattice, a bright spot on the
    same side of every nucleus — does not, and it is what tells a synthesized cell from a real one at a glance.
    ``detail``: the two crops' ``fine_detail`` at ``sigma`` when already computed (the training loop shares them).
    """
    df, dr = detail if detail is not None else (fine_detail(fake, sigma), fine_detail(real, sigma))
    scale = dr.std((0, 2, 3)).clamp_min(1e-4)[:, None, None]
    return ((df.mean(0) - dr.mean(0)).abs() / scale).mean()


def lattice_energy(x: torch.Tensor, mask: torch.Tensor, period: int = 4, sigma: float = 2.0) -> torch.Tensor:
    """(N, C): each crop's fine detail inside ``mask`` (N, 1, H, W) averaged per position on the pixel lattice of
    ``period`` (its period x period phases), the phases' variance: the power of a pattern that repeats every
    ``period`` pixels (and every divisor of it), such as a x4 sub-pixel layer's dots."""
    return _phase_energy(fine_detail(x, sigma), mask, period)


def _phase_energy(d: torch.Tensor, mask: torch.Tensor, period: int) -> torch.Tensor:
    """``lattice_energy`` of detail ``d`` already computed (N, C, H, W); a crop's last rows and columns that do not
    fill a whole period are left out."""
    n, _, h, w = d.shape
    h, w = h - h % period, w - w % period
    d, m = d[..., :h, :w], mask.to(d.dtype)[..., :h, :w].expand(n, 1, h, w)
    def phases(t):
        return t.reshape(t.shape[0], t.shape[1], h // period, period, w // period, period).sum((2, 4))
    means = phases(d * m) / phases(m).clamp_min(1.0)
    return means.flatten(2).var(2, unbiased=False)


def lattice_loss(fake: torch.Tensor, real: torch.Tensor, mask: torch.Tensor, period: int = 4,
                 detail: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """How far the batch's lattice energy (``lattice_energy``) inside the object exceeds the real crops', as a log
    ratio per channel (0 where it does not). Real detail falls anywhere, so its per-phase means are only noise; a
    decoder whose sub-pixel filters drift apart draws the same dots at every ``period``-th pixel of a bright object,
    which is what gives the synthesized cell away (C2ST) though no pixel or feature loss sees it. ``detail`` as for
    ``pattern_loss``."""
    df, dr = detail if detail is not None else (fine_detail(fake), fine_detail(real))
    ef, er = _phase_energy(df, mask, period).mean(0), _phase_energy(dr, mask, period).mean(0)
    return F.relu(torch.log(ef + 1e-12) - torch.log(er + 1e-12)).mean()


def lattice_share(d: torch.Tensor, period: int = 4, tile: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile of ``tile`` x ``tile`` pixels of the fine detail ``d`` (N, C, H, W): the power of its pattern locked
    to the pixel lattice of ``period`` (the variance of its per-phase means) and its whole power (mean square), each
    (N, C, H // tile, W // tile); the rows and columns that do not fill a tile are left out. Their ratio is the
    share of the detail that sits on the lattice: for a camera's detail about 1 / (the pixels per phase), for dots a
    x4 sub-pixel layer draws near 1, wherever in the crop they are."""
    n, c, h, w = d.shape
    tile = max(period, min(tile, h, w) // period * period)
    t = d[..., :h - h % tile, :w - w % tile].reshape(n, c, h // tile, tile // period, period, w // tile,
                                                     tile // period, period)
    means = t.mean((3, 6)).permute(0, 1, 2, 4, 3, 5).flatten(4)  # (N, C, rows, columns, period²)
    return means.var(-1, unbiased=False), t.pow(2).mean((3, 4, 6, 7))


def lattice_share_of(d: torch.Tensor, period: int = 4, tile: int = 16, detach_power: bool = False) -> torch.Tensor:
    """(C,): the share of the fine detail ``d`` (N, C, H, W) on the pixel lattice over all its tiles (``lattice_share``
    summed, so weighted by the tiles' power); ``detach_power``: no gradient through the detail's whole power."""
    energy, power = lattice_share(d, period, tile)
    power = power.detach() if detach_power else power
    return energy.sum((0, 2, 3)) / power.sum((0, 2, 3)).clamp_min(1e-12)


def lattice_share_loss(fake: torch.Tensor, real: torch.Tensor, period: int = 4, tile: int = 16,
                       detail: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """How far the share of the batch's fine detail locked to the pixel lattice (``lattice_share``, tiles over the
    whole crop, weighted by their power) exceeds the real crops', as a log ratio per channel (0 where it does not).
    Unlike ``lattice_loss`` it looks beyond the object and in proportion to the detail drawn: a smooth decoder's dots
    beside a nucleus hold less power than a real crop's noise, yet most of the detail there. The gradient reaches
    the lattice's power only (the detail's whole power is taken as it is), so that drawing more of other detail is
    not a way to lower it. ``detail`` as for ``pattern_loss``."""
    df, dr = detail if detail is not None else (fine_detail(fake), fine_detail(real))
    share_f, share_r = lattice_share_of(df, period, tile, detach_power=True), lattice_share_of(dr, period, tile)
    return F.relu(torch.log(share_f + 1e-12) - torch.log(share_r + 1e-12)).mean()


def fine_scale_differences(x: torch.Tensor) -> torch.Tensor:
    """(N, C, 2): each crop's mean |difference| of pixels 1 and of pixels 2 apart per channel, rows and columns
    averaged — the finest scale, where a camera's noise and blur sit and a pixel-loss decoder is too smooth (or draws
    a checkerboard)."""
    return torch.stack([((x[..., k:, :] - x[..., :-k, :]).abs().mean((2, 3))
                         + (x[..., k:] - x[..., :-k]).abs().mean((2, 3))) / 2 for k in (1, 2)], -1)


def fine_scale_loss(fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """|log ratio| of ``fine_scale_differences``, synthesized vs real crop: the statistics ``evaluate``'s
    *C2ST fine* tells crops apart by."""
    f, r = fine_scale_differences(fake.float()), fine_scale_differences(real.float())
    return (f.clamp_min(1e-5).log() - r.clamp_min(1e-5).log()).abs().mean()


@torch.no_grad()
def otsu_threshold(x: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """(N,) Otsu threshold of each image in (N, H, W), as skimage.filters.threshold_otsu computes it (a histogram
    of ``bins`` equal bins over the image's range; the threshold is a bin centre). No gradient."""
    n = x.shape[0]
    flat = x.reshape(n, -1).float()
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    width = ((hi - lo) / bins).clamp_min(1e-12)
    idx = ((flat - lo) / width).long().clamp(0, bins - 1)
    hist = torch.zeros(n, bins, device=x.device).scatter_add_(1, idx, torch.ones_like(flat))
    centres = lo + width * (torch.arange(bins, device=x.device) + 0.5)
    w1 = hist.cumsum(1)
    w2 = hist.flip(1).cumsum(1).flip(1)
    m1 = (hist * centres).cumsum(1) / w1.clamp_min(1)
    m2 = (hist * centres).flip(1).cumsum(1).flip(1) / w2.clamp_min(1)
    between = w1[:, :-1] * w2[:, 1:] * (m1[:, :-1] - m2[:, 1:]) ** 2
    return centres.gather(1, between.argmax(1, keepdim=True))[:, 0]


def outline_loss(fake: torch.Tensor, mask: torch.Tensor, channel: int = 0, sigma: float = 1.0,
                 ring: int = 3, threshold: torch.Tensor | None = None,
                 outside: torch.Tensor | None = None, real: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the synthesized crop's soft Otsu foreground against the object's own mask.

    The evaluation measures shape on an Otsu segmentation of the synthesized ``channel`` (blurred by ``sigma``,
    its own threshold), so pixels of the object should lie above that threshold and a ``ring`` of pixels around it
    below: the segmented outline is then the object's, not one merged with a touching neighbour. Pixels farther
    out (neighbours) are left to the other losses. ``threshold`` (N,), e.g. the one the pipeline's segmentation
    used on each cell's field, replaces the per-crop Otsu threshold. ``outside`` (N, 1, H, W) limits the ring to
    its pixels (e.g. the background between cells, not a touching neighbour); ``sigma`` 0: no blur. ``real`` (the
    real crops) limits it to the pixels the real crop shows as background — below the same threshold (its own Otsu
    threshold without ``threshold``), blurred alike — so that a neighbour touching the object is not drawn dark.
    """
    def blur(crops: torch.Tensor) -> torch.Tensor:
        x = crops[:, channel:channel + 1].float()
        return (_gaussian_blur(x, sigma) if sigma > 0 else x)[:, 0]

    blurred = blur(fake)
    t = (otsu_threshold(blurred) if threshold is None else threshold.float()).view(-1, 1, 1)
    inside = mask[:, 0] > 0.5
    around = (F.max_pool2d(mask.float(), 2 * ring + 1, stride=1, padding=ring)[:, 0] > 0.5) & ~inside
    if outside is not None:
        around &= outside[:, 0] > 0.5
    if real is not None:
        real_blurred = blur(real)
        t_real = t if threshold is not None else otsu_threshold(real_blurred).view(-1, 1, 1)
        around &= real_blurred < t_real
    logits = (blurred - t) / (0.1 * t.abs()).clamp_min(1e-3)
    weight = (inside | around).float()
    bce = F.binary_cross_entropy_with_logits(logits, inside.float(), weight=weight, reduction="sum")
    return bce / weight.sum().clamp_min(1.0)


def surroundings(mask: torch.Tensor, grow: int) -> torch.Tensor:
    """1 outside the object's mask (N, 1, H, W) grown by ``grow`` pixels (a square neighbourhood), else 0."""
    return 1.0 - F.max_pool2d(mask.float(), 2 * grow + 1, stride=1, padding=grow)


def gradient_outside(x: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """``x`` unchanged, but a loss on it back-propagates only through the pixels where ``outside`` is 1."""
    return outside * x + (1 - outside) * x.detach()
