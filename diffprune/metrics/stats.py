"""Uncertainty and significance for the evaluation protocol.

Paired fidelity (per-image PSNR/SSIM of a model's samples against the teacher's samples from the
same initial noise) with a 95% confidence interval over images; KID with its standard error over
random subsets (clean-fid's estimator); and the paired test that says whether one model is closer
to the teacher than another on the same images.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from cleanfid.fid import kernel_distance
from scipy import stats


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95% confidence interval ``[lo, hi]`` and the sample size it came from."""

    mean: float
    lo: float
    hi: float
    n: int

    def to_json(self) -> dict:
        return asdict(self)


def mean_ci(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> Estimate:
    """Mean of ``values (N,)`` and its Student-t confidence interval (N >= 2; N == 1 gives a point)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"mean_ci needs a non-empty 1-D sequence, got shape {v.shape}")
    m = float(v.mean())
    if v.size == 1:
        return Estimate(m, m, m, 1)
    half = float(stats.t.ppf(0.5 + confidence / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return Estimate(m, m - half, m + half, int(v.size))


def kid(feats_a: np.ndarray, feats_b: np.ndarray, *, subsets: int = 50, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """KID between features ``(N, D)`` and ``(M, D)``: (mean, standard error) over ``subsets``
    random subsets, each scored by clean-fid's cubic-kernel MMD estimator. Seeded: the global numpy
    RNG clean-fid draws from is set for the call and restored after.

    The standard error is over the subsets (as clean-fid and torchmetrics report KID's spread); the
    subsets share images, so it understates the dataset-level uncertainty: compare models with the
    spread over sampling seeds too."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        vals = np.array([kernel_distance(feats_a, feats_b, num_subsets=1, max_subset_size=subset_size)
                         for _ in range(subsets)])
    finally:
        np.random.set_state(state)
    return float(vals.mean()), float(vals.std(ddof=1) / np.sqrt(subsets)) if subsets > 1 else 0.0


@dataclass(frozen=True)
class PairedTest:
    """Is ``a`` different from ``b`` on the same items? (Wilcoxon signed-rank on ``a - b``.)"""

    mean_diff: float      # mean of a - b
    ci_lo: float          # 95% CI of the mean difference
    ci_hi: float
    p_value: float
    significant: bool     # p < alpha
    n: int

    def verdict(self, better: str = "higher") -> str:
        """``"better"``, ``"worse"`` or ``"no significant difference"`` for ``a`` against ``b``."""
        if not self.significant:
            return "no significant difference"
        up = self.mean_diff > 0
        return "better" if up == (better == "higher") else "worse"

    def to_json(self) -> dict:
        return asdict(self)


def paired_test(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, alpha: float = 0.05) -> PairedTest:
    """Paired comparison of per-item scores ``a (N,)`` and ``b (N,)`` (e.g. per-image PSNR vs the
    teacher of two models sampled from the same noises). Wilcoxon's signed-rank test: no normality
    assumed, robust to the heavy tails PSNR has."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_test needs two 1-D arrays of equal length, got {a.shape} and {b.shape}")
    d = a - b
    ci = mean_ci(d)
    p = 1.0 if np.allclose(d, 0) else float(stats.wilcoxon(d, zero_method="zsplit").pvalue)
    return PairedTest(ci.mean, ci.lo, ci.hi, p, p < alpha, int(d.size))


def intervals_overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether two ``(lo, hi)`` intervals overlap (FID/KID: non-overlapping = a real difference)."""
    return a[0] <= b[1] and b[0] <= a[1]
