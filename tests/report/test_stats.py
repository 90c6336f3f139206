"""The two-way paired bootstrap on hand-made data whose intervals are known."""

import numpy as np
import pytest

from fst_jax.config import ConfigError
from fst_jax.report.stats import bootstrap


def mean_of(x):
    """The statistic "mean over seeds and problems" of ``x [seeds, problems]``."""
    return lambda s, p: x[s[..., :, None], p[..., None, :]].mean((-2, -1))


def test_one_seed_interval_of_a_proportion_is_the_binomial_normal_interval():
    x = np.zeros((1, 400))
    x[0, :100] = 1.0  # 0.25 of 400 problems
    (iv,) = bootstrap(mean_of(x), 1, 400, resamples=9999)
    half = 1.96 * np.sqrt(0.25 * 0.75 / 400)  # the bootstrap variance of a mean is p(1-p)/n
    assert iv.estimate == 0.25
    assert iv.low == pytest.approx(0.25 - half, abs=0.006) and iv.high == pytest.approx(0.25 + half, abs=0.006)


def test_two_way_interval_adds_the_seed_and_problem_variances():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 0.1, 40), rng.normal(0, 0.2, 60)  # seed and problem effects, crossed
    x = 0.5 + a[:, None] + b[None, :]
    (iv,) = bootstrap(mean_of(x), 40, 60, resamples=9999)
    half = 1.96 * np.sqrt(a.var() / 40 + b.var() / 60)
    assert iv.estimate == pytest.approx(x.mean())
    assert (iv.high - iv.low) / 2 == pytest.approx(half, rel=0.1)
    (problems_only,) = bootstrap(mean_of(x[:1]), 1, 60, resamples=9999)
    assert problems_only.high - problems_only.low < iv.high - iv.low  # seeds add width


def test_constant_scores_give_a_zero_width_interval():
    x = np.full((3, 10), 0.5)
    (iv,) = bootstrap(mean_of(x), 3, 10, resamples=999)
    assert (iv.estimate, iv.low, iv.high) == (0.5, 0.5, 0.5)


def test_paired_difference_excludes_zero_where_the_unpaired_intervals_overlap():
    # Two modes over 3 seeds x 50 problems: problem difficulty dominates both, mode b is a
    # consistent 0.05 better (+-0.01): apart, their intervals overlap; paired, b - a > 0.
    rng = np.random.default_rng(1)
    difficulty = rng.uniform(0.0, 0.9, 50)
    a = np.clip(difficulty[None, :] + rng.normal(0, 0.02, (3, 50)), 0, 1)
    b = a + 0.05 + rng.uniform(-0.01, 0.01, (3, 50))

    def statistic(s, p):
        at = lambda x: x[s[..., :, None], p[..., None, :]].mean((-2, -1))  # noqa: E731
        return np.stack([at(a), at(b), at(b) - at(a)])

    ia, ib, diff = bootstrap(statistic, 3, 50, resamples=4999)
    assert ia.high > ib.low  # the unpaired intervals overlap
    assert diff.low > 0 and diff.excludes(0.0)
    assert diff.estimate == pytest.approx(ib.estimate - ia.estimate)
    assert diff.low < 0.05 < diff.high


def test_bootstrap_refuses_too_few_problems():
    with pytest.raises(ConfigError, match="problems"):
        bootstrap(mean_of(np.zeros((1, 1))), 1, 1)
