"""Curves against step: running max and mean, steps to reach a level, the ScaleRL sigmoid fit."""

import numpy as np
import pytest

from fst_jax.report.curves import (fit_sigmoid, running_max, running_mean, sigmoid_curve, steps_to_reach,
                                   steps_to_reference_peak)


def test_running_max_and_steps_to_reach_use_the_best_value_so_far():
    values = [0.1, 0.3, 0.2, 0.5, 0.4]
    assert running_max(values) == [0.1, 0.3, 0.3, 0.5, 0.5]
    assert running_max([]) == []
    steps = [0, 10, 20, 30, 40]
    assert steps_to_reach(steps, values, 0.3) == 10
    assert steps_to_reach(steps, values, 0.45) == 30
    assert steps_to_reach(steps, values, 0.6) is None
    assert steps_to_reach([30, 0, 10], [0.5, 0.1, 0.5], 0.5) == 10  # unordered steps
    runs = {"rl": ([0, 10, 20], [0.1, 0.4, 0.3]), "fst": ([0, 10, 20], [0.2, 0.5, 0.6]),
            "gepa": ([0, 10, 20], [0.1, 0.2, 0.2])}
    assert steps_to_reference_peak(runs) == {"rl": 10, "fst": 10, "gepa": None}


def test_running_mean_averages_the_last_window_values_and_fewer_at_the_start():
    np.testing.assert_allclose(running_mean([1.0, 3.0, 5.0, 7.0], 2), [1.0, 2.0, 4.0, 6.0])


@pytest.mark.parametrize("A, C_mid, B, R0", [(0.47, 300.0, 1.5, 0.1), (0.25, 80.0, 3.0, 0.02)])
def test_sigmoid_fit_recovers_known_parameters(A, C_mid, B, R0):
    steps = np.arange(0, 1001, 10)
    clean = sigmoid_curve(steps, A, C_mid, B, R0)
    fit = fit_sigmoid(steps, clean)
    assert fit.R0 == pytest.approx(R0)
    assert (fit.A, fit.C_mid, fit.B) == pytest.approx((A, C_mid, B), rel=1e-3)
    assert fit.at_bounds == ()
    noisy = clean + np.random.default_rng(0).normal(0, 0.01, steps.shape)
    fit = fit_sigmoid(steps, noisy, r0=R0)
    assert fit.A == pytest.approx(A, abs=0.02)
    assert fit.C_mid == pytest.approx(C_mid, rel=0.15)
    assert fit.B == pytest.approx(B, rel=0.25)
    assert fit.rmse == pytest.approx(0.01, rel=0.3)


def test_sigmoid_fit_names_the_parameters_the_data_leave_on_a_bound():
    step = fit_sigmoid([0, 4, 8, 12], [0.2, 0.2, 0.5, 0.5])  # a jump between two evaluations
    assert "B" in step.at_bounds and step.A == pytest.approx(0.5, abs=1e-3)
    rising = fit_sigmoid([0, 4, 8, 12], [0.1, 0.2, 0.3, 0.4])  # no bend yet: asymptote unknown
    assert {"A", "C_mid"} & set(rising.at_bounds)


def test_sigmoid_fit_rejects_too_few_or_bad_points():
    with pytest.raises(ValueError, match=">= 4"):
        fit_sigmoid([0, 1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="finite"):
        fit_sigmoid([0, 1, 2, 3], [0.1, np.nan, 0.3, 0.4])
