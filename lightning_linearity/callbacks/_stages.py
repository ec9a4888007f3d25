"""The metrics :class:`LinearityMonitor` schedules, each with its options, as stages of a metric round.

A stage computes the rows of its probe points that belong to this rank (:meth:`Stage.rows`); the callback
gathers the rows of all ranks in probe order, and :meth:`Stage.values` turns the full rows into the logged
numbers (the same on every rank). Stages never do the maths themselves, nor decide how it splits: each
metric owns its work split as a pair of public functions (rows of a share; the values from all rows) in
:mod:`lightning_linearity.metrics.ntk` and :mod:`lightning_linearity.metrics.split`, whose docstrings give
the formulas (docs/math.md section 2). Stages schedule, keep the references (K_0, w_0, running maxima) and
name the logged keys (:mod:`lightning_linearity.keys`).

Stages and the metric names they serve:

=================  ==============================  ==================================================
stage              metric names                    logged keys (under ``linearity/``)
=================  ==============================  ==================================================
:class:`Kernel`    ``ntk``, ``kernel_change``      ``lambda_min``, ``lambda_max``, ``condition_number``,
                                                   ``ntk_trace``, ``pl_ratio``; ``kernel_change``,
                                                   ``kernel_change_max``
:class:`Hessian`   ``hessian_norm``                ``hessian_norm_max``, ``hessian_norm_mean``, and per
                                                   hidden layer ``hessian_norm_max/<layer>``, ...;
                                                   ``hessian_eigenvector_share/<layer>``,
                                                   ``hessian_eigenvector_neuron_share``
:class:`Cosines`   ``grad_cosines``                ``grad_cosine/<layer>``
:class:`Linear..`  ``linearization``               ``linearization_error_mean``, ``..._max``,
                                                   ``..._relative``, ``distance_from_init``
=================  ==============================  ==================================================
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_linearity import keys
from lightning_linearity._compat import MisconfigurationException
from lightning_linearity._text import short_repr
from lightning_linearity.callbacks._probe import ProbeSet
from lightning_linearity.metrics import (
    ENGINE_METHODS,
    EngineMethod,
    Method,
    analytic_ntk,
    as_layered_net,
    check_method,
    kernel_spectrum,
    linearization_error,
    loss_sharpness,
    pl_ratio,
    relative_kernel_change,
    resolve_layer,
)
from lightning_linearity.metrics.cosines import hidden_layers
from lightning_linearity.metrics.ntk import NTKPath, ntk_from_share_rows, ntk_path, ntk_share_rows
from lightning_linearity.metrics.split import (
    HessianUnit,
    cosine_share_rows,
    cosines_from_rows,
    eigenvector_groups,
    hessian_from_rows,
    hessian_share_rows,
    hessian_units,
)

Layer = int | str


@dataclass(frozen=True)
class RoundContext:
    """What every stage of one metric round sees.

    Attributes:
        model: the module the metrics differentiate: the LightningModule itself (never its DDP wrapper), or
            the package network behind it, in the compute dtype.
        probe: the probe set, on the model's device, inputs in the compute dtype.
        targets: probe targets encoded like the model output (n, k), or ``None`` when there are none.
        seed: seed of every generator the metrics draw from (neuron subsets, Lanczos start vectors); the
            same on every rank and in every round, so the same neurons are followed through training.
        take_references: the round at the start of training (before the first optimiser step, unless
            resumed), where the references (K_0, w_0) are taken. A stage whose reference is still missing
            after it (that round failed) takes it in its next successful round and says from which step
            its values count.
        step: the global step of the round.
        lr: the step size eta of plain gradient descent that is stable on the same curvatures as the
            optimiser's current step (docs/math.md 2.9: its lr for SGD, scaled for momentum), ``None``
            without an optimiser or for one with no such threshold (Adam and the like).
    """

    model: nn.Module
    probe: ProbeSet
    targets: Tensor | None
    seed: int
    take_references: bool
    step: int = 0
    lr: float | None = None

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)


def _check_positive_int(name: str, value: Any, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{name} must be a positive integer{' or None' if allow_none else ''}, got {short_repr(value)}"
        )


def _resolve_layers(model: nn.Module, layers: Sequence[Layer] | None, metric: str) -> list[tuple[Layer, str]]:
    """``(layer, display name)`` for each requested layer; ``None`` chooses them (:func:`hidden_layers`)."""
    if layers is None:
        layers = hidden_layers(model)
        if not layers:
            names = [name for name, _ in model.named_modules() if name]
            raise MisconfigurationException(
                f"{metric}: {type(model).__name__} has no hidden nn.Linear / nn.Conv layer to choose; name "
                f"the layers, {metric}={{'layers': [...]}}, with submodules whose outputs are "
                f"pre-activations, out of {names}"
            )
    resolved = []
    for layer in layers:
        try:
            resolved.append((layer, resolve_layer(model, layer)[1]))
        except ValueError as err:
            raise MisconfigurationException(f"{metric}: {err}") from err
    return resolved


# ----------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class NTKOptions:
    """Options of ``ntk`` (and of the kernel ``kernel_change`` compares).

    Attributes:
        method: ``"auto"`` (structured path for the package's nets, the per-module engine for other models
            it takes, ``torch.func`` otherwise; :func:`~lightning_linearity.metrics.ntk.ntk_path`),
            ``"structured"``, ``"engine"`` or ``"generic"`` (see
            :func:`~lightning_linearity.metrics.ntk.empirical_ntk`).
        chunk_size: probe points processed at once (``None``: sized automatically).
        pl_ratio: also log the realised ratio ||grad L||^2 / (2 L) of the square loss on the probe set
            (docs/math.md 2.2; never below ``lambda_min``), when the probe set has targets.
    """

    method: EngineMethod = "auto"
    chunk_size: int | None = None
    pl_ratio: bool = True

    def __post_init__(self) -> None:
        check_method(self.method, ENGINE_METHODS)
        _check_positive_int("chunk_size", self.chunk_size)


@dataclass(frozen=True)
class KernelChangeOptions:
    """Options of ``kernel_change``: the matrix norm, ``"spectral"`` (the papers') or ``"fro"``."""

    ord: Literal["spectral", "fro"] = "spectral"

    def __post_init__(self) -> None:
        if self.ord not in ("spectral", "fro"):
            raise ValueError(f"ord must be 'spectral' or 'fro', got {short_repr(self.ord)}")


@dataclass(frozen=True)
class KernelRegimeOptions:
    """Options of ``kernel_regime``: ||K_t - kron(Theta, I_k)|| / ||kron(Theta, I_k)|| (docs/math.md 2.8), the
    distance of the empirical NTK from the infinite-width one, in the matrix norm ``ord``."""

    ord: Literal["spectral", "fro"] = "spectral"

    def __post_init__(self) -> None:
        if self.ord not in ("spectral", "fro"):
            raise ValueError(f"ord must be 'spectral' or 'fro', got {short_repr(self.ord)}")


@dataclass(frozen=True)
class SharpnessOptions:
    """Options of ``sharpness`` (docs/math.md 2.9): the top eigenvalue of the loss Hessian on the probe set
    (with its targets), its Gauss-Newton part, and both against the optimiser's current step size.

    Attributes:
        loss: ``"mse"`` (1/2 sum ||f - y||^2 over the probe set, class labels one-hot) or
            ``"cross_entropy"`` (the mean over the probe set).
        tol: relative tolerance of Lanczos.
        max_iter: Hessian-vector products per eigenvalue, at most.
    """

    loss: Literal["mse", "cross_entropy"] = "mse"
    tol: float = 1e-3
    max_iter: int = 100

    def __post_init__(self) -> None:
        if self.loss not in ("mse", "cross_entropy"):
            raise ValueError(f"loss must be 'mse' or 'cross_entropy', got {short_repr(self.loss)}")
        if isinstance(self.tol, bool) or not isinstance(self.tol, int | float) or not 0 < self.tol < math.inf:
            raise ValueError(f"tol must be a positive number, got {short_repr(self.tol)}")
        _check_positive_int("max_iter", self.max_iter, allow_none=False)


@dataclass(frozen=True)
class HessianOptions:
    """Options of ``hessian_norm`` (docs/math.md 2.4).

    Each probe point gets its own Lanczos run over its q outputs (or sampled neurons). On the package's
    networks it runs on the structured path (a Krylov basis of about ``q * max_iter * 4 L m`` numbers and
    about four products with each weight matrix per step); other models take the generic ``torch.func``
    path, whose basis holds ``q * max_iter * P`` numbers for P parameters. It is the costliest metric,
    hence the default of one probe point.

    Attributes:
        num_points: Hessians at the first ``num_points`` probe points (``None``: all of them).
        tol: relative residual tolerance of Lanczos: an eigenvalue lies within ``tol * value`` of the
            logged value (usually much closer: the error of a Ritz value is at most residual^2 / gap).
        max_iter: Lanczos steps (Hessian-vector products) per norm, at most.
        layers: hidden layers whose pre-activation Hessians ||d^2 z_l[r] / dw^2|| are also logged
            (004 Theorem 3.8); none by default.
        num_neurons: neurons sampled per layer in ``layers`` (``None``: all).
        method: ``"auto"``, ``"structured"`` or ``"generic"`` (see
            :func:`~lightning_linearity.metrics.hessian.hessian_spectral_norm`).
        eigenvector_shares: also log where the top eigenvector v of the output Hessians lives (the one of
            the largest norm over points and outputs; docs/math.md 2.4): its share ||v_l||^2 of each
            layer's weights, ``hessian_eigenvector_share/<layer>``, and its largest single-neuron share,
            ``hessian_eigenvector_neuron_share``. The package's networks only (others: a warning at
            setup, nothing logged for it).
    """

    num_points: int | None = 1
    tol: float = 1e-2
    max_iter: int = 50
    layers: tuple[Layer, ...] = ()
    num_neurons: int | None = 8
    method: Method = "auto"
    eigenvector_shares: bool = False

    def __post_init__(self) -> None:
        _check_positive_int("num_points", self.num_points)
        _check_positive_int("num_neurons", self.num_neurons)
        _check_positive_int("max_iter", self.max_iter, allow_none=False)
        if isinstance(self.tol, bool) or not isinstance(self.tol, int | float) or not 0 < self.tol < math.inf:
            raise ValueError(f"tol must be a positive number, got {short_repr(self.tol)}")
        check_method(self.method)
        if not isinstance(self.eigenvector_shares, bool):
            raise ValueError(
                f"eigenvector_shares must be True or False, got {short_repr(self.eigenvector_shares)}"
            )
        object.__setattr__(self, "layers", tuple(self.layers))


@dataclass(frozen=True)
class CosineOptions:
    """Options of ``grad_cosines`` (docs/math.md 2.5).

    Attributes:
        layers: hidden layers to measure (``None``: every hidden layer of the package's nets; required for
            other models: names of submodules whose outputs are pre-activations).
        num_points: average over the first ``num_points`` probe points (default 8; ``None``: all of
            them). With 32 neurons, 8 points average 8 x 496 pairs per layer.
        num_neurons: neurons sampled per layer, the same subset in every round (``None``: all).
        method: ``"auto"``, ``"structured"``, ``"engine"`` or ``"generic"`` (see
            :func:`~lightning_linearity.metrics.cosines.neuron_gradient_cosines`).
        chunk_size: probe points processed at once (``None``: sized automatically).

    The cost grows like ``num_points * num_neurons`` times the squared width.
    """

    layers: tuple[Layer, ...] | None = None
    num_points: int | None = 8
    num_neurons: int | None = 32
    method: EngineMethod = "auto"
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        _check_positive_int("num_points", self.num_points)
        _check_positive_int("num_neurons", self.num_neurons)
        _check_positive_int("chunk_size", self.chunk_size)
        check_method(self.method, ENGINE_METHODS)
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))


@dataclass(frozen=True)
class LinearizationOptions:
    """Options of ``linearization`` (docs/math.md 2.6), which keeps a copy of w_0 for the whole run.

    Attributes:
        memory_budget_mb: refuse (at setup) a model whose copy of w_0 would exceed this many MiB
            (``None``: no limit).
    """

    memory_budget_mb: float | None = None

    def __post_init__(self) -> None:
        budget = self.memory_budget_mb
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, int | float) or budget <= 0
        ):
            raise ValueError(f"memory_budget_mb must be a positive number or None, got {short_repr(budget)}")


OPTIONS: dict[str, type] = {
    "ntk": NTKOptions,
    "kernel_change": KernelChangeOptions,
    "kernel_regime": KernelRegimeOptions,
    "hessian_norm": HessianOptions,
    "grad_cosines": CosineOptions,
    "linearization": LinearizationOptions,
    "sharpness": SharpnessOptions,
}
METRIC_NAMES: tuple[str, ...] = tuple(OPTIONS)


def parse_metrics(metrics: Sequence[str] | Mapping[str, Mapping[str, Any] | None]) -> dict[str, Any]:
    """``{metric name: options}`` from a list of names or a mapping ``name -> {option: value}``."""
    if isinstance(metrics, str):
        metrics = [metrics]
    requested = dict(metrics) if isinstance(metrics, Mapping) else dict.fromkeys(metrics)
    if not requested:
        raise MisconfigurationException(
            f"LinearityMonitor needs at least one metric out of {list(METRIC_NAMES)}"
        )
    parsed = {}
    for name, given in requested.items():
        if name not in OPTIONS:
            raise MisconfigurationException(
                f"LinearityMonitor: unknown metric {name!r}; valid metric names are {list(METRIC_NAMES)}"
            )
        options_type = OPTIONS[name]
        given = dict(given or {})
        valid = [f.name for f in fields(options_type)]
        unknown = sorted(set(given) - set(valid))
        if unknown:
            raise MisconfigurationException(
                f"LinearityMonitor: unknown option(s) {unknown} for metric {name!r}; "
                f"valid options are {valid}"
            )
        try:
            parsed[name] = options_type(**given)
        except ValueError as err:
            raise MisconfigurationException(f"LinearityMonitor: metric {name!r}: {err}") from err
    return parsed


def options_settings(options: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: asdict(value) for name, value in options.items()}


# ------------------------------------------------------------------------------------------------ stages
class Stage(ABC):
    """One part of a metric round (see the module docstring)."""

    #: the metric names this stage serves, as the user wrote them
    metrics: tuple[str, ...]
    #: the stage's name in logged timings, ``seconds/<name>``
    name: str = ""

    def setup(self, model: nn.Module, dtype: torch.dtype) -> None:  # noqa: B027 (optional hook)
        """Check the options against the model before training; raise ``MisconfigurationException``."""

    def chosen_options(self) -> dict[str, dict[str, Any]]:
        """Options the stage chose itself at setup (``{metric: {option: value}}``), for the run config."""
        return {}

    @property
    def point_limit(self) -> int | None:
        """Use only the first this-many probe points (``None``: all of them)."""
        return None

    def num_points(self, probe_size: int) -> int:
        """How many of the probe points (the first ones) this stage uses."""
        return probe_size if self.point_limit is None else min(probe_size, self.point_limit)

    def num_units(self, ctx: RoundContext) -> int:
        """How many units of work the ranks split (:meth:`rows` gets a share of them): the points."""
        return self.num_points(len(ctx.probe))

    def inputs(self, ctx: RoundContext) -> Tensor:
        """The probe inputs this stage uses."""
        return ctx.probe.x[: self.num_points(len(ctx.probe))]

    @abstractmethod
    def rows(self, ctx: RoundContext, share: slice) -> dict[str, Tensor]:
        """This rank's rows: tensors whose dim 0 runs over the units (probe points) of ``share``."""

    @abstractmethod
    def values(self, ctx: RoundContext, rows: dict[str, Tensor]) -> dict[str, float]:
        """The logged numbers (keys without the ``linearity/`` prefix) from the rows of all points."""

    def missing_reference(self) -> bool:
        """Whether the stage still needs its reference from the start of training (K_0, w_0)."""
        return False

    def reset(self) -> None:  # noqa: B027 (stateless by default)
        """Forget the state of a previous run (references, running maxima)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: B027 (stateless by default)
        """Restore what :meth:`state_dict` returned."""


@dataclass
class Kernel(Stage):
    """The empirical NTK K (docs/math.md 2.1), its spectrum (2.2) and its change from K_0 (2.3).

    K is computed once per round and shared by ``ntk``, ``kernel_change`` and ``kernel_regime``. The NTK's
    work split (:func:`~lightning_linearity.metrics.ntk.ntk_path` decides the path,
    :func:`~lightning_linearity.metrics.ntk.ntk_share_rows` gives rank r the rows of its probe points,
    :func:`~lightning_linearity.metrics.ntk.ntk_from_share_rows` K from all of them): on the package's
    networks and on the models the per-module engine takes, a rank backpropagates its own probe points
    only, and every rank forms K from the gathered factor rows with the code a single process uses.
    K_0 = K(w_0) is taken in the round at the start of training and kept (also in the checkpoint).
    """

    ntk: NTKOptions | None
    change: KernelChangeOptions | None
    regime: KernelRegimeOptions | None = None
    metrics: tuple[str, ...] = field(init=False)
    name: str = "kernel"
    reference: Tensor | None = field(default=None, init=False)  # K_0
    reference_step: int = field(default=0, init=False)  # the step K_0 was taken at
    latest: Tensor | None = field(default=None, init=False)  # K of the last round
    change_max: float = field(default=0.0, init=False)
    theta: Tensor | None = field(default=None, init=False)  # the infinite-width NTK on the probe set
    path: NTKPath | None = field(default=None, init=False)  # the NTK's path for the measured model

    def __post_init__(self) -> None:
        served = (("ntk", self.ntk), ("kernel_change", self.change), ("kernel_regime", self.regime))
        self.metrics = tuple(name for name, options in served if options is not None)

    def setup(self, model: nn.Module, dtype: torch.dtype) -> None:
        """``kernel_regime`` needs the infinite-width limit of the model: the package's FCN, DenseNet or
        random-mask DAG (:func:`~lightning_linearity.metrics.analytic_ntk` says why another has none). Without
        one, ``kernel_regime`` alone is turned off (a warning), the stage's other metrics stay."""
        if self.regime is None:
            return
        net = as_layered_net(model)
        try:
            analytic_ntk(model, torch.zeros(1, net.in_features if net is not None else 1, dtype=dtype))
        except ValueError as err:
            if self.metrics == ("kernel_regime",):
                raise MisconfigurationException(f"kernel_regime: {err}") from err
            message = f"LinearityMonitor: kernel_regime is off for this run: {err} (training continues)"
            warnings.warn(message, stacklevel=2)
            self.regime = None
            self.__post_init__()

    @property
    def _kernel_options(self) -> NTKOptions:
        return self.ntk or NTKOptions()

    def _path(self, ctx: RoundContext) -> NTKPath:
        """The NTK's path for the measured model, decided in its first round (the same on every rank)."""
        if self.path is None or self.path.model is not ctx.model:
            self.path = ntk_path(ctx.model, ctx.probe.x, method=self._kernel_options.method)
        return self.path

    def rows(self, ctx: RoundContext, share: slice) -> dict[str, Tensor]:
        chunk_size = self._kernel_options.chunk_size
        return {"ntk": ntk_share_rows(self._path(ctx), ctx.probe.x, share, chunk_size=chunk_size)}

    def values(self, ctx: RoundContext, rows: dict[str, Tensor]) -> dict[str, float]:
        kernel = ntk_from_share_rows(self._path(ctx), rows["ntk"], chunk_size=self._kernel_options.chunk_size)
        if self.reference is None:
            self.reference, self.reference_step = kernel, ctx.step
            if not ctx.take_references and self.change is not None:
                warnings.warn(
                    f"K_0 was not measured at the start of training (that round failed); kernel_change is "
                    f"measured against K at step {ctx.step} from now on",
                    stacklevel=2,
                )
        self.latest = kernel
        values: dict[str, float] = {}
        if self.ntk is not None:
            spectrum = kernel_spectrum(kernel)
            values[keys.LAMBDA_MIN] = float(spectrum.lambda_min)
            values[keys.LAMBDA_MAX] = float(spectrum.lambda_max)
            values[keys.CONDITION_NUMBER] = float(spectrum.condition_number)
            values[keys.NTK_TRACE] = float(spectrum.trace)
            if ctx.lr is not None:  # the catapult indicator of docs/math.md 2.9, every round K is measured
                values[keys.CATAPULT] = ctx.lr * values[keys.LAMBDA_MAX] / 2
            if self.ntk.pl_ratio and ctx.targets is not None:
                values[keys.PL_RATIO] = float(pl_ratio(ctx.model, ctx.probe.x, ctx.targets))
        if self.regime is not None:
            if self.theta is None:  # Theta depends on the probe set and the architecture, not on w
                self.theta = analytic_ntk(ctx.model, ctx.probe.x).to(kernel)
            k = kernel.shape[0] // self.theta.shape[0]
            limit = torch.kron(self.theta, torch.eye(k, dtype=kernel.dtype, device=kernel.device))
            values[keys.KERNEL_REGIME] = float(relative_kernel_change(kernel, limit, ord=self.regime.ord))
        if self.change is not None:
            change = float(relative_kernel_change(kernel, self.reference.to(kernel), ord=self.change.ord))
            self.change_max = max(self.change_max, change)
            values[keys.KERNEL_CHANGE], values[keys.KERNEL_CHANGE_MAX] = change, self.change_max
        return values

    def missing_reference(self) -> bool:
        return self.reference is None

    def reset(self) -> None:
        self.reference, self.latest, self.change_max, self.reference_step = None, None, 0.0, 0
        self.theta, self.path = None, None

    def state_dict(self) -> dict[str, Any]:
        return {
            "reference": None if self.reference is None else self.reference.cpu(),
            "reference_step": self.reference_step,
            "change_max": self.change_max,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.reference = state["reference"]
        self.reference_step = int(state.get("reference_step", 0))
        self.change_max = float(state["change_max"])


@dataclass
class Hessian(Stage):
    """Spectral norms ||d^2 f_a(w; x_i) / dw^2|| per probe point and output (docs/math.md 2.4), max and mean;
    optionally the same for sampled hidden pre-activations of chosen layers, and where the top eigenvector
    of the output Hessians lives.

    The work splits into units (function, point i, column a), with the function the output or a layer
    (:func:`~lightning_linearity.metrics.split.hessian_units`); rank r takes a contiguous share of them, so
    one probe point's ten outputs already spread over ranks, and every unit keeps the Lanczos start vector
    (and neuron sample) of the full computation: DDP logs what a single process logs.
    """

    options: HessianOptions
    metrics: tuple[str, ...] = ("hessian_norm",)
    name: str = "hessian_norm"
    layers: list[tuple[Layer, str]] = field(default_factory=list, init=False)
    shares: bool = field(default=False, init=False)  # log the top eigenvector's shares

    def setup(self, model: nn.Module, dtype: torch.dtype) -> None:
        self.layers = (
            _resolve_layers(model, self.options.layers, "hessian_norm") if self.options.layers else []
        )
        self.shares = self.options.eigenvector_shares
        if self.shares and as_layered_net(model) is None:
            self.shares = False
            warnings.warn(
                f"LinearityMonitor: hessian_norm's eigenvector_shares is off for this run: the share of a "
                f"layer or neuron is defined for the package's layered networks, not for "
                f"{type(model).__name__} (the norms are still logged)",
                stacklevel=2,
            )

    @property
    def point_limit(self) -> int | None:
        return self.options.num_points

    def _units(self, ctx: RoundContext) -> list[HessianUnit]:
        """Every (function, point, column) of the round: the output, then each layer, point by point."""
        functions = [None, *(layer for layer, _ in self.layers)]
        return hessian_units(ctx.model, self.inputs(ctx), functions, num_neurons=self.options.num_neurons)

    def num_units(self, ctx: RoundContext) -> int:
        return len(self._units(ctx))

    def rows(self, ctx: RoundContext, share: slice) -> dict[str, Tensor]:
        opts = self.options
        rows = hessian_share_rows(
            ctx.model,
            self.inputs(ctx),
            self._units(ctx)[share],
            seed=ctx.seed,
            num_neurons=opts.num_neurons,
            tol=opts.tol,
            max_iter=opts.max_iter,
            method=opts.method,
            eigenvector_shares=self.shares,
        )
        return {"hessian": rows}

    def values(self, ctx: RoundContext, rows: dict[str, Tensor]) -> dict[str, float]:
        measured = hessian_from_rows(self._units(ctx), rows["hessian"])
        names = {None: "", **dict(self.layers)}
        values = {}
        for layer, norms in measured.norms.items():
            suffix = f"/{names[layer]}" if names[layer] else ""
            values[keys.HESSIAN_NORM_MAX + suffix] = float(norms.max())
            values[keys.HESSIAN_NORM_MEAN + suffix] = float(norms.mean())
        if measured.top_shares is not None:
            for group, share in zip(eigenvector_groups(ctx.model), measured.top_shares, strict=True):
                values[keys.eigenvector_share_key(group)] = float(share)
            values[keys.HESSIAN_EIGENVECTOR_NEURON_SHARE] = float(measured.top_neuron_share)
        return values


@dataclass
class Cosines(Stage):
    """Mean |cos| between the gradients of a hidden layer's neurons (docs/math.md 2.5), per layer; rank r
    takes its share of the probe points (the neuron subset is the same on every rank)."""

    options: CosineOptions
    metrics: tuple[str, ...] = ("grad_cosines",)
    name: str = "grad_cosines"
    layers: list[tuple[Layer, str]] = field(default_factory=list, init=False)

    def setup(self, model: nn.Module, dtype: torch.dtype) -> None:
        self.layers = _resolve_layers(model, self.options.layers, "grad_cosines")

    def chosen_options(self) -> dict[str, dict[str, Any]]:
        if self.options.layers is not None or not self.layers:  # named by the user, or not set up yet
            return {}
        return {"grad_cosines": {"layers": [layer for layer, _ in self.layers]}}

    @property
    def point_limit(self) -> int | None:
        return self.options.num_points

    def rows(self, ctx: RoundContext, share: slice) -> dict[str, Tensor]:
        opts, x = self.options, self.inputs(ctx)
        return {
            name: cosine_share_rows(
                ctx.model,
                x,
                share,
                layer,
                seed=ctx.seed,
                num_neurons=opts.num_neurons,
                method=opts.method,
                chunk_size=opts.chunk_size,
            )
            for layer, name in self.layers
        }

    def values(self, ctx: RoundContext, rows: dict[str, Tensor]) -> dict[str, float]:
        return {
            keys.cosine_key(name): float(cosines_from_rows(per_probe)) for name, per_probe in rows.items()
        }


@dataclass
class Linearization(Stage):
    """|f(w; x) - f_lin(w; x)| and R_t = ||w_t - w_0|| (docs/math.md 2.6) against the w_0 kept since the first
    round. One forward pass and one jvp: every rank computes it whole (nothing to gather)."""

    options: LinearizationOptions
    metrics: tuple[str, ...] = ("linearization",)
    name: str = "linearization"
    params_0: dict[str, Tensor] | None = field(default=None, init=False)

    def setup(self, model: nn.Module, dtype: torch.dtype) -> None:
        budget = self.options.memory_budget_mb
        numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
        size_mb = numel * torch.finfo(dtype).bits / 8 / 2**20
        if budget is not None and size_mb > budget:
            raise MisconfigurationException(
                f"linearization keeps a copy of the initial parameters w_0: {size_mb:.1f} MiB in {dtype} for "
                f"{type(model).__name__}, over memory_budget_mb={budget}; raise the budget or drop "
                f"'linearization'"
            )

    def rows(self, ctx: RoundContext, share: slice) -> dict[str, Tensor]:
        if self.params_0 is None:
            self.params_0 = {name: p.detach().clone() for name, p in ctx.model.named_parameters()}
            if not ctx.take_references:
                warnings.warn(
                    f"w_0 was not recorded at the start of training (that round failed); the linearisation "
                    f"is measured around the weights at step {ctx.step} from now on",
                    stacklevel=2,
                )
        return {}

    def values(self, ctx: RoundContext, rows: dict[str, Tensor]) -> dict[str, float]:
        self.params_0 = {
            name: p.to(ctx.probe.x.device) for name, p in self.params_0.items()
        }  # after a resume
        error = linearization_error(ctx.model, self.params_0, ctx.probe.x)
        return {
            keys.LINEARIZATION_ERROR_MEAN: float(error.mean_abs),
            keys.LINEARIZATION_ERROR_MAX: float(error.max_abs),
            keys.LINEARIZATION_ERROR_RELATIVE: float(error.relative),
            keys.DISTANCE_FROM_INIT: float(error.distance),
        }

    def missing_reference(self) -> bool:
        return self.params_0 is None

    def reset(self) -> None:
        self.params_0 = None

    def state_dict(self) -> dict[str, Any]:
        return {"params_0": None if self.params_0 is None else {k: v.cpu() for k, v in self.params_0.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.params_0 = state["params_0"]


@dataclass
class Sharpness(Stage):
    """The loss sharpness on the probe set (docs/math.md 2.9), computed whole on every rank: the top
    eigenvalue of d^2 L / dw^2 and of its Gauss-Newton part, and both against the current step size eta:
    ``edge_of_stability`` = eta * sharpness / 2 (gradient descent is unstable above 1) and ``catapult`` =
    eta * lambda_max(K) / 2 (above 1 at initialisation: the catapult regime). ``catapult`` comes from the
    ``ntk`` stage when ``ntk`` is measured; otherwise from here, for the square loss, whose Gauss-Newton
    top is lambda_max(K) of the probe set (for the cross-entropy it is not: no ``catapult`` from here)."""

    options: SharpnessOptions
    catapult: bool = True  # log ``catapult`` (False when the ``ntk`` stage logs it)
    metrics: tuple[str, ...] = ("sharpness",)
    name: str = "sharpness"

    def rows(self, ctx: RoundContext, share: slice) -> dict[str, Tensor]:
        return {}

    def values(self, ctx: RoundContext, rows: dict[str, Tensor]) -> dict[str, float]:
        opts = self.options
        targets = ctx.targets if opts.loss == "mse" else ctx.probe.y
        if targets is None:
            raise ValueError(
                "sharpness needs probe targets: probe_data=(x, y), or a training set of (x, y) batches"
            )
        measured = loss_sharpness(
            ctx.model,
            ctx.probe.x,
            targets,
            loss=opts.loss,
            generator=ctx.generator(),
            tol=opts.tol,
            max_iter=opts.max_iter,
        )
        values = {
            keys.SHARPNESS: float(measured.eigenvalues[0]),
            keys.SHARPNESS_GAUSS_NEWTON: float(measured.gauss_newton_max),
        }
        if ctx.lr is None:  # shown once (the message does not change)
            warnings.warn(
                "LinearityMonitor: edge_of_stability and catapult are not logged: they need the step size of "
                "an SGD optimiser (adaptive optimisers have no stability threshold in it, docs/math.md 2.9)",
                stacklevel=2,
            )
        else:
            values[keys.EDGE_OF_STABILITY] = ctx.lr * values[keys.SHARPNESS] / 2
            if self.catapult and opts.loss == "mse":
                values[keys.CATAPULT] = ctx.lr * values[keys.SHARPNESS_GAUSS_NEWTON] / 2
        return values


def build_stages(options: Mapping[str, Any]) -> list[Stage]:
    """The stages serving the requested metrics, in a fixed order (the same on every rank)."""
    stages: list[Stage] = []
    if any(name in options for name in ("ntk", "kernel_change", "kernel_regime")):
        stages.append(Kernel(options.get("ntk"), options.get("kernel_change"), options.get("kernel_regime")))
    if "hessian_norm" in options:
        stages.append(Hessian(options["hessian_norm"]))
    if "grad_cosines" in options:
        stages.append(Cosines(options["grad_cosines"]))
    if "linearization" in options:
        stages.append(Linearization(options["linearization"]))
    if "sharpness" in options:
        stages.append(Sharpness(options["sharpness"], catapult="ntk" not in options))
    return stages
