"""What a sweep reports: fitted exponents per metric column, a markdown table, log-log PNG plots.

Every figure is built on matplotlib's object API with an Agg canvas (pyplot's global state and backend
are never touched).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lightning_linearity.sweeps.collect import QUANTITIES
from lightning_linearity.sweeps.config import SweepConfig
from lightning_linearity.sweeps.fit import (
    MIN_WIDTHS,
    LogCorrectedFit,
    SlopeFit,
    fit_log_corrected,
    fit_loglog,
    width_means,
)

#: A fitted column, or the reason it was not fitted.
Fit = SlopeFit | str
#: A column's log-corrected fits, (alpha free, alpha fixed at the reference slope), or why there are none.
CorrectedFit = tuple[LogCorrectedFit, LogCorrectedFit] | str
X_LABELS = {"width": "width m", "min_in_degree": "width m = min in-degree (004 Def. 2.7)"}


def column_points(
    rows: Sequence[Mapping[str, Any]], column: str, x: str = "width"
) -> tuple[np.ndarray, np.ndarray]:
    """(widths, values) of the runs with a finite value in ``column``; the widths from column ``x``."""
    pairs = [(row[x], row.get(column, math.nan)) for row in rows]
    pairs = [(m, v) for m, v in pairs if isinstance(v, int | float) and math.isfinite(v)]
    return np.array([m for m, _ in pairs], dtype=float), np.array([v for _, v in pairs], dtype=float)


def fit_column(rows: Sequence[Mapping[str, Any]], column: str, config: SweepConfig) -> Fit:
    """The log-log fit of ``column`` against ``config.fit_against`` over the runs with finite values, or why
    there is none."""
    widths, values = column_points(rows, column, config.fit_against)
    dropped = len(rows) - len(values)
    note = f" ({dropped} run(s) without a finite value)" if dropped else ""
    if (values <= 0).any():
        return f"not fitted: {int((values <= 0).sum())} run(s) have values <= 0, no logarithm{note}"
    if len(np.unique(widths)) < MIN_WIDTHS:
        return f"not fitted: fewer than {MIN_WIDTHS} widths with finite values{note}"
    return fit_loglog(widths, values, confidence=config.confidence, method=config.ci)


def fit_column_corrected(rows: Sequence[Mapping[str, Any]], column: str, config: SweepConfig) -> CorrectedFit:
    """The log-corrected fits of ``column`` (alpha free; alpha fixed at ``config.reference_slope``) against
    ``config.fit_against``, or why there are none."""
    widths, values = column_points(rows, column, config.fit_against)
    if (values <= 0).any() or (widths <= 1).any() or len(np.unique(widths)) < MIN_WIDTHS:
        return f"not fitted: needs positive values, widths above 1 and at least {MIN_WIDTHS} widths"
    free = fit_log_corrected(widths, values, confidence=config.confidence)
    fixed = fit_log_corrected(widths, values, slope=config.reference_slope, confidence=config.confidence)
    return free, fixed


def describe_corrected(fixed: LogCorrectedFit) -> str:
    """``b = 0.93 (95% CI [0.71, 1.15]) at alpha = -0.5``."""
    return (
        f"b = {fixed.log_power:.3f} ({fixed.confidence:.0%} CI [{fixed.log_power_low:.3f}, "
        f"{fixed.log_power_high:.3f}]) at alpha = {fixed.slope:g}"
    )


def slug(text: str) -> str:
    """A file-name-safe form of a name: ``grad_cosine/layer_2:last`` -> ``grad_cosine_layer_2_last``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def describe_fit(fit: Fit) -> str:
    """``slope -0.512 (95% CI [-0.601, -0.423])`` or the reason for no fit."""
    if isinstance(fit, str):
        return fit
    return f"slope {fit.slope:.3f} ({fit.confidence:.0%} CI [{fit.ci_low:.3f}, {fit.ci_high:.3f}])"


def write_plot(
    path: Path, config: SweepConfig, column: str, rows: Sequence[Mapping[str, Any]], fit: SlopeFit
) -> None:
    """Runs, per-width means, the fitted power law and the reference m^{reference_slope}, on log-log axes.

    The reference line goes through the fitted line at the geometric mean of the widths, so the two
    slopes can be compared by eye.
    """
    widths, values = column_points(rows, column, config.fit_against)
    distinct, means, stds = width_means(widths, values)
    figure = Figure(figsize=(5.5, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.scatter(widths, values, s=12, alpha=0.45, color="tab:blue", label="runs")
    ax.errorbar(
        distinct, means, yerr=stds, fmt="o", color="tab:blue", capsize=3, label="mean ± std over seeds"
    )
    grid = np.geomspace(distinct.min(), distinct.max(), 100)
    ax.plot(grid, fit.predict(grid), color="tab:red", label=f"fit: {describe_fit(fit)}")
    if config.reference_slope is not None:
        center = float(np.exp(np.log(distinct).mean()))
        reference = fit.predict(center) * (grid / center) ** config.reference_slope
        ax.plot(grid, reference, "--", color="gray", label=f"reference m^{config.reference_slope:g}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(X_LABELS[config.fit_against])
    ax.set_ylabel(column)
    ax.set_title(f"{config.name}: {config.model}", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)


def write_curves(
    path: Path,
    config: SweepConfig,
    name: str,
    rows: Sequence[Mapping[str, Any]],
    histories: Mapping[str, Sequence[Mapping[str, float]]],
) -> None:
    """One quantity against the training step, one line per width (its first seed's run); a log y-axis
    when the positive values span more than a decade."""
    figure = Figure(figsize=(5.5, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    colours = matplotlib.colormaps["viridis"]
    widths, drawn = sorted(config.widths), []
    for index, width in enumerate(widths):
        run = next((row for row in rows if row["width"] == width and row["run_id"] in histories), None)
        if run is None:
            continue
        points = QUANTITIES[name].series(histories[run["run_id"]], "")
        colour = colours(index / max(1, len(widths) - 1))
        ax.plot([s for s, _ in points], [v for _, v in points], color=colour, label=f"m = {width}")
        drawn += [v for _, v in points]
    if drawn and min(drawn) > 0 and max(drawn) > 10 * min(drawn):
        ax.set_yscale("log")
    ax.set_xlabel("gradient-descent step t")
    ax.set_ylabel(name)
    ax.set_title(f"{config.name}: {config.model}, seed {config.seeds[0]}", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)


def _mean_cell(values: Sequence[Any]) -> str:
    """The mean of the finite numbers among ``values`` (``nan`` if none)."""
    finite = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]
    return f"{np.mean(finite):.4g}" if finite else "nan"


def markdown_report(
    config: SweepConfig,
    rows: Sequence[Mapping[str, Any]],
    fits: Mapping[str, Fit],
    claim_lines: Sequence[str] = (),
    corrected: Mapping[str, CorrectedFit] | None = None,
) -> str:
    """The sweep's markdown report: setting, fitted exponents, log-corrected fits (if any), claims, and
    per-width means."""
    step = (
        f"eta = {config.lr_scale:g} / lambda_max(K_0) per run"
        if config.lr is None
        else f"eta = {config.lr:g}"
    )
    stop = (
        f"until L < {config.loss_threshold:g} or {config.max_steps} steps"
        if config.loss_threshold
        else (f"{config.max_steps} steps")
    )
    training = (
        f"full-batch GD on the square loss, {step}, {stop}" if config.mode == "train" else "at init only"
    )
    lines = [
        f"## Sweep `{config.name}`: {config.model} {dict(config.model_args)}",
        "",
        f"Data {dict(config.data)}; {training}; widths {sorted(config.widths)}, seeds {list(config.seeds)} "
        f"({len(rows)} runs). Slopes fitted against {X_LABELS[config.fit_against]}.",
        "",
        f"| metric | fitted exponent | {config.confidence:.0%} CI ({config.ci}) | R² | runs | reference |",
        "|---|---|---|---|---|---|",
    ]
    reference = "—" if config.reference_slope is None else f"{config.reference_slope:g}"
    for column, fit in fits.items():
        if isinstance(fit, str):
            lines.append(f"| `{column}` | {fit} | | | | |")
        else:
            lines.append(
                f"| `{column}` | {fit.slope:.3f} | [{fit.ci_low:.3f}, {fit.ci_high:.3f}] "
                f"| {fit.r_squared:.3f} "
                f"| {fit.num_runs} | {reference} |"
            )
    if corrected:
        level, alpha = f"{config.confidence:.0%} CI", f"{config.reference_slope:g}"
        lines += [
            "",
            f"Log-corrected fits, log y = a + alpha log m + b log log m ({level}, t): alpha and b both "
            f"fitted, and b with alpha fixed at {alpha}.",
            "",
            f"| metric | alpha (free) | {level} | b (free) | {level} | b at alpha = {alpha} | {level} |",
            "|---|---|---|---|---|---|---|",
        ]
        for column, both in corrected.items():
            if isinstance(both, str):
                lines.append(f"| `{column}` | {both} | | | | | |")
                continue
            free, fixed = both
            lines.append(
                f"| `{column}` | {free.slope:.3f} | [{free.slope_low:.3f}, {free.slope_high:.3f}] "
                f"| {free.log_power:.3f} | [{free.log_power_low:.3f}, {free.log_power_high:.3f}] "
                f"| {fixed.log_power:.3f} | [{fixed.log_power_low:.3f}, {fixed.log_power_high:.3f}] |"
            )
    if claim_lines:
        lines += ["", *[f"- {line}" for line in claim_lines]]
    diagnostics = ["min_in_degree", "lr", "eta_lambda_max", "max_loss_ratio", "steps", "final_loss"]
    if config.mode == "init":
        diagnostics = ["min_in_degree"]
    columns = [*fits, *diagnostics]
    lines += [
        "",
        "Per width, mean over seeds (eta_lambda_max = eta * max_t lambda_max(K_t); max_loss_ratio = "
        "max_t L_{t+1} / L_t):",
        "",
        "| m | " + " | ".join(f"`{c}`" for c in columns) + " | status |",
        "|---|" + "---|" * (len(columns) + 1),
    ]
    for width in sorted(config.widths):
        at_width = [row for row in rows if row["width"] == width]
        cells = [_mean_cell([row.get(c) for row in at_width]) for c in columns]
        statuses = sorted({row["status"] for row in at_width})
        status = ", ".join(f"{sum(row['status'] == s for row in at_width)} {s}" for s in statuses)
        lines.append(f"| {width} | " + " | ".join(cells) + f" | {status} |")
    return "\n".join(lines) + "\n"
