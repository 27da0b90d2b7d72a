"""benchmarks.paper_stats on synthetic arms whose answer is known: verdicts, equivalence, clustering, seeds."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.paper_stats import (
    CONTRADICTS,
    HOLDS,
    INCONCLUSIVE,
    bootstrap,
    combine,
    compare,
    directional,
)

SCANS = np.repeat(np.arange(200), 5)  # 1,000 test images from 200 scans, 5 each


def arms(p_worse: float, p_better: float, seeds: int = 5, seed: int = 0,
         images: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Independent 0/1 errors of two arms at the given rates, per seed and image."""
    rng = np.random.default_rng(seed)
    return ((rng.random((seeds, images)) < p_worse).astype(float),
            (rng.random((seeds, images)) < p_better).astype(float))


def test_a_true_effect_holds() -> None:
    worse, better = arms(0.25, 0.15)
    result = compare(worse, better, SCANS, scale=100)
    assert result["verdict"] == HOLDS
    assert result["low"] > 0 and 8 < result["diff"] < 12


def test_a_null_effect_is_inconclusive_never_contradicts() -> None:
    worse, better = arms(0.2, 0.2, seed=3)
    assert compare(worse, better, SCANS)["verdict"] == INCONCLUSIVE


def test_a_reversed_effect_contradicts() -> None:
    worse, better = arms(0.12, 0.22, seed=1)
    assert compare(worse, better, SCANS)["verdict"] == CONTRADICTS


def test_equivalence_needs_a_tight_difference_inside_the_margin() -> None:
    rng = np.random.default_rng(5)
    same = (rng.random((5, 1000)) < 0.2).astype(float)
    flips = rng.random((5, 1000)) < 0.005  # the arms disagree on 0.5 % of the images
    other = np.where(flips, 1 - same, same)
    tight = compare(same, other, SCANS, margin=0.015)
    assert tight["verdict"] == HOLDS and -0.015 < tight["tost_low"] < tight["tost_high"] < 0.015
    # The same arms on 60 images: the interval is too wide to prove anything.
    few = compare(same[:, :60], other[:, :60], SCANS[:60], margin=0.015)
    assert few["verdict"] == INCONCLUSIVE
    # A tight difference of 5 pp is not "no difference" at a 1.5 pp margin.
    worse, better = arms(0.25, 0.20, seeds=5, images=1000, seed=2)
    assert compare(worse, better, SCANS, margin=0.015)["verdict"] == CONTRADICTS


def test_equivalence_fails_when_independent_arms_are_just_noisy() -> None:
    worse, better = arms(0.2, 0.2, seeds=3, seed=4)  # no difference, but independent errors: a wide interval
    assert compare(worse, better, SCANS, margin=0.005)["verdict"] == INCONCLUSIVE


def test_clustering_by_scan_widens_the_interval_when_a_scans_images_err_together() -> None:
    rng = np.random.default_rng(7)
    scans = np.repeat(np.arange(50), 20)  # 1,000 images from 50 scans
    effect = rng.normal(0, 0.3, 50)[scans]  # a scan the one arm reads worse, in every seed
    worse = (rng.random((3, 1000)) < np.clip(0.2 + effect, 0, 1)).astype(float)
    better = (rng.random((3, 1000)) < 0.2).astype(float)
    by_scan = bootstrap(worse, better, scans)
    by_image = bootstrap(worse, better, np.arange(1000))
    assert by_scan.se_scan > 1.5 * by_image.se_scan
    assert by_scan.high - by_scan.low > by_image.high - by_image.low


def test_seed_to_seed_variance_is_in_the_interval() -> None:
    worse, better = arms(0.2, 0.15, seeds=3, seed=8)
    calm = bootstrap(worse, better, SCANS)
    shifted = worse.copy()
    shifted[0] = np.maximum(shifted[0], np.random.default_rng(9).random(1000) < 0.3)  # one seed trained badly
    wild = bootstrap(shifted, better, SCANS)
    assert wild.se_seed > 3 * calm.se_seed
    assert wild.high - wild.low > 2 * (calm.high - calm.low)
    assert directional(wild) == INCONCLUSIVE  # three seeds that disagree prove nothing


def test_one_seed_is_inconclusive_however_large_the_difference() -> None:
    worse, better = arms(0.5, 0.1, seeds=1)
    est = bootstrap(worse, better, SCANS)
    assert np.isnan(est.se_seed) and directional(est) == INCONCLUSIVE


def test_the_bootstrap_is_deterministic_and_checks_its_arms() -> None:
    worse, better = arms(0.2, 0.1, seeds=3)
    assert bootstrap(worse, better, SCANS) == bootstrap(worse, better, SCANS)
    with pytest.raises(ValueError):
        bootstrap(worse, better[:2], SCANS)
    with pytest.raises(ValueError):
        bootstrap(worse, better, SCANS[:10])


def test_combined_verdicts() -> None:
    assert combine([HOLDS, HOLDS]) == HOLDS
    assert combine([HOLDS, INCONCLUSIVE]) == INCONCLUSIVE
    assert combine([HOLDS, CONTRADICTS]) == CONTRADICTS
    assert combine([]) == INCONCLUSIVE
