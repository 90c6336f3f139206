"""Intervals for quantities measured on problems x seeds.

A comparison evaluates every mode at every seed on the same validation problems, so its data
are crossed: seeds x problems (x evaluations x samples). ``bootstrap`` resamples both factors
independently with replacement, seeds and problems alike (the two-way, "pigeonhole" bootstrap
of crossed designs; Owen 2007, Ann. Appl. Stat. 1(2)); with one seed, problems alone. Every mode
is read at the same resampled indices, so a difference between modes is paired: the problem
(and seed) effects they share cancel in each resample.

The resampling is ``scipy.stats.bootstrap``'s: the data it resamples are the seed and problem
*indices*, as two independent samples (``paired=False``), and the statistic reads the modes'
arrays at them; ``method="percentile"``. Percentile rather than BCa: BCa's acceleration is a
jackknife over the resampled units, rough over a handful of seeds, and BCa is undefined (NaN)
when the bootstrap distribution is degenerate, which 0/1 scores on few problems often make it
(two modes equal on every problem); the percentile interval is defined in every case. With few
seeds every interval is optimistic: 3 seeds give 10 distinct seed multisets and the bootstrap
variance of a seed mean is (S - 1)/S of the plug-in one.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from fst_jax.config import require

METHOD = ("percentile bootstrap (scipy.stats.bootstrap), seeds and problems resampled "
          "independently with replacement, the same indices for every mode (paired)")


@dataclasses.dataclass(frozen=True)
class Interval:
    """A quantity's point estimate (on all seeds and problems) and its ``confidence`` interval."""

    estimate: float
    low: float
    high: float

    def excludes(self, value: float) -> bool:
        return not (self.low <= value <= self.high)


def bootstrap(statistic: Callable[[np.ndarray, np.ndarray], np.ndarray], seeds: int, problems: int,
              *, confidence: float = 0.95, resamples: int = 4999, rng_seed: int = 0,
              batch: int = 500) -> list[Interval]:
    """Intervals of the ``Q`` quantities ``statistic(seed_idx, problem_idx)`` computes from the
    data at resampled indices: ``seed_idx [..., seeds]`` and ``problem_idx [..., problems]``
    (leading batch axes, the same for both) -> ``[Q, ...]``. The estimate is the statistic at
    the identity indices. A quantity must be finite in every resample (encode "never" as a
    finite censoring value)."""
    from scipy.stats import bootstrap as scipy_bootstrap

    require(seeds >= 1 and problems >= 2, f"need >= 1 seed and >= 2 problems, got {seeds}, {problems}")
    require(0 < confidence < 1, "confidence must be in (0, 1)")
    s_idx, p_idx = np.arange(seeds), np.arange(problems)
    estimate = np.atleast_1d(np.asarray(statistic(s_idx, p_idx), np.float64))
    if seeds == 1:  # the one seed is always drawn: resample problems alone
        data, fn = (p_idx,), lambda p, axis=-1: statistic(np.zeros(p.shape[:-1] + (1,), int), p)
    else:
        data, fn = (s_idx, p_idx), lambda s, p, axis=-1: statistic(s, p)
    res = scipy_bootstrap(data, fn, n_resamples=resamples, vectorized=True, paired=False,
                          confidence_level=confidence, method="percentile", batch=batch,
                          rng=np.random.default_rng(rng_seed))
    low, high = (np.atleast_1d(np.asarray(b, np.float64)) for b in res.confidence_interval)
    return [Interval(float(e), float(lo), float(hi)) for e, lo, hi in zip(estimate, low, high)]
