"""Log-log slope fits (lightning_linearity.sweeps.fit) against closed forms and scipy's regression."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from lightning_linearity.sweeps.fit import fit_loglog, is_monotone_decreasing, width_means

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
