"""Uncertainty and significance helpers: CIs that cover, tests that detect and do not over-detect."""

import numpy as np
import pytest

from diffprune.metrics.stats import intervals_overlap, kid, mean_ci, paired_test


def test_mean_ci_covers_the_true_mean_at_about_95_percent():
    rng = np.random.default_rng(0)
    cover = 0
    for _ in range(400):
        e = mean_ci(rng.normal(3.0, 2.0, 30))
        cover += e.lo <= 3.0 <= e.hi
    assert 0.92 <= cover / 400 <= 0.98


def test_mean_ci_of_one_value_is_a_point_and_empty_is_refused():
    e = mean_ci([2.5])
    assert (e.mean, e.lo, e.hi, e.n) == (2.5, 2.5, 2.5, 1)
    with pytest.raises(ValueError, match="non-empty"):
        mean_ci([])


def test_paired_test_detects_a_consistent_shift_and_not_noise():
    rng = np.random.default_rng(1)
    base = rng.normal(30, 5, 200)  # per-image PSNR: large spread between images
    shifted = base + 0.3 + rng.normal(0, 0.2, 200)  # a small but consistent gain on every image
    t = paired_test(shifted, base)
    assert t.significant and t.verdict() == "better" and t.ci_lo > 0
    same = paired_test(base + rng.normal(0, 0.2, 200), base)
    assert not same.significant and same.verdict() == "no significant difference"
    assert paired_test(base, base).p_value == 1.0
    with pytest.raises(ValueError, match="equal length"):
        paired_test([1.0, 2.0], [1.0])


def test_kid_is_near_zero_for_one_distribution_and_larger_for_another_with_a_standard_error():
    rng = np.random.default_rng(2)
    a, b, c = rng.normal(0, 1, (400, 16)), rng.normal(0, 1, (400, 16)), rng.normal(0.5, 1, (400, 16))
    same, same_se = kid(a, b, subsets=20, subset_size=200)
    diff, diff_se = kid(a, c, subsets=20, subset_size=200)
    assert abs(same) < 0.02 * diff  # unbiased: near zero for one distribution
    assert diff > same + 3 * diff_se and diff_se > 0
    assert kid(a, c, subsets=20, subset_size=200) == (diff, diff_se)  # seeded
    state = np.random.get_state()[1].copy()
    kid(a, c, subsets=2, subset_size=50)
    assert (np.random.get_state()[1] == state).all()  # the global RNG is left as it was


def test_intervals_overlap():
    assert intervals_overlap((0, 1), (0.5, 2)) and not intervals_overlap((0, 1), (1.5, 2))
