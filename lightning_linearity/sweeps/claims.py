"""The papers' claims a sweep checks, each printed next to what was measured.

A claim in a sweep config names a metric column and one or more tests:

``slope: [low, high]``
    the fitted log-log exponent lies in [low, high] (e.g. [-0.7, -0.3] for Theta(1/sqrt(m))).
``decreasing: true``
    the per-width means decrease strictly as the width grows.
``at_least: v`` / ``at_most: v``
    every run (from ``min_width`` on, if given) has a value >= v / <= v.
``log_power: [low, high]``
    the power b of log m in the log-corrected fit log y = a + alpha log m + b log log m, with alpha fixed at
    the sweep's ``reference_slope``, lies in [low, high] (needs ``log_corrected: true``).

plus ``paper``: the claim in words, with its source.

``slope`` and ``log_power`` read the fits against the sweep's ``fit_against`` width; ``decreasing`` and
``min_width`` read the swept width m (the config's ``widths``), whatever ``fit_against`` says: per-width means
group the runs of one setting, whose minimum in-degree differs from seed to seed on random masks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_linearity._text import short_repr
from lightning_linearity.sweeps.fit import is_monotone_decreasing, width_means
from lightning_linearity.sweeps.report import (
    CorrectedFit,
    Fit,
    column_points,
    describe_corrected,
    describe_fit,
)

_FIELDS = ("column", "paper", "slope", "decreasing", "at_least", "at_most", "min_width", "log_power")


@dataclass(frozen=True)
class Claim:
    """One claim about a metric column (see the module docstring)."""

    column: str
    paper: str
    slope: tuple[float, float] | None = None
    decreasing: bool = False
    at_least: float | None = None
    at_most: float | None = None
    min_width: int | None = None
    log_power: tuple[float, float] | None = None

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], columns: Sequence[str]) -> Claim:
        """A claim from its config entry, checked against the sweep's metric ``columns``.

        Raises:
            ValueError: unknown keys, a column the sweep does not collect, no test, a bad slope range.
        """
        if not isinstance(raw, Mapping):
            raise ValueError(
                f"a claim must be a mapping with keys out of {list(_FIELDS)}, got {short_repr(raw)}"
            )
        unknown = sorted(set(raw) - set(_FIELDS))
        if unknown:
            raise ValueError(f"claim {dict(raw)}: unknown key(s) {unknown}; valid keys: {list(_FIELDS)}")
        column = raw.get("column")
        if column not in columns:
            raise ValueError(
                f"claim about {column!r}: the sweep does not collect it; its columns are {list(columns)}"
            )
        slope, log_power = (_range(raw, key, column) for key in ("slope", "log_power"))
        decreasing = raw.get("decreasing", False)
        if not isinstance(decreasing, bool):
            raise ValueError(
                f"claim about {column!r}: decreasing must be true or false, got {short_repr(decreasing)}"
            )
        for key in ("at_least", "at_most"):
            if raw.get(key) is not None and not _is_number(raw[key]):
                raise ValueError(f"claim about {column!r}: {key} must be a number, got {raw[key]!r}")
        min_width = raw.get("min_width")
        if min_width is not None and (isinstance(min_width, bool) or not isinstance(min_width, int)):
            raise ValueError(
                f"claim about {column!r}: min_width must be an integer, got {short_repr(min_width)}"
            )
        claim = cls(
            column=column,
            paper=str(raw.get("paper", "")),
            slope=slope,
            decreasing=decreasing,
            at_least=raw.get("at_least"),
            at_most=raw.get("at_most"),
            min_width=min_width,
            log_power=log_power,
        )
        tests = (claim.slope, claim.at_least, claim.at_most, claim.log_power)
        if not claim.decreasing and all(test is None for test in tests):
            raise ValueError(
                f"claim about {column!r} tests nothing: "
                f"give slope, decreasing, at_least, at_most or log_power"
            )
        return claim


def _range(raw: Mapping[str, Any], key: str, column: str) -> tuple[float, float] | None:
    """The range ``[low, high]`` of a claim's ``key`` (``None`` if absent)."""
    bounds = raw.get(key)
    if bounds is None:
        return None
    if (
        isinstance(bounds, str)
        or not isinstance(bounds, Sequence)
        or len(bounds) != 2
        or not all(_is_number(bound) for bound in bounds)
        or not bounds[0] <= bounds[1]
    ):
        raise ValueError(
            f"claim about {column!r}: {key} must be a range [low, high], got {short_repr(bounds)}"
        )
    return float(bounds[0]), float(bounds[1])


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class ClaimResult:
    """A checked claim: whether it held, and the measured numbers in words."""

    claim: Claim
    passed: bool
    measured: str

    def line(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return f"{verdict} `{self.claim.column}`: measured {self.measured}. Paper: {self.claim.paper}"


def check_claim(
    claim: Claim, rows: Sequence[Mapping[str, Any]], fit: Fit, corrected: CorrectedFit | None = None
) -> ClaimResult:
    """Test ``claim`` on the runs ``rows``, the column's fit and its log-corrected fits."""
    widths, values = column_points(rows, claim.column)
    checks, measured = [], []
    if claim.slope is not None:
        low, high = claim.slope
        ok = not isinstance(fit, str) and low <= fit.slope <= high
        checks.append(ok)
        measured.append(f"{describe_fit(fit)}, expected in [{low:g}, {high:g}]")
    if claim.decreasing:
        distinct, means, _ = width_means(widths, values)
        ok = len(distinct) >= 2 and is_monotone_decreasing(widths, values)
        checks.append(ok)
        trend = " > ".join(f"{v:.3g}" for v in means) if len(means) else "no values"
        measured.append(f"per-width means {trend} ({'decreasing' if ok else 'NOT decreasing'})")
        if not isinstance(fit, str) and claim.slope is None:
            measured.append(describe_fit(fit))
    if claim.log_power is not None:
        low, high = claim.log_power
        fixed = corrected[1] if isinstance(corrected, tuple) else None
        checks.append(fixed is not None and low <= fixed.log_power <= high)
        found = describe_corrected(fixed) if fixed is not None else str(corrected)
        measured.append(f"{found}, expected b in [{low:g}, {high:g}]")
    keep = widths >= (claim.min_width or 0)
    scope = f" for m >= {claim.min_width}" if claim.min_width else ""
    for bound, name, compare in (
        (claim.at_least, "min", lambda v, b: v >= b),
        (claim.at_most, "max", lambda v, b: v <= b),
    ):
        if bound is None:
            continue
        selected = values[keep]
        ok = len(selected) > 0 and bool(compare(selected, bound).all())
        checks.append(ok)
        extreme = (min if name == "min" else max)(selected, default=math.nan)
        sign = ">=" if name == "min" else "<="
        measured.append(f"{name} over runs{scope} {extreme:.6g}, expected {sign} {bound:g}")
    missing = len(rows) - len(values)
    if missing:
        measured.append(f"{missing} run(s) without a finite value")
    return ClaimResult(claim, all(checks) and not missing, "; ".join(measured))
