"""Curves of a run's numbers against step: running max and mean, steps to reach a level, and
the ScaleRL sigmoid fit ``R(C) = R0 + (A - R0) / (1 + (C_mid / C) ** B)``."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from fst_jax.config import require


def running_max(values: Sequence[float]) -> list[float]:
    """The best value so far at each index (``[]`` for no values)."""
    return np.maximum.accumulate(np.asarray(values, np.float64)).tolist() if len(values) else []


def steps_to_reach(steps: Sequence[int], values: Sequence[float], target: float) -> int | None:
    """The first step whose running max reaches ``target`` (None if it never does)."""
    if len(steps) != len(values):
        raise ValueError(f"{len(steps)} steps but {len(values)} values")
    order = np.argsort(np.asarray(steps), kind="stable")
    for i in order:
        if values[i] >= target:
            return int(steps[i])
    return None


def steps_to_reference_peak(runs: Mapping[str, tuple[Sequence[int], Sequence[float]]],
                            reference: str = "rl") -> dict[str, int | None]:
    """For each run ``name -> (steps, values)``, the first step it reaches the peak of the
    ``reference`` run (the paper's "steps to RL's peak")."""
    if reference not in runs:
        raise KeyError(f"reference run {reference!r} not among {sorted(runs)}")
    peak = max(runs[reference][1])
    return {name: steps_to_reach(s, v, peak) for name, (s, v) in runs.items()}


def running_mean(values, window: int) -> np.ndarray:
    """Mean of the last ``window`` values at each index (fewer at the start)."""
    v = np.asarray(values, float)
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


@dataclasses.dataclass(frozen=True)
class SigmoidFit:
    """``R(C) = R0 + (A - R0) / (1 + (C_mid / C) ** B)``: asymptote ``A``, half-way step
    ``C_mid``, steepness ``B``; ``rmse`` of the fit over the ``points`` it used. ``at_bounds``
    names the parameters that ended on a bound of the search: the data do not determine them
    (``B`` at its top: the curve is a step between two evaluations; ``C_mid`` at its top, or ``A``
    at ``a_max``: the asymptote is an extrapolation far past the last step)."""

    A: float
    C_mid: float
    B: float
    R0: float
    rmse: float
    points: int
    at_bounds: tuple[str, ...] = ()

    def predict(self, steps: Any) -> np.ndarray:
        return sigmoid_curve(steps, self.A, self.C_mid, self.B, self.R0)


def sigmoid_curve(steps: Any, A: float, C_mid: float, B: float, R0: float) -> np.ndarray:
    """The ScaleRL curve at ``steps`` (``R0`` at step 0)."""
    C = np.asarray(steps, np.float64)
    with np.errstate(divide="ignore", over="ignore"):
        return R0 + (A - R0) / (1.0 + (C_mid / C) ** B)


def fit_sigmoid(steps: Sequence[float], values: Sequence[float], r0: float | None = None,
                a_max: float = 1.0, c_mid_range: tuple[float, float] | None = None,
                b_range: tuple[float, float] = (0.05, 20.0), grid: int = 200) -> SigmoidFit:
    """Least-squares fit of the ScaleRL form to ``values`` against ``steps`` (ScaleRL's
    recipe): a grid over ``A`` in ``(R0, a_max]`` and ``C_mid`` (log-spaced over
    ``c_mid_range``, default half the first positive step to 10x the last), ``B`` fitted
    (log grid over ``b_range``) for each pair; the best triple is then refined jointly with
    ``scipy.optimize.least_squares`` inside the same bounds. ``R0`` defaults to the value at the
    smallest step. Needs at least 4 points."""
    from scipy.optimize import least_squares

    C, y = np.asarray(steps, np.float64), np.asarray(values, np.float64)
    if C.shape != y.shape or C.ndim != 1 or len(C) < 4:
        raise ValueError(f"need >= 4 matching (step, value) points, got {C.shape} and {y.shape}")
    if not (np.all(np.isfinite(C)) and np.all(np.isfinite(y)) and np.all(C >= 0)):
        raise ValueError("steps must be finite and >= 0, values finite")
    R0 = float(y[np.argmin(C)]) if r0 is None else float(r0)
    require(a_max > R0, f"a_max={a_max} must exceed R0={R0}")
    positive = C[C > 0]
    if c_mid_range is None:
        require(len(positive) > 0, "need a positive step")
        c_mid_range = (positive.min() / 2, 10 * C.max())
    A_grid = np.linspace(R0, a_max, grid + 1)[1:]
    Cm_grid = np.geomspace(*c_mid_range, grid)
    B_grid = np.geomspace(*b_range, max(grid // 2, 8))
    with np.errstate(divide="ignore", over="ignore"):
        frac = 1.0 / (1.0 + (Cm_grid[:, None, None] / C) ** B_grid[None, :, None])  # [Cm, B, n]
    r = y - R0  # SSE(A) = sum r^2 - 2 (A - R0) sum r f + (A - R0)^2 sum f^2
    rf, ff = frac @ r, (frac ** 2).sum(-1)
    d = (A_grid - R0)[:, None, None]
    sse = (r @ r) - 2 * d * rf[None] + d ** 2 * ff[None]  # [A, Cm, B]
    ia, ic, ib = np.unravel_index(np.argmin(sse), sse.shape)

    def resid(p):
        return sigmoid_curve(C, p[0], np.exp(p[1]), np.exp(p[2]), R0) - y

    lo = [A_grid[0], np.log(c_mid_range[0]), np.log(b_range[0])]
    hi = [a_max, np.log(c_mid_range[1]), np.log(b_range[1])]
    x0 = np.clip([A_grid[ia], np.log(Cm_grid[ic]), np.log(B_grid[ib])], lo, hi)
    best = least_squares(resid, x0, bounds=(lo, hi)).x
    if np.sum(resid(best) ** 2) > np.sum(resid(x0) ** 2):
        best = x0
    rmse = float(np.sqrt(np.mean(resid(best) ** 2)))
    span = np.subtract(hi, lo)
    at_bounds = tuple(name for name, x, l, h, w in zip(("A", "C_mid", "B"), best, lo, hi, span)
                      if min(x - l, h - x) <= 1e-3 * w)
    return SigmoidFit(float(best[0]), float(np.exp(best[1])), float(np.exp(best[2])), R0, rmse,
                      len(C), at_bounds)
