"""Metrics whose meaning a user can check: feature correlation, pixel fidelity, two-sample tests."""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn as nn

FAMILIES = ("AreaShape", "Intensity", "Texture")


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r over the pairs where both are finite; NaN when either side is constant."""
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    a, b = a[ok] - a[ok].mean(), b[ok] - b[ok].mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def r2(target: np.ndarray, pred: np.ndarray) -> float:
    """Coefficient of determination of ``pred`` as a predictor of ``target`` (1 is perfect, can be < 0)."""
    ok = np.isfinite(target) & np.isfinite(pred)
    if ok.sum() < 3:
        return float("nan")
    t, p = target[ok], pred[ok]
    ss = ((t - t.mean()) ** 2).sum()
    return float(1 - ((t - p) ** 2).sum() / ss) if ss > 0 else float("nan")


def family(feature: str) -> str:
    return feature.split("_", 1)[0]


def summarize_r(rs: dict[str, float]) -> dict:
    """Median r, fractions >= 0.5 and >= 0.8 overall and per family, and the 10 worst features."""
    def stats(vals):
        v = np.array([x for x in vals if np.isfinite(x)])
        if v.size == 0:
            return {"median_r": float("nan"), "frac_ge_0.5": float("nan"), "frac_ge_0.8": float("nan"), "n": 0}
        return {"median_r": float(np.median(v)), "frac_ge_0.5": float((v >= 0.5).mean()),
                "frac_ge_0.8": float((v >= 0.8).mean()), "n": int(v.size)}

    out = {"all": stats(rs.values())}
    for fam in FAMILIES:
        out[fam] = stats([r for f, r in rs.items() if family(f) == fam])
    finite = sorted(((r, f) for f, r in rs.items() if np.isfinite(r)))
    out["worst"] = [(f, round(r, 3)) for r, f in finite[:10]]
    return out


def family_medians(x: np.ndarray, y: np.ndarray, features: list[str], weights: np.ndarray) -> np.ndarray:
    """Median Pearson r per family (FAMILIES order, then all) for each row of cell ``weights`` (B, cells).

    ``x``, ``y``: (cells, features) input and re-measured values; a pair counts where both are finite (as
    ``pearson``). Weights of ones give the table's medians; multinomial counts give bootstrap resamples.
    """
    ok = (np.isfinite(x) & np.isfinite(y)).astype(np.float64)
    x = np.where(ok > 0, x, 0.0)
    y = np.where(ok > 0, y, 0.0)
    n = ok.sum(0)
    x = (x - x.sum(0) / np.maximum(n, 1)) * ok  # centred (over finite pairs) so the sums below stay accurate
    y = (y - y.sum(0) / np.maximum(n, 1)) * ok
    w = np.asarray(weights, dtype=np.float64)
    sw, sx, sy = w @ ok, w @ x, w @ y
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = w @ (x * y) - sx * sy / sw
        var = (w @ (x * x) - sx * sx / sw) * (w @ (y * y) - sy * sy / sw)
        r = np.where((var > 1e-24) & ((w > 0) @ ok >= 3), cov / np.sqrt(var), np.nan)
    fams = np.array([family(f) for f in features])
    cols = [fams == fam for fam in FAMILIES] + [np.ones(len(features), bool)]
    out = np.full((len(w), len(cols)), np.nan)
    with warnings.catch_warnings():  # a family none of whose features has an r stays NaN, as in summarize_r
        warnings.simplefilter("ignore", RuntimeWarning)
        for j, c in enumerate(cols):
            if c.any():
                out[:, j] = np.nanmedian(r[:, c], axis=1)
    return out


def bootstrap_medians(x: np.ndarray, y: np.ndarray, features: list[str], n_boot: int = 1000,
                      seed: int = 0) -> dict[str, list[float]]:
    """95% bootstrap intervals (percentile, resampling held-out cells) of each family's median Pearson r.

    How much the table's medians would move with another draw of cells from the same field.
    """
    counts = np.random.default_rng(seed).multinomial(len(x), np.full(len(x), 1 / len(x)), size=n_boot)
    meds = family_medians(x, y, features, counts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanpercentile(meds, 2.5, axis=0), np.nanpercentile(meds, 97.5, axis=0)
    return {k: [float(a), float(b)] for k, a, b in zip((*FAMILIES, "all"), lo, hi)}


def spearman_medians(x: np.ndarray, y: np.ndarray, features: list[str]) -> dict[str, float]:
    """Median Spearman rank correlation per family: the table's medians, less swayed by a few outlying cells."""
    from scipy.stats import rankdata

    ok = np.isfinite(x) & np.isfinite(y)
    rx, ry = np.full(x.shape, np.nan), np.full(y.shape, np.nan)
    for j in range(x.shape[1]):
        rx[ok[:, j], j] = rankdata(x[ok[:, j], j])
        ry[ok[:, j], j] = rankdata(y[ok[:, j], j])
    meds = family_medians(rx, ry, features, np.ones((1, len(x))))[0]
    return {k: float(v) for k, v in zip((*FAMILIES, "all"), meds)}


def pixel_metrics(real: np.ndarray, fake: np.ndarray) -> dict[str, float]:
    """Mean MSE, PSNR (dB, data range 1 = CellProfiler's intensity scale) and SSIM over cells."""
    import inspect

    from skimage.metrics import structural_similarity

    kw = ({"channel_axis": -1} if "channel_axis" in inspect.signature(structural_similarity).parameters
          else {"multichannel": True})  # scikit-image < 0.19
    mse = ((real - fake) ** 2).reshape(len(real), -1).mean(1)
    psnr = 10 * np.log10(1.0 / np.maximum(mse, 1e-12))
    ssim = []
    for a, b in zip(real, fake):
        a, b = np.moveaxis(a, 0, -1), np.moveaxis(b, 0, -1)
        ssim.append(structural_similarity(a, b, data_range=1.0, **kw))
    return {"mse": float(mse.mean()), "psnr": float(psnr.mean()), "ssim": float(np.mean(ssim))}


def ks_median(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Median over shared features of the two-sample Kolmogorov–Smirnov statistic (0 = same distribution)."""
    from scipy.stats import ks_2samp

    stats = []
    for f in sorted(set(a) & set(b)):
        x, y = a[f][np.isfinite(a[f])], b[f][np.isfinite(b[f])]
        if len(x) > 2 and len(y) > 2:
            stats.append(ks_2samp(x, y).statistic)
    return float(np.median(stats)) if stats else float("nan")


def fine_scale_stats(crops: np.ndarray) -> np.ndarray:
    """(N, 3C): per crop and channel, the mean |difference| of pixels 1 and of pixels 2 apart (rows and columns
    averaged), and their ratio — what a camera leaves at the finest scale (noise, the optics' blur, 8-bit levels)
    and a generator's smoothness or checkerboard changes, whatever the crop looks like at a glance."""
    from ..losses import fine_scale_differences

    d = fine_scale_differences(torch.from_numpy(np.asarray(crops, np.float64))).numpy()
    d1, d2 = d[..., 0], d[..., 1]
    return np.concatenate([d1, d2, d1 / np.maximum(d2, 1e-6)], 1)


def c2st_fine(real: np.ndarray, fake: np.ndarray, seed: int = 0) -> float:
    """Classifier two-sample test on ``fine_scale_stats``: held-out accuracy of a logistic regression.

    Half of each set trains it (split at random by ``seed``), the other half tests it; 0.5 means the crops'
    finest-scale statistics are indistinguishable, NaN when there are too few crops to split.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n = min(len(real), len(fake))
    if n < 4:
        return float("nan")
    x = np.concatenate([fine_scale_stats(real[:n]), fine_scale_stats(fake[:n])])
    y = np.r_[np.ones(n), np.zeros(n)]
    perm = np.random.default_rng(seed).permutation(2 * n)
    x, y = x[perm], y[perm]
    if len(set(y[:n])) < 2:
        return float("nan")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x[:n], y[:n])
    return float((clf.predict(x[n:]) == y[n:]).mean())


def c2st(real: np.ndarray, fake: np.ndarray, seed: int = 0, steps: int = 300) -> float:
    """Classifier two-sample test: held-out accuracy of a small CNN telling real from synthesized crops.

    Half of each set trains it, the other half tests it; 0.5 means indistinguishable.
    """
    g = torch.Generator().manual_seed(seed)
    n = min(len(real), len(fake))
    x = torch.from_numpy(np.concatenate([real[:n], fake[:n]])).float()
    y = torch.cat([torch.ones(n), torch.zeros(n)])
    perm = torch.randperm(2 * n, generator=g)
    x, y = x[perm], y[perm]
    half = n
    c = x.shape[1]
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(c, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 1),
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(steps):
        idx = torch.randint(0, half, (64,), generator=g)
        loss = nn.functional.binary_cross_entropy_with_logits(net(x[idx]).squeeze(1), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = net(x[half:]).squeeze(1) > 0
    return float((pred.float() == y[half:]).float().mean())
