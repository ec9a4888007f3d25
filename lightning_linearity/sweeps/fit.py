"""Log-log slope fits of a metric against the width, with confidence intervals.

A width sweep measures a metric ``y`` for runs at widths ``m`` (several seeds per width). The papers predict
power laws ``y ~ C m^alpha`` (alpha = -1/2 for the Hessian norm and the relative kernel change, 004
Theorem 3.6 and Figure 2), i.e. a straight line on log-log axes. The fit is ordinary least squares over
all runs (every seed is one point, not the per-width mean):

    log y_i = a + alpha log m_i + e_i,
    alpha_hat = sum_i (u_i - u_bar)(v_i - v_bar) / sum_i (u_i - u_bar)^2,   u = log m, v = log y.

Two confidence intervals for alpha:

* ``"t"``: the regression t-interval alpha_hat +/- t_{1-(1-c)/2, n-2} * se, with
  se^2 = (sum_i r_i^2 / (n - 2)) / sum_i (u_i - u_bar)^2 and r the residuals (exact under i.i.d.
  Gaussian errors in log space).
* ``"bootstrap"``: the percentile interval of alpha_hat over ``num_bootstrap`` resamples of the runs
  (with replacement, from a seeded ``numpy.random.Generator``); resamples with fewer than two distinct
  widths have no slope and are drawn again.

**Log-corrected fit** (:func:`fit_log_corrected`). 004 Theorem 3.6 bounds the Hessian norm by O~(1/sqrt(m)),
the tilde hiding powers of log m; a maximum over m neurons, for example, grows like a power of log m. The
fit adds that factor, y ~ C m^alpha (log m)^b:

    log y_i = a + alpha log m_i + b log log m_i + e_i,

by least squares (QR of the design matrix X = [1, log m, log log m]), with t-intervals from the
covariance s^2 (X^T X)^{-1}, s^2 = sum_i r_i^2 / (n - p), on n - p degrees of freedom (p = 3). With alpha
fixed (e.g. at -1/2) it fits a and b alone on log y_i - alpha log m_i (p = 2). Over a few octaves of m,
log m and log log m are nearly collinear: the free fit's intervals are wide, the fixed one's narrow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats

from lightning_linearity._text import short_repr

CIMethod = Literal["t", "bootstrap"]
CI_METHODS: tuple[str, ...] = ("t", "bootstrap")
#: The fewest distinct widths a slope is fitted on.
MIN_WIDTHS = 3


@dataclass(frozen=True)
class SlopeFit:
    """Least-squares fit of log(value) = intercept + slope * log(width).

    Attributes:
        slope: the exponent alpha_hat.
        intercept: a_hat (natural log), so the fitted line is ``exp(intercept) * width**slope``.
        ci_low, ci_high: the confidence interval of the slope.
        confidence: its level, e.g. 0.95.
        method: ``"t"`` or ``"bootstrap"``.
        num_runs: points in the fit.
        num_widths: distinct widths among them.
        r_squared: coefficient of determination of the fit in log space.
    """

    slope: float
    intercept: float
    ci_low: float
    ci_high: float
    confidence: float
    method: str
    num_runs: int
    num_widths: int
    r_squared: float

    def predict(self, width: np.ndarray | float) -> np.ndarray:
        """The fitted power law exp(intercept) * width^slope."""
        return np.exp(self.intercept) * np.asarray(width, dtype=float) ** self.slope

    def contains(self, slope: float) -> bool:
        """Whether ``slope`` lies in the confidence interval."""
        return self.ci_low <= slope <= self.ci_high


def _least_squares(u: np.ndarray, v: np.ndarray) -> tuple[float, float]:
    """The least-squares line of v on u. Not ``scipy.stats.linregress``, whose slope error goes through
    1 - r^2 and loses ~8 digits on an exact power law (the interval of ``-0.5`` came out 8e-9 wide); the
    residuals below keep it exact. A test checks both against each other on noisy data."""
    du = u - u.mean()
    slope = float(du @ (v - v.mean()) / (du @ du))
    return slope, float(v.mean() - slope * u.mean())


def fit_loglog(
    widths: Sequence[float],
    values: Sequence[float],
    *,
    confidence: float = 0.95,
    method: CIMethod = "t",
    num_bootstrap: int = 2000,
    seed: int = 0,
) -> SlopeFit:
    """Fit ``values ~ C * widths**slope`` by least squares in log-log space (module docstring).

    Args:
        widths: width of each run (positive).
        values: the metric of each run (positive and finite; drop diverged runs before fitting).
        confidence: level of the interval, in (0, 1).
        method: ``"t"`` (regression t-interval) or ``"bootstrap"`` (percentile, resampling runs).
        num_bootstrap: resamples for ``"bootstrap"``.
        seed: seed of the bootstrap's ``numpy.random.Generator``.

    Raises:
        ValueError: mismatched lengths, non-positive or non-finite entries, fewer than
            :data:`MIN_WIDTHS` distinct widths, or a bad option.
    """
    m = np.asarray(widths, dtype=float)
    y = np.asarray(values, dtype=float)
    if m.ndim != 1 or m.shape != y.shape:
        raise ValueError(f"widths and values must be 1-d of equal length, got shapes {m.shape} and {y.shape}")
    for name, array in (("widths", m), ("values", y)):
        bad = ~np.isfinite(array) | (array <= 0)
        if bad.any():
            raise ValueError(
                f"a log-log fit needs positive finite {name}; got {array[bad][:3].tolist()} "
                f"(at widths {m[bad][:3].tolist()})"
            )
    num_widths = len(np.unique(m))
    if num_widths < MIN_WIDTHS:
        raise ValueError(f"a slope fit needs at least {MIN_WIDTHS} distinct widths, got {num_widths}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {short_repr(confidence)}")
    if method not in CI_METHODS:
        raise ValueError(f"method must be one of {list(CI_METHODS)}, got {short_repr(method)}")

    u, v = np.log(m), np.log(y)
    slope, intercept = _least_squares(u, v)
    residuals = v - (intercept + slope * u)
    total = float(((v - v.mean()) ** 2).sum())
    r_squared = 1.0 - float(residuals @ residuals) / total if total > 0 else 1.0
    alpha = 1.0 - confidence
    if method == "t":
        n = len(u)
        du2 = float(((u - u.mean()) ** 2).sum())
        se = float(np.sqrt(residuals @ residuals / (n - 2) / du2)) if n > 2 else float("inf")
        half = float(stats.t.ppf(1.0 - alpha / 2.0, n - 2)) * se if n > 2 else float("inf")
        low, high = slope - half, slope + half
    else:
        if num_bootstrap < 1:
            raise ValueError(f"num_bootstrap must be a positive integer, got {short_repr(num_bootstrap)}")
        low, high = _bootstrap_interval(u, v, alpha, num_bootstrap, np.random.default_rng(seed))
    return SlopeFit(slope, intercept, low, high, confidence, method, len(u), num_widths, r_squared)


def _bootstrap_interval(
    u: np.ndarray, v: np.ndarray, alpha: float, num_bootstrap: int, rng: np.random.Generator
) -> tuple[float, float]:
    """Percentile interval of the least-squares slope over resamples of the runs.

    Not ``scipy.stats.bootstrap``: a resample with one distinct width has no slope, and with a few runs per
    width that is common (1 in 9 resamples of 3 widths x 1 seed); here such resamples are drawn again,
    vectorised, rather than yielding NaN bounds.
    """
    slopes = np.empty(num_bootstrap)
    filled = 0
    while filled < num_bootstrap:
        index = rng.integers(0, len(u), size=(num_bootstrap - filled, len(u)))
        uu, vv = u[index], v[index]
        keep = np.ptp(uu, axis=1) > 0  # at least two distinct widths
        uu, vv = uu[keep], vv[keep]
        du = uu - uu.mean(axis=1, keepdims=True)
        batch = (du * (vv - vv.mean(axis=1, keepdims=True))).sum(axis=1) / (du * du).sum(axis=1)
        slopes[filled : filled + len(batch)] = batch
        filled += len(batch)
    low, high = np.quantile(slopes, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def width_means(
    widths: Sequence[float], values: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted distinct widths with the mean and (sample, ddof=1; 0 for one run) std of the values at each."""
    m = np.asarray(widths, dtype=float)
    y = np.asarray(values, dtype=float)
    distinct = np.unique(m)
    means = np.array([y[m == w].mean() for w in distinct])
    stds = np.array([y[m == w].std(ddof=1) if (m == w).sum() > 1 else 0.0 for w in distinct])
    return distinct, means, stds


def is_monotone_decreasing(widths: Sequence[float], values: Sequence[float]) -> bool:
    """Whether the per-width means strictly decrease as the width grows."""
    _, means, _ = width_means(widths, values)
    return bool(np.all(np.diff(means) < 0))


@dataclass(frozen=True)
class LogCorrectedFit:
    """Least-squares fit of log(value) = intercept + slope * log(width) + log_power * log(log(width)).

    Attributes:
        slope: alpha, fitted or (``slope_fixed``) given.
        slope_low, slope_high: its confidence interval (both equal to ``slope`` when it was given).
        log_power: b, the power of log(width).
        log_power_low, log_power_high: its confidence interval.
        intercept: a (natural log).
        slope_fixed: whether alpha was given rather than fitted.
        confidence: the level of the intervals.
        num_runs: points in the fit.
        num_widths: distinct widths among them.
    """

    slope: float
    slope_low: float
    slope_high: float
    log_power: float
    log_power_low: float
    log_power_high: float
    intercept: float
    slope_fixed: bool
    confidence: float
    num_runs: int
    num_widths: int

    def predict(self, width: np.ndarray | float) -> np.ndarray:
        """The fitted law exp(intercept) * width^slope * log(width)^log_power."""
        m = np.asarray(width, dtype=float)
        return np.exp(self.intercept) * m**self.slope * np.log(m) ** self.log_power


def fit_log_corrected(
    widths: Sequence[float],
    values: Sequence[float],
    *,
    slope: float | None = None,
    confidence: float = 0.95,
) -> LogCorrectedFit:
    """Fit ``values ~ C * widths**alpha * log(widths)**b`` by least squares (module docstring), with
    alpha free (``slope=None``) or fixed at ``slope``; t-intervals for the fitted coefficients.

    Args:
        widths: width of each run (above 1, so that log log m is defined).
        values: the metric of each run (positive and finite).
        slope: alpha fixed at this value, or ``None`` to fit it.
        confidence: level of the intervals, in (0, 1).

    Raises:
        ValueError: mismatched lengths, widths <= 1, non-positive or non-finite values, fewer than
            :data:`MIN_WIDTHS` distinct widths, a non-finite ``slope`` or a bad confidence.
    """
    m = np.asarray(widths, dtype=float)
    y = np.asarray(values, dtype=float)
    if m.ndim != 1 or m.shape != y.shape:
        raise ValueError(f"widths and values must be 1-d of equal length, got shapes {m.shape} and {y.shape}")
    if not (np.isfinite(m) & (m > 1)).all():
        raise ValueError(f"a log-corrected fit needs finite widths above 1 (log log m), got {m[:5].tolist()}")
    if not (np.isfinite(y) & (y > 0)).all():
        raise ValueError(f"a log-corrected fit needs positive finite values, got {y[:5].tolist()}")
    num_widths = len(np.unique(m))
    if num_widths < MIN_WIDTHS:
        raise ValueError(f"a log-corrected fit needs at least {MIN_WIDTHS} distinct widths, got {num_widths}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {short_repr(confidence)}")
    if slope is not None and (isinstance(slope, bool) or not np.isfinite(slope)):
        raise ValueError(f"slope must be a finite number or None (fitted), got {short_repr(slope)}")

    u, v = np.log(m), np.log(y)
    columns = [np.ones_like(u), np.log(u)] if slope is not None else [np.ones_like(u), u, np.log(u)]
    design = np.stack(columns, axis=1)
    response = v - slope * u if slope is not None else v
    q, r = np.linalg.qr(design)
    coef = np.linalg.solve(r, q.T @ response)
    n, p = design.shape
    residuals = response - design @ coef
    if n > p:
        r_inv = np.linalg.inv(r)
        variance = float(residuals @ residuals) / (n - p) * (r_inv * r_inv).sum(axis=1)  # diag (X^T X)^-1 s^2
        half = float(stats.t.ppf(0.5 + confidence / 2.0, n - p)) * np.sqrt(variance)
    else:
        half = np.full(p, np.inf)
    if slope is None:
        alpha, alpha_low, alpha_high = float(coef[1]), float(coef[1] - half[1]), float(coef[1] + half[1])
    else:
        alpha = alpha_low = alpha_high = float(slope)
    b, b_half = float(coef[-1]), float(half[-1])
    return LogCorrectedFit(
        alpha,
        alpha_low,
        alpha_high,
        b,
        b - b_half,
        b + b_half,
        float(coef[0]),
        slope is not None,
        confidence,
        n,
        num_widths,
    )
