"""Which numbers a sweep collects from a run, and how one number is made of a run's history.

A run's *history* is the list of rows :class:`~lightning_linearity.callbacks.LinearityMonitor` keeps
(``{"step": t, "linearity/<key>": value, ...}``, one row per metric round, the first at step 0 before any
update), plus one row ``{"step": t, "train/loss": L(w_t)}`` per gradient-descent step. A sweep metric is
written ``"name"`` or ``"name:reduction"``; its CSV column is ``"name:reduction"``. Names (docs/math.md 2):

=============================  =====================================================  ==========  =========
name                           series over the metric rounds t                        monitor     default
=============================  =====================================================  ==========  =========
``lambda_min``                 lambda_min(K_t), the PL* constant (2.2)                ntk         min
``lambda_max``                 lambda_max(K_t)                                        ntk         max
``condition_number``           lambda_max / lambda_min                                ntk         max
``ntk_trace``                  tr K_t                                                 ntk         last
``pl_ratio``                   ||grad L||^2 / (2 L) on the training set (2.2)         ntk         min
``pl_margin``                  pl_ratio_t / lambda_min(K_t), >= 1 by 2.2              ntk         min
``lambda_min_retained``        lambda_min(K_t) / lambda_min(K_0)                      ntk         min
``kernel_change``              ||K_t - K_0|| / ||K_0|| (2.3, 004 Figure 2)            kernel...   max
``kernel_regime``              ||K_t - kron(Theta, I_k)|| / ||kron(Theta, I_k)||,     kernel...   last
                               Theta the infinite-width NTK (2.8)
``hessian_norm``               max_{i,a} ||d^2 f_a(w_t; x_i)/dw^2||_2 (2.4)           hessian...  last
``hessian_norm_mean``          the mean over (i, a) of the same                       hessian...  last
``grad_cosine``                mean |cos| of neuron gradients, one column per         grad_co...  last
                               hidden layer ``grad_cosine/layer_<l>`` (2.5)
``linearization_error``        max |f(w_t; x) - f_lin(w_t; x)| (2.6)                  lineari...  max
``linearization_error_relative``  the same relative to |f(w_t; x) - f(w_0; x)|        lineari...  max
``distance_from_init``         R_t = ||w_t - w_0||                                    lineari...  last
``loss``                       training loss L(w_t) at every step                     (sweep)     last
=============================  =====================================================  ==========  =========

Reductions: ``init`` (the value at step 0, before any update), ``last``, ``max``, ``min`` over the
series. In mode ``"init"`` every metric is its value at initialisation (reduction ``init``), and the
metrics that only move with training (``kernel_change``, ``linearization_*``, ``distance_from_init``,
``loss``) are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lightning_linearity import keys
from lightning_linearity._text import short_repr

LOSS_KEY = "train/loss"
REDUCTIONS = ("init", "last", "max", "min")
#: The monitor metric that every training run measures, for the step-size diagnostics (lambda_max(K_t)).
ALWAYS_MONITORED = "ntk"

History = Sequence[Mapping[str, float]]
#: ``(history, layer) -> [(step, value), ...]`` in step order.
Series = Callable[[History, str], list[tuple[int, float]]]


def _key_series(key: str) -> Series:
    """The values of one logged key (``key`` may hold ``{layer}``)."""

    def series(history: History, layer: str) -> list[tuple[int, float]]:
        name = key.format(layer=layer)
        return [(row["step"], row[name]) for row in history if name in row]

    return series


def _monitor_series(name: str) -> Series:
    """The values of one key the monitor logs (``name`` without the ``linearity/`` prefix)."""
    return _key_series(keys.logged(name))


def _ratio_series(numerator: str, denominator: str) -> Series:
    """numerator_t / denominator_t over the rounds that logged both."""

    def series(history: History, layer: str) -> list[tuple[int, float]]:
        a, b = keys.logged(numerator), keys.logged(denominator)
        return [(row["step"], row[a] / row[b]) for row in history if a in row and b in row]

    return series


def _retained_series(key: str) -> Series:
    """value_t / value_0 of one logged key."""
    values = _monitor_series(key)

    def series(history: History, layer: str) -> list[tuple[int, float]]:
        points = values(history, layer)
        return [(step, value / points[0][1]) for step, value in points]

    return series


@dataclass(frozen=True)
class Quantity:
    """A collectable series: where it comes from and how it is reduced by default.

    Attributes:
        monitor: the :class:`LinearityMonitor` metric that logs it (``None``: the sweep's own loss record).
        series: ``(history, layer) -> [(step, value), ...]`` in step order.
        default: the default reduction.
        needs_training: it is identically 0 (or undefined) at initialisation.
        per_layer: one column per hidden layer (``name/layer_<l>``).
    """

    monitor: str | None
    series: Series
    default: str
    needs_training: bool = False
    per_layer: bool = False


QUANTITIES: dict[str, Quantity] = {
    "lambda_min": Quantity("ntk", _monitor_series(keys.LAMBDA_MIN), "min"),
    "lambda_max": Quantity("ntk", _monitor_series(keys.LAMBDA_MAX), "max"),
    "condition_number": Quantity("ntk", _monitor_series(keys.CONDITION_NUMBER), "max"),
    "ntk_trace": Quantity("ntk", _monitor_series(keys.NTK_TRACE), "last"),
    "pl_ratio": Quantity("ntk", _monitor_series(keys.PL_RATIO), "min"),
    "pl_margin": Quantity("ntk", _ratio_series(keys.PL_RATIO, keys.LAMBDA_MIN), "min"),
    "lambda_min_retained": Quantity("ntk", _retained_series(keys.LAMBDA_MIN), "min"),
    "kernel_change": Quantity(
        "kernel_change", _monitor_series(keys.KERNEL_CHANGE), "max", needs_training=True
    ),
    "kernel_regime": Quantity("kernel_regime", _monitor_series(keys.KERNEL_REGIME), "last"),
    "hessian_norm": Quantity("hessian_norm", _monitor_series(keys.HESSIAN_NORM_MAX), "last"),
    "hessian_norm_mean": Quantity("hessian_norm", _monitor_series(keys.HESSIAN_NORM_MEAN), "last"),
    "grad_cosine": Quantity(
        "grad_cosines", _monitor_series(keys.cosine_key("{layer}")), "last", per_layer=True
    ),
    "linearization_error": Quantity(
        "linearization", _monitor_series(keys.LINEARIZATION_ERROR_MAX), "max", needs_training=True
    ),
    "linearization_error_relative": Quantity(
        "linearization", _monitor_series(keys.LINEARIZATION_ERROR_RELATIVE), "max", needs_training=True
    ),
    "distance_from_init": Quantity(
        "linearization", _monitor_series(keys.DISTANCE_FROM_INIT), "last", needs_training=True
    ),
    "loss": Quantity(None, _key_series(LOSS_KEY), "last", needs_training=True),
}


@dataclass(frozen=True)
class MetricSpec:
    """One requested metric: ``name`` (e.g. ``grad_cosine`` or ``grad_cosine/layer_2``) and ``reduction``."""

    name: str
    reduction: str

    @property
    def quantity(self) -> Quantity:
        return QUANTITIES[self.name.split("/")[0]]

    @property
    def layer(self) -> str | None:
        """The hidden layer asked for (``"layer_2"``), ``None`` for all layers or a model-wide quantity."""
        return self.name.split("/", 1)[1] if "/" in self.name else None

    def columns(self, layer_names: Sequence[str]) -> list[tuple[str, str | None]]:
        """``(CSV column, layer)`` pairs this spec fills, given the network's hidden layer names."""
        base = self.name.split("/")[0]
        if not self.quantity.per_layer:
            return [(f"{self.name}:{self.reduction}", None)]
        layers = [self.layer] if self.layer is not None else list(layer_names)
        return [(f"{base}/{layer}:{self.reduction}", layer) for layer in layers]


def parse_metric_spec(text: str, mode: str = "train") -> MetricSpec:
    """``"name"`` or ``"name:reduction"`` -> :class:`MetricSpec` (the default reduction per the table).

    Raises:
        ValueError: unknown name or reduction, a layer suffix on a model-wide quantity, or a metric that
            only moves with training in mode ``"init"`` (or a reduction other than ``init`` there).
    """
    if not isinstance(text, str) or not text:
        raise ValueError(f"a metric must be a string 'name' or 'name:reduction', got {short_repr(text)}")
    name, _, reduction = text.partition(":")
    base, slash, layer = name.partition("/")
    if base not in QUANTITIES:
        raise ValueError(f"the sweep cannot collect metric {base!r}; available: {sorted(QUANTITIES)}")
    quantity = QUANTITIES[base]
    if slash and (not quantity.per_layer or not layer):
        raise ValueError(
            f"metric {name!r}: only per-layer metrics take a layer, written like 'grad_cosine/layer_2'"
        )
    if mode == "init":
        if quantity.needs_training:
            raise ValueError(
                f"metric {base!r} only moves with training; it cannot be collected in mode 'init'"
            )
        if reduction not in ("", "init"):
            raise ValueError(
                f"mode 'init' has only the value at initialisation; write {name!r} or '{name}:init'"
            )
        reduction = "init"
    reduction = reduction or quantity.default
    if reduction not in REDUCTIONS:
        raise ValueError(f"metric {text!r}: unknown reduction {reduction!r}; valid: {list(REDUCTIONS)}")
    return MetricSpec(name, reduction)


def check_metric_specs(metrics: Sequence[str], mode: str) -> list[MetricSpec]:
    """Parse every metric of a sweep; at least one, no repeats."""
    if not metrics:
        raise ValueError(f"give at least one metric; available: {sorted(QUANTITIES)}")
    specs = [parse_metric_spec(text, mode) for text in metrics]
    if len(set(specs)) != len(specs):
        raise ValueError(f"metrics must not repeat, got {list(metrics)}")
    return specs


def curve_specs(curves: Sequence[str], mode: str) -> list[MetricSpec]:
    """The quantities to plot against the step (``"last"`` marks a whole series); model-wide, train mode."""
    specs = []
    for name in curves:
        if name not in QUANTITIES or QUANTITIES[name].per_layer:
            valid = sorted(n for n, q in QUANTITIES.items() if not q.per_layer)
            raise ValueError(f"cannot plot {name!r} against the step; curves can be {valid}")
        if mode != "train":
            raise ValueError("curves (quantities against the training step) need mode 'train'")
        specs.append(MetricSpec(name, "last"))
    return specs


def monitor_metrics(
    specs: Sequence[MetricSpec], monitor_args: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """The ``metrics`` mapping for :class:`LinearityMonitor`: every monitor metric the specs need.

    ``ntk`` is always measured (the step-size diagnostics read lambda_max(K_t)). ``grad_cosines`` is
    restricted to the layers asked for, unless ``monitor_args`` names its layers.

    Raises:
        ValueError: ``monitor_args`` for a metric no spec uses.
    """
    needed = {ALWAYS_MONITORED} | {s.quantity.monitor for s in specs if s.quantity.monitor is not None}
    unused = sorted(set(monitor_args) - needed)
    if unused:
        raise ValueError(f"monitor_args has options for {unused}, which none of the requested metrics uses")
    options = {name: dict(monitor_args.get(name) or {}) for name in sorted(needed)}
    cosine_specs = [s for s in specs if s.quantity.per_layer]
    if cosine_specs and all(s.layer is not None for s in cosine_specs):
        options["grad_cosines"].setdefault("layers", sorted({s.layer for s in cosine_specs}))
    return options


def check_layers(specs: Sequence[MetricSpec], layer_names: Sequence[str]) -> None:
    """Raise ``ValueError`` if a spec names a hidden layer the network does not have."""
    for spec in specs:
        if spec.layer is not None and spec.layer not in layer_names:
            raise ValueError(
                f"metric {spec.name!r}: the network has no hidden layer {spec.layer!r}; "
                f"it has {list(layer_names)}"
            )


def reduce_series(values: Sequence[float], reduction: str) -> float:
    """One number from a series; NaN when the series is empty (no round logged it)."""
    if not values:
        return float("nan")
    if reduction == "init":
        return float(values[0])
    if reduction == "last":
        return float(values[-1])
    return float(np.max(values) if reduction == "max" else np.min(values))


def collect(specs: Sequence[MetricSpec], history: History, layer_names: Sequence[str]) -> dict[str, float]:
    """``{column: value}`` for every spec (:meth:`MetricSpec.columns`) from one run's history."""
    values = {}
    for spec in specs:
        for column, layer in spec.columns(layer_names):
            series = spec.quantity.series(history, layer or "")
            values[column] = reduce_series([value for _, value in series], spec.reduction)
    return values
