"""End-of-fit report of :class:`LinearityMonitor`: figures of the ``linearity/`` metrics as PNGs and images.

:func:`write_report` is called by the callback at the end of fit on rank 0. It draws up to three figures,
skipping any whose data is missing:

``linearity_curves.png``
    every ``linearity/`` metric against the global step, related keys on shared axes
    (``lambda_min`` and ``lambda_max``, ``hessian_norm_max`` and ``hessian_norm_mean``, the layers of
    ``grad_cosine/layer_<l>``, ...), log y-axis where all values are positive.
``ntk_spectrum.png``
    the sorted eigenvalues of the empirical NTK on the probe set (docs/math.md 2.1) at init and now.
``grad_cosines.png``
    mean |cos| between neuron gradients per hidden layer (docs/math.md 2.5) at the last round, and over steps.

The PNGs go to the run's log directory (:func:`report_dir`); they are also logged as images to W&B
(under ``linearity_plots/<name>``) and TensorBoard (as figures with the same tags). Figures are built on
matplotlib's object API with an Agg canvas: pyplot's global state and backend are never touched.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lightning_linearity._compat import classes
from lightning_linearity.keys import COSINE_GROUP, GROUPS, IMAGE_PREFIX, PREFIX, group_of, is_plotted

if TYPE_CHECKING:
    import lightning.pytorch as pl

#: Figure titles, also the captions of the logged images.
CAPTIONS = {
    "linearity_curves": "Transition to linearity: metrics on the probe set during training",
    "ntk_spectrum": "Empirical NTK spectrum on the probe set",
    "grad_cosines": "Neuron gradients turning orthogonal: mean |cos| over neuron pairs and probes",
}
DPI = 110
#: Smallest ratio max / min of positive values drawn on a log axis.
LOG_SPAN = 10.0


def _natural_key(text: str) -> list[int | str]:
    """Sort key ordering ``layer_2`` before ``layer_10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _panel_order(group: str) -> tuple[int, list[int | str]]:
    """Known groups in the registry's order (:data:`~lightning_linearity.keys.GROUPS`), then the others."""
    known = list(GROUPS)
    return (known.index(group) if group in known else len(known), _natural_key(group))


def metric_series(history: Sequence[Mapping[str, float]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{key: (steps, values)}`` for every finite ``linearity/`` value in ``history``, in step order."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for row in sorted(history, key=lambda row: row["step"]):
        for key, value in row.items():
            if not key.startswith(PREFIX) or isinstance(value, bool):
                continue
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(value):
                steps, values = series.setdefault(key, ([], []))
                steps.append(int(row["step"]))
                values.append(value)
    return {key: (np.asarray(steps), np.asarray(values)) for key, (steps, values) in series.items()}


def _wants_log_scale(arrays: Sequence[np.ndarray]) -> bool:
    """Log axis when all values are positive and span at least :data:`LOG_SPAN` (else unreadable ticks)."""
    values = np.concatenate([np.ravel(a) for a in arrays])
    return values.size > 0 and bool((values > 0).all()) and values.max() >= LOG_SPAN * values.min()


def _draw_lines(ax: Axes, lines: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """One line per label against the step (log y per :func:`_wants_log_scale`), a legend when several."""
    for label in sorted(lines, key=_natural_key):
        steps, values = lines[label]
        ax.plot(steps, values, marker="o", markersize=3, label=label.replace("_", " "))
    if _wants_log_scale([values for _, values in lines.values()]):
        ax.set_yscale("log")
    ax.set_xlabel("global step")
    ax.grid(True, which="both", alpha=0.3)
    if len(lines) > 1:
        ax.legend(fontsize="small")


def curves_figure(history: Sequence[Mapping[str, float]]) -> Figure | None:
    """Every ``linearity/`` metric against the global step, one panel per group; ``None`` without data."""
    groups: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for key, line in metric_series(history).items():
        if not is_plotted(key[len(PREFIX) :]):
            continue
        group, label = group_of(key[len(PREFIX) :])
        groups.setdefault(group, {})[label] = line
    if not groups:
        return None
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.4 * nrows + 0.4), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, group in zip(axes, sorted(groups, key=_panel_order), strict=False):
        _draw_lines(ax, groups[group])
        title = GROUPS[group].title if group in GROUPS else group.replace("_", " ")
        ax.set_title(title, fontsize="medium")
    for ax in axes[len(groups) :]:
        ax.remove()
    fig.suptitle(CAPTIONS["linearity_curves"])
    return fig


def spectrum_figure(spectra: Mapping[str, np.ndarray], final_step: int) -> Figure | None:
    """Sorted NTK eigenvalues per entry of ``spectra`` (``init``, ``final``); ``None`` when all are empty.

    K is positive semi-definite, so eigenvalues <= 0 are zeros up to rounding: on the log axis they are
    left out, and the legend counts them.
    """
    spectra = {name: np.sort(np.asarray(eig, dtype=float).ravel())[::-1] for name, eig in spectra.items()}
    spectra = {name: eig for name, eig in spectra.items() if eig.size}
    if not spectra:
        return None
    log = all((eig > 0).any() for eig in spectra.values())
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    for name in sorted(spectra, key=lambda name: (name != "init", name != "final", name)):
        eig = spectra[name]
        shown = eig[eig > 0] if log else eig
        label = {"init": "init", "final": f"final (step {final_step})"}.get(name, name)
        label += f": λ_min = {eig[-1]:.3g}"
        if shown.size < eig.size:
            label += f" ({eig.size - shown.size} ≤ 0 not shown)"
        ax.plot(np.arange(1, shown.size + 1), shown, marker=".", label=label)
    if log:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("eigenvalue index (descending)")
    ax.set_ylabel("eigenvalue of K")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.suptitle(CAPTIONS["ntk_spectrum"])
    return fig


def cosines_figure(history: Sequence[Mapping[str, float]]) -> Figure | None:
    """Mean |cos| between neuron gradients per layer at the last round (bars) and over steps (lines)."""
    prefix = f"{PREFIX}{COSINE_GROUP}/"
    series = metric_series(history)
    lines = {key[len(prefix) :]: line for key, line in series.items() if key.startswith(prefix)}
    if not lines:
        return None
    layers = sorted(lines, key=_natural_key)
    last_step = max(int(steps[-1]) for steps, _ in lines.values())
    fig = Figure(figsize=(10.0, 4.0), layout="constrained")
    bars, curves = fig.subplots(1, 2)
    last = [lines[layer][1][-1] if lines[layer][0][-1] == last_step else np.nan for layer in layers]
    bars.bar([layer.replace("_", " ") for layer in layers], last, color="tab:blue")
    bars.set_ylabel("mean |cos|")
    bars.set_title(f"per layer at step {last_step}")
    bars.grid(True, axis="y", alpha=0.3)
    _draw_lines(curves, lines)
    curves.set_ylabel("mean |cos|")
    curves.set_title("over training")
    fig.suptitle(CAPTIONS["grad_cosines"])
    return fig


def comparison_figure(
    runs: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]],
    panels: Sequence[str],
    *,
    titles: Mapping[str, str] | None = None,
    reference_lines: Mapping[str, float] | None = None,
    styles: Mapping[str, Mapping[str, object]] | None = None,
    suptitle: str | None = None,
) -> Figure | None:
    """Several runs side by side: one panel per key of ``panels``, one line per run on every panel.

    Args:
        runs: ``{run label: {key: (steps, values)}}``, e.g. :func:`metric_series` of each run's history
            with other series (the training loss) added; a run missing a key has no line on that panel.
        panels: the keys to draw, one panel each, left to right.
        titles: panel titles by key; default the registry's title of a ``linearity/`` key
            (:data:`~lightning_linearity.keys.GROUPS`), else the key.
        reference_lines: a dashed horizontal line at this value on the panel of the key (e.g. 1 on
            ``linearity/catapult``, docs/math.md 2.9).
        styles: matplotlib line keywords per run label (``color``, ``linestyle``, ...).
        suptitle: the figure's title.

    Returns:
        The figure, or ``None`` when no run has a finite value of any panel's key. Log y-axis per panel
        where all values are positive and span a factor of :data:`LOG_SPAN`.

    Raises:
        ValueError: ``panels`` empty.
    """
    if not panels:
        raise ValueError("panels must name at least one key to draw, e.g. ['linearity/kernel_change']")
    titles, reference_lines, styles = titles or {}, reference_lines or {}, styles or {}
    finite = {
        label: {
            key: (steps[ok], values[ok])
            for key, (steps, values) in series.items()
            if (ok := np.isfinite(values)).any()
        }
        for label, series in runs.items()
    }
    if not any(key in series for series in finite.values() for key in panels):
        return None
    fig = Figure(figsize=(4.6 * len(panels), 3.8), layout="constrained")
    for ax, key in zip(fig.subplots(1, len(panels), squeeze=False).ravel(), panels, strict=True):
        drawn = [series[key] for series in finite.values() if key in series]
        for label, series in finite.items():
            if key in series:
                ax.plot(*series[key], label=label, **styles.get(label, {}))
        if key in reference_lines:
            ax.axhline(reference_lines[key], color="black", linestyle="--", linewidth=1)
        if drawn and _wants_log_scale([values for _, values in drawn]):
            ax.set_yscale("log")
        group = group_of(key[len(PREFIX) :])[0] if key.startswith(PREFIX) else None
        ax.set_title(titles.get(key) or (GROUPS[group].title if group in GROUPS else key), fontsize="medium")
        ax.set_xlabel("global step")
        ax.grid(True, which="both", alpha=0.3)
    legend = {}  # one entry per run, from whichever panels drew it
    for ax in fig.axes:
        handles, labels = ax.get_legend_handles_labels()
        legend.update(zip(labels, handles, strict=True))
    fig.legend(legend.values(), legend.keys(), loc="outside lower center", ncols=min(4, len(legend)))
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def report_dir(trainer: pl.Trainer) -> Path:
    """The run's log directory, like ``trainer.log_dir`` but without its collective broadcast (rank 0 only).

    CSV / TensorBoard first logger: its ``log_dir``; another logger (W&B, ...): ``save_dir/name/version``,
    where Lightning's ``ModelCheckpoint`` puts its checkpoints folder; no logger: ``default_root_dir``.
    """
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    if isinstance(logger, classes("loggers.CSVLogger") + classes("loggers.TensorBoardLogger")):
        return Path(logger.log_dir)
    if logger.save_dir is None:
        return Path(trainer.default_root_dir)
    version = logger.version
    parts = [logger.name, version if isinstance(version, str) or version is None else f"version_{version}"]
    return Path(logger.save_dir, *(str(part) for part in parts if part is not None))


def _log_figures(trainer: pl.Trainer, figures: Mapping[str, Figure], paths: Mapping[str, Path]) -> None:
    """Send the figures as images to the W&B and TensorBoard loggers of ``trainer``, at the global step."""
    step = trainer.global_step
    for logger in trainer.loggers:
        for name, fig in figures.items():
            tag = f"{IMAGE_PREFIX}{name}"
            if isinstance(logger, classes("loggers.WandbLogger")):
                logger.log_image(tag, [str(paths[name])], step=step, caption=[CAPTIONS[name]])
            elif isinstance(logger, classes("loggers.TensorBoardLogger")):
                logger.experiment.add_figure(tag, fig, global_step=step, close=False)


def write_report(
    trainer: pl.Trainer, history: Sequence[Mapping[str, float]], spectra: Mapping[str, np.ndarray]
) -> dict[str, Path]:
    """Draw the report figures, save them as PNGs in :func:`report_dir` and log them as images.

    Args:
        trainer: the trainer at the end of fit (rank 0).
        history: one row per metric round, ``{"step": int, "linearity/<key>": float, ...}``.
        spectra: NTK eigenvalues, ``{"init": array, "final": array}`` (either may be missing).

    Returns:
        ``{figure name: PNG path}`` for the figures that had data (``linearity_curves``, ``ntk_spectrum``,
        ``grad_cosines``).
    """
    candidates = {
        "linearity_curves": curves_figure(history),
        "ntk_spectrum": spectrum_figure(spectra, trainer.global_step),
        "grad_cosines": cosines_figure(history),
    }
    figures = {name: fig for name, fig in candidates.items() if fig is not None}
    if not figures:
        return {}
    directory = report_dir(trainer)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, fig in figures.items():
        FigureCanvasAgg(fig)
        paths[name] = directory / f"{name}.png"
        fig.savefig(paths[name], dpi=DPI)
    _log_figures(trainer, figures, paths)
    return paths
