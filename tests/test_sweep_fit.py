"""Log-log slope fits (lightning_linearity.sweeps.fit) against closed forms and scipy's regression."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from lightning_linearity.sweeps.fit import fit_log_corrected, fit_loglog, is_monotone_decreasing, width_means

WIDTHS = np.array([8, 16, 32, 64, 128, 256], dtype=float)


@pytest.mark.parametrize("method", ["t", "bootstrap"])
@pytest.mark.parametrize("exponent", [-0.5, -1.0, 0.25])
def test_exact_power_law_gives_the_exact_exponent(method, exponent):
    widths = np.repeat(WIDTHS, 3)
    fit = fit_loglog(widths, 3.0 * widths**exponent, method=method)
    assert fit.slope == pytest.approx(exponent, abs=1e-12)
    assert math.exp(fit.intercept) == pytest.approx(3.0, rel=1e-12)
    assert fit.ci_low == pytest.approx(exponent, abs=1e-9)
    assert fit.ci_high == pytest.approx(exponent, abs=1e-9)
    assert fit.r_squared == pytest.approx(1.0)
    assert fit.predict(100.0) == pytest.approx(3.0 * 100.0**exponent, rel=1e-12)
    assert (fit.num_runs, fit.num_widths) == (18, 6)


def test_t_interval_matches_scipy_linregress():
    rng = np.random.default_rng(1)
    widths = np.repeat(WIDTHS, 4)
    values = 2.0 * widths**-0.5 * np.exp(0.2 * rng.standard_normal(widths.size))
    fit = fit_loglog(widths, values, confidence=0.9)
    reference = stats.linregress(np.log(widths), np.log(values))
    half = stats.t.ppf(0.95, widths.size - 2) * reference.stderr
    assert fit.slope == pytest.approx(reference.slope, rel=1e-10)
    assert fit.intercept == pytest.approx(reference.intercept, rel=1e-10)
    assert (fit.ci_low, fit.ci_high) == pytest.approx(
        (reference.slope - half, reference.slope + half), rel=1e-10
    )
    assert fit.r_squared == pytest.approx(reference.rvalue**2, rel=1e-10)


@pytest.mark.parametrize(
    ("method", "trials", "low", "high"), [("t", 400, 0.92, 0.98), ("bootstrap", 150, 0.84, 0.99)]
)
def test_noisy_power_law_interval_covers_the_true_exponent(method, trials, low, high):
    """Log-normal noise around m^-1/2, 3 seeds x 6 widths: the 95% interval covers -1/2 ~95% of the time."""
    rng = np.random.default_rng(0)
    widths = np.repeat(WIDTHS, 3)
    covered = 0
    for trial in range(trials):
        values = widths**-0.5 * np.exp(0.15 * rng.standard_normal(widths.size))
        fit = fit_loglog(widths, values, method=method, num_bootstrap=400, seed=trial)
        assert fit.ci_low < fit.slope < fit.ci_high
        covered += fit.contains(-0.5)
    assert low <= covered / trials <= high


def test_bootstrap_is_reproducible_from_its_seed():
    rng = np.random.default_rng(3)
    widths = np.repeat(WIDTHS, 2)
    values = widths**-0.5 * np.exp(0.3 * rng.standard_normal(widths.size))
    first = fit_loglog(widths, values, method="bootstrap", seed=7)
    assert fit_loglog(widths, values, method="bootstrap", seed=7) == first
    assert fit_loglog(widths, values, method="bootstrap", seed=8) != first


def test_bootstrap_with_one_run_per_width_still_has_an_interval():
    values = WIDTHS**-0.5 * np.array([1.1, 0.9, 1.05, 0.97, 1.02, 0.95])
    fit = fit_loglog(WIDTHS, values, method="bootstrap")
    assert fit.ci_low < fit.slope < fit.ci_high


@pytest.mark.parametrize(
    ("widths", "values", "match"),
    [
        ([8, 16, 32], [1.0, 0.0, 0.5], "positive finite values"),
        ([8, 16, 32], [1.0, -1.0, 0.5], "positive finite values"),
        ([8, 16, 32], [1.0, math.nan, 0.5], "positive finite values"),
        ([8, 0, 32], [1.0, 1.0, 0.5], "positive finite widths"),
        ([8, 8, 16, 16], [1.0, 0.9, 0.7, 0.6], "at least 3 distinct widths"),
        ([8, 16, 32], [1.0, 0.5], "equal length"),
    ],
)
def test_bad_input_is_refused(widths, values, match):
    with pytest.raises(ValueError, match=match):
        fit_loglog(widths, values)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="confidence"):
        fit_loglog(WIDTHS, WIDTHS**-0.5, confidence=1.5)
    with pytest.raises(ValueError, match="method"):
        fit_loglog(WIDTHS, WIDTHS**-0.5, method="jackknife")


def test_width_means_and_monotone_trend():
    widths = [8, 8, 16, 16, 32]
    values = [1.0, 3.0, 1.0, 2.0, 0.5]
    distinct, means, stds = width_means(widths, values)
    assert distinct.tolist() == [8, 16, 32]
    assert means.tolist() == [2.0, 1.5, 0.5]
    assert stds == pytest.approx([math.sqrt(2.0), math.sqrt(0.5), 0.0])
    assert is_monotone_decreasing(widths, values)
    assert not is_monotone_decreasing(widths, [1.0, 1.0, 3.0, 3.0, 0.5])


# ------------------------------------------------------------------------- log-corrected fit
def _design(widths):
    u = np.log(widths)
    return np.stack([np.ones_like(u), u, np.log(u)], axis=1)


@pytest.mark.parametrize(("exponent", "power"), [(-0.5, 1.0), (-0.5, 0.5), (-1.0, 0.0), (0.25, -2.0)])
def test_log_corrected_fit_of_an_exact_law_is_exact(exponent, power):
    widths = np.repeat(WIDTHS, 2)
    values = 3.0 * widths**exponent * np.log(widths) ** power
    free = fit_log_corrected(widths, values)
    assert (free.slope, free.log_power, math.exp(free.intercept)) == pytest.approx(
        (exponent, power, 3.0), abs=1e-9
    )
    assert (free.slope_low, free.slope_high) == pytest.approx((exponent, exponent), abs=1e-7)
    assert (free.log_power_low, free.log_power_high) == pytest.approx((power, power), abs=1e-7)
    fixed = fit_log_corrected(widths, values, slope=exponent)
    assert fixed.slope_fixed and fixed.slope == fixed.slope_low == fixed.slope_high == exponent
    assert fixed.log_power == pytest.approx(power, abs=1e-10)
    assert fixed.predict(100.0) == pytest.approx(3.0 * 100.0**exponent * math.log(100.0) ** power)
    assert (fixed.num_runs, fixed.num_widths) == (12, 6)


def test_log_corrected_fit_matches_lstsq_and_the_normal_equations():
    """Coefficients from numpy's lstsq; intervals from s^2 (X^T X)^-1 formed explicitly (t, n - 3 dof)."""
    rng = np.random.default_rng(2)
    widths = np.repeat(WIDTHS, 5)
    values = widths**-0.5 * np.log(widths) * np.exp(0.1 * rng.standard_normal(widths.size))
    fit = fit_log_corrected(widths, values, confidence=0.9)
    design, response = _design(widths), np.log(values)
    coef = np.linalg.lstsq(design, response, rcond=None)[0]
    residuals = response - design @ coef
    n = widths.size
    covariance = residuals @ residuals / (n - 3) * np.linalg.inv(design.T @ design)
    half = stats.t.ppf(0.95, n - 3) * np.sqrt(np.diag(covariance))
    assert (fit.intercept, fit.slope, fit.log_power) == pytest.approx(tuple(coef), rel=1e-9)
    assert (fit.slope_low, fit.slope_high) == pytest.approx((coef[1] - half[1], coef[1] + half[1]), rel=1e-8)
    assert (fit.log_power_low, fit.log_power_high) == pytest.approx(
        (coef[2] - half[2], coef[2] + half[2]), rel=1e-8
    )


def test_log_corrected_fit_with_fixed_slope_matches_scipy_linregress():
    """With alpha fixed, b is the slope of log y - alpha log m against log log m."""
    rng = np.random.default_rng(3)
    widths = np.repeat(WIDTHS, 4)
    values = widths**-0.5 * np.log(widths) ** 0.7 * np.exp(0.1 * rng.standard_normal(widths.size))
    fit = fit_log_corrected(widths, values, slope=-0.5)
    reference = stats.linregress(np.log(np.log(widths)), np.log(values) + 0.5 * np.log(widths))
    half = stats.t.ppf(0.975, widths.size - 2) * reference.stderr
    assert fit.log_power == pytest.approx(reference.slope, rel=1e-9)
    assert fit.intercept == pytest.approx(reference.intercept, rel=1e-9)
    assert (fit.log_power_low, fit.log_power_high) == pytest.approx(
        (reference.slope - half, reference.slope + half), rel=1e-8
    )


@pytest.mark.parametrize(
    ("widths", "values", "kwargs", "match"),
    [
        ([1, 4, 8], [1.0, 1.0, 1.0], {}, "widths above 1"),
        ([2, 4, 8], [1.0, 0.0, 1.0], {}, "positive finite values"),
        ([2, 4, 4], [1.0, 2.0, 1.0], {}, "at least 3 distinct widths"),
        ([2, 4], [1.0, 2.0, 1.0], {}, "equal length"),
        ([2, 4, 8], [1.0, 2.0, 1.0], {"slope": math.nan}, "slope must be a finite number"),
        ([2, 4, 8], [1.0, 2.0, 1.0], {"confidence": 1.0}, "confidence must be in"),
    ],
)
def test_log_corrected_fit_refuses_bad_input(widths, values, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_log_corrected(widths, values, **kwargs)
