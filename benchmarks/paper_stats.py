"""Statistics of section 8: paired differences over seeds and test scans, and the verdict on a paper trend.

Every arm of a comparison is a (seeds, images) array of per-image losses (top-1 wrong as 0/1, or the negative
log-likelihood of the true class), the same seeds and the same test images in both arms. The difference
`worse - better` is positive when the paper's claim goes the right way.

Two sources of noise, both in the interval:
- seeds: another seed trains another net (the seed-to-seed SD of narrow A's error was about 2.7 pp);
- the test set: its images come from a few hundred handwriting scans, and images of one scan err together.

The hierarchical bootstrap draws scans with replacement (all the images of a drawn scan come with it; the same
draw for every seed, since all seeds share one test set), then seeds with replacement, and takes the paired
difference. Its replicates split into a scan part (all seeds, resampled scans) and a seed part (the resampled
seeds' deviation from it). A bootstrap over K values has (K - 1) / K of their variance, which matters at K = 3:
the seed part is scaled by sqrt(K / (K - 1)) to undo that. The interval is the estimate +- t * SE with
Welch-Satterthwaite degrees of freedom from the two parts, so that three seeds give a wide interval when the
seeds disagree, and a narrow one when only the test set is noisy.

Pure numpy (and scipy's t quantile); deterministic for a given rng seed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

REPLICATES = 2000
RNG_SEED = 20150410  # the paper's arXiv v6 date: fixed before any run, so no seed was picked for its result
LEVEL = 0.95  # two-sided interval of a directional claim
TOST_LEVEL = 0.90  # two one-sided tests at 5 % each: the 90 % interval inside the margin

HOLDS, CONTRADICTS, INCONCLUSIVE = "holds", "contradicts", "inconclusive"


@dataclass(frozen=True)
class Estimate:
    """A mean paired difference with its bootstrap SE (and its two parts) and a t interval at `level`."""

    diff: float
    se: float
    low: float
    high: float
    level: float
    df: float
    se_seed: float  # nan with one seed: its variance cannot be estimated
    se_scan: float
    seeds: int
    images: int
    scans: int

    def to_dict(self, scale: float = 1.0, digits: int = 4) -> dict[str, Any]:
        """As JSON-ready numbers, differences times `scale` (100 for percentage points)."""
        d = asdict(self)
        for k in ("diff", "se", "low", "high", "se_seed", "se_scan"):
            d[k] = _round(d[k] * scale, digits)
        d["df"] = _round(d["df"], 1)
        return d


def _round(x: float, digits: int) -> float | None:
    return None if not math.isfinite(x) else round(float(x), digits)


def _t_quantile(p: float, df: float) -> float:
    from scipy.stats import norm, t

    return float(norm.ppf(p)) if not math.isfinite(df) else float(t.ppf(p, df))


def _cluster_sums(d: np.ndarray, clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per seed and cluster, the sum of the differences; and each cluster's image count."""
    _, codes = np.unique(np.asarray(clusters), return_inverse=True)
    n_clusters = int(codes.max()) + 1
    sums = np.stack([np.bincount(codes, weights=row, minlength=n_clusters) for row in d])
    return sums, np.bincount(codes, minlength=n_clusters).astype(float)


def bootstrap(worse: np.ndarray, better: np.ndarray, clusters: np.ndarray, level: float = LEVEL,
              replicates: int = REPLICATES, rng_seed: int = RNG_SEED) -> Estimate:
    """The mean of `worse - better` over seeds and images, with a hierarchical (seeds, then scans) bootstrap SE."""
    worse, better = np.atleast_2d(np.asarray(worse, float)), np.atleast_2d(np.asarray(better, float))
    if worse.shape != better.shape or worse.shape[1] != len(clusters) or worse.size == 0:
        raise ValueError(f"arms {worse.shape} and {better.shape} must be (seeds, images) over {len(clusters)} images")
    d = worse - better
    k = d.shape[0]
    sums, counts = _cluster_sums(d, clusters)
    rng = np.random.default_rng(rng_seed)
    c = len(counts)
    scan_draws = rng.multinomial(c, np.full(c, 1 / c), size=replicates).astype(float)  # (R, C)
    seed_draws = rng.multinomial(k, np.full(k, 1 / k), size=replicates).astype(float)  # (R, K)
    per_seed = (scan_draws @ sums.T) / (scan_draws @ counts)[:, None]  # (R, K): each seed on the resampled scans
    scan_part = per_seed.mean(axis=1)
    seed_part = (seed_draws * per_seed).sum(axis=1) / k - scan_part
    v_scan = float(scan_part.var(ddof=1))
    if k > 1:
        seed_part = seed_part * math.sqrt(k / (k - 1))
        v_seed = float(seed_part.var(ddof=1))
        df = _satterthwaite(v_seed, k - 1, v_scan, c - 1)
    else:
        v_seed, df = math.nan, (c - 1 if c > 1 else math.inf)
    se = float(np.std(scan_part + (seed_part if k > 1 else 0.0), ddof=1))
    half = _t_quantile(0.5 + level / 2, df) * se
    diff = float(d.mean())
    return Estimate(diff, se, diff - half, diff + half, level, df, math.sqrt(v_seed), math.sqrt(v_scan), k,
                    d.shape[1], c)


def _satterthwaite(v1: float, df1: int, v2: float, df2: int) -> float:
    """Degrees of freedom of a sum of two variance estimates (Welch-Satterthwaite)."""
    denom = (v1 * v1 / df1 if df1 > 0 else 0.0) + (v2 * v2 / df2 if df2 > 0 else 0.0)
    return (v1 + v2) ** 2 / denom if denom > 0 else math.inf


def directional(est: Estimate) -> str:
    """`holds` when the interval lies above zero, `contradicts` below it, `inconclusive` otherwise (and always
    with one seed: the seed-to-seed variance, the larger part here, is then unknown)."""
    if est.seeds < 2 or not math.isfinite(est.se):
        return INCONCLUSIVE
    if est.low > 0:
        return HOLDS
    if est.high < 0:
        return CONTRADICTS
    return INCONCLUSIVE


def equivalent(est90: Estimate, est95: Estimate, margin: float) -> str:
    """A claim of no difference, by two one-sided tests: `holds` when the 90 % interval lies inside
    (-margin, margin); `contradicts` when the 95 % interval lies wholly outside it (the difference is
    larger than the margin); `inconclusive` otherwise, a noisy comparison proving nothing either way."""
    if est90.seeds < 2 or not math.isfinite(est90.se):
        return INCONCLUSIVE
    if -margin < est90.low and est90.high < margin:
        return HOLDS
    if est95.low > margin or est95.high < -margin:
        return CONTRADICTS
    return INCONCLUSIVE


def compare(worse: np.ndarray, better: np.ndarray, clusters: np.ndarray, margin: float | None = None,
            scale: float = 1.0) -> dict[str, Any]:
    """One measure of a trend: the estimate at 95 % and the verdict; for a claim of no difference (`margin`
    given, in the same units as the losses) the 90 % TOST interval too. Numbers times `scale` in the result."""
    est = bootstrap(worse, better, clusters, LEVEL)
    out: dict[str, Any] = est.to_dict(scale)
    if margin is None:
        out["verdict"] = directional(est)
    else:
        est90 = bootstrap(worse, better, clusters, TOST_LEVEL)
        out |= {"margin": margin * scale, "tost_low": _round(est90.low * scale, 4),
                "tost_high": _round(est90.high * scale, 4), "verdict": equivalent(est90, est, margin)}
    return out


def combine(verdicts: list[str]) -> str:
    """Several comparisons that must all go the paper's way (combined better than dense AND than multi-crop)."""
    if verdicts and all(v == HOLDS for v in verdicts):
        return HOLDS
    return CONTRADICTS if CONTRADICTS in verdicts else INCONCLUSIVE
