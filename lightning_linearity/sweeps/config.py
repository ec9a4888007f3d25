"""What a width sweep runs: :class:`SweepConfig`, its checks, YAML loading, and the runs it expands to.

A sweep trains (or only initialises) one model per (width, seed) pair, always in the papers' setting:
full-batch gradient descent (SGD, no momentum) on the square loss L = 1/2 sum_i ||f(w; x_i) - y_i||^2 over
the training split, which is also the probe set of every metric. A run is identified by the hash of
everything that determines its result (:meth:`RunSpec.params`), so a sweep is resumable.

YAML configs hold the fields of :class:`SweepConfig`, plus optionally ``claims`` (see
:mod:`lightning_linearity.sweeps.claims`) and ``profiles``: named sets of field overrides, e.g. a reduced
``ci`` profile or a ``paper`` profile with the papers' full width range.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lightning_linearity._compat import MisconfigurationException
from lightning_linearity._text import short_repr
from lightning_linearity.callbacks.linearity_monitor import LinearityMonitor
from lightning_linearity.sweeps.collect import check_metric_specs, curve_specs, monitor_metrics
from lightning_linearity.sweeps.fit import CI_METHODS, MIN_WIDTHS

MODELS = ("NTKFCN", "NTKDenseNet", "MaskedDAGNet")
DATA = ("digits", "gaussian")
MODES = ("train", "init")
FIT_AGAINST = ("width", "min_in_degree")
#: The placeholder in ``model_args.widths`` replaced by the swept width, e.g. ``[1000, m, 1000]``.
WIDTH_PLACEHOLDER = "m"
#: Model arguments the sweep sets itself (the training is always plain full-batch GD on the square loss).
RESERVED_MODEL_ARGS = (
    "in_features",
    "width",
    "init_seed",
    "mask_seed",
    "lr",
    "loss",
    "optimizer",
    "momentum",
    "weight_decay",
)
#: Data arguments the sweep sets itself.
RESERVED_DATA_ARGS = ("full_batch", "shuffle")
DEFAULT_DATA: dict[str, Any] = {
    "name": "digits",
    "classes": [0, 1],
    "num_samples": 10,
    "normalize": "standard",
}


class SweepError(ValueError):
    """A mistake in a sweep's configuration; the command line reports it in one line."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_list(value: object) -> object:
    """A 1-d numpy array or a list of numpy integers as a list of Python ints (YAML gives these already)."""
    if isinstance(value, np.ndarray) and value.ndim == 1:
        value = value.tolist()
    if isinstance(value, list | tuple):
        return [int(v) if isinstance(v, np.integer) else v for v in value]
    return value


#: Most values (every list entry and mapping value counted) a config may hold; YAML aliases can make a small
#: file expand to billions ("billion laughs") or refer to itself.
MAX_CONFIG_VALUES = 100_000


def _check_size(value: Any, where: str) -> None:
    """Refuse a config value that refers to itself or expands to more than :data:`MAX_CONFIG_VALUES`."""
    count, stack, open_ids = 0, [(value, False)], set()
    while stack:
        item, leaving = stack.pop()
        if leaving:
            open_ids.discard(id(item))
            continue
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise SweepError(
                f"{where} holds more than {MAX_CONFIG_VALUES} values (nested YAML aliases?); "
                f"a sweep config is a few fields"
            )
        if isinstance(item, Mapping | list | tuple):
            if id(item) in open_ids:
                raise SweepError(f"{where} refers to itself (a recursive YAML alias); write the values out")
            open_ids.add(id(item))
            stack.append((item, True))
            stack.extend((v, False) for v in (item.values() if isinstance(item, Mapping) else item))


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists and mappings as dicts (JSON/YAML-ready, hash-stable)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class SweepConfig:
    """A width sweep.

    Attributes:
        widths: the swept widths m (positive integers, at least 3 distinct for a slope fit).
        metrics: what to collect, each ``"name"`` or ``"name:reduction"`` (see
            :mod:`lightning_linearity.sweeps.collect`), e.g. ``"kernel_change:max"``, ``"hessian_norm:init"``.
        model: ``"NTKFCN"``, ``"NTKDenseNet"`` or ``"MaskedDAGNet"``.
        model_args: further constructor arguments (``depth``, ``activation``, ``out_features``,
            ``drop_prob``, ...). ``widths: [1000, m, 1000]`` sweeps a bottleneck: every entry ``m`` is
            replaced by the swept width. ``in_features`` comes from the data; ``width``, ``init_seed``,
            ``mask_seed`` and ``lr`` are set per run; ``loss``, ``optimizer``, ``momentum`` and
            ``weight_decay`` are fixed to plain gradient descent on the square loss.
        seeds: one run per seed and width; the seed draws the weights (and the mask of a masked DAG).
        frozen_layers: layers l of docs/math.md 1 (1: the first layer, reading the input; L + 1: the output
            layer) whose weight (and bias) are frozen (``requires_grad=False``): gradient descent leaves
            them at their initial values and no metric counts them among the parameters w (docs/math.md
            2: the NTK, the Hessian and the infinite-width kernel sum over the trainable parameters only).
        mode: ``"train"`` (full-batch gradient descent) or ``"init"`` (metrics at the initialisation only).
        data: ``name`` (``"digits"`` or ``"gaussian"``) and the data module's arguments; the data are the
            same for every run (their own ``seed``, default 0).
        max_steps: gradient-descent steps at most (mode ``"train"``).
        loss_threshold: stop once the training loss is below this (``None``: run ``max_steps``).
        lr: a fixed step size, or ``None`` to use ``lr_scale``.
        lr_scale: step size eta = lr_scale / lambda_max(K_0), with K_0 the NTK of each run's model at init
            on the training batch. Gradient descent on the square loss is stable in the linear regime for
            eta < 2 / lambda_max; near that edge it enters the "catapult" regime, where the kernel moves a
            lot at any width.
        every_n_steps: a metric round every this many steps (``None``: only at init and at the end).
        monitor_args: per-metric options for :class:`~lightning_linearity.callbacks.LinearityMonitor`,
            e.g. ``{"hessian_norm": {"max_iter": 200}, "grad_cosines": {"num_neurons": 128}}``.
        out: output folder (CSV, markdown table, PNG plots, histories).
        jobs: runs in parallel processes.
        threads: torch intra-op threads per run (``None``: the cores divided among the jobs; with one job,
            torch's default). Not part of a run's identity.
        fit_against: the width the slopes are fitted against: ``"width"``, the swept m, or
            ``"min_in_degree"``, 004 Def. 2.7's width (the minimum in-degree over the neurons of layers
            2..L+1, recorded per run), which Theorem 3.6 is stated in. They agree for an FCN; a DenseNet's
            layers also read the input, so its in-degree is m + d (+ more for deeper layers).
        ci: slope interval, ``"t"`` (regression) or ``"bootstrap"``.
        confidence: level of the slope interval.
        reference_slope: slope of the reference line drawn in the plots (1/sqrt(m): -0.5; ``None``: none).
        log_corrected: also fit log y = a + alpha log m + b log log m, with alpha free and with alpha fixed
            at ``reference_slope`` (:func:`~lightning_linearity.sweeps.fit.fit_log_corrected`), and report b.
        curves: quantities (names of :mod:`~lightning_linearity.sweeps.collect`, not per layer) to plot
            against the training step, one line per width (first seed), e.g. ``["lambda_min_retained"]``.
        name: the sweep's name, used in titles.
        progress: show a progress bar over the runs.
        claims: the papers' claims to check (see :mod:`lightning_linearity.sweeps.claims`).
    """

    widths: tuple[int, ...]
    metrics: tuple[str, ...]
    model: str = "NTKFCN"
    model_args: Mapping[str, Any] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)
    frozen_layers: tuple[int, ...] = ()
    mode: str = "train"
    data: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_DATA))
    max_steps: int = 1000
    loss_threshold: float | None = 1e-4
    lr: float | None = None
    lr_scale: float | None = 0.5
    every_n_steps: int | None = 10
    monitor_args: Mapping[str, Any] = field(default_factory=dict)
    out: str = "sweep"
    jobs: int = 1
    threads: int | None = None
    fit_against: str = "width"
    ci: str = "t"
    confidence: float = 0.95
    reference_slope: float | None = -0.5
    log_corrected: bool = False
    name: str = "sweep"
    progress: bool = True
    claims: tuple[Mapping[str, Any], ...] = ()
    curves: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("model_args", "data", "monitor_args", "claims"):
            _check_size(getattr(self, name), name)
        for name in ("widths", "metrics", "seeds", "frozen_layers", "claims", "curves"):
            plain = name in ("widths", "seeds", "frozen_layers")
            value = _as_list(getattr(self, name)) if plain else getattr(self, name)
            if isinstance(value, str | bytes) or not isinstance(value, Sequence):
                raise SweepError(f"{name} must be a list, got {short_repr(value)}")
            object.__setattr__(self, name, tuple(value))
        for name in ("model_args", "data", "monitor_args"):
            if not isinstance(getattr(self, name), Mapping):
                raise SweepError(f"{name} must be a mapping, got {short_repr(getattr(self, name))}")
            object.__setattr__(self, name, _plain(getattr(self, name)))
        self._check()

    # ------------------------------------------------------------------------------------- checks
    def _check(self) -> None:
        bad = [w for w in self.widths if not _is_int(w) or w < 1]
        if bad or not self.widths:
            raise SweepError(f"widths must be positive integers, got {list(self.widths)!r}")
        if len(set(self.widths)) != len(self.widths):
            raise SweepError(f"widths must not repeat, got {list(self.widths)}")
        if len(self.widths) < MIN_WIDTHS:
            raise SweepError(f"a slope fit needs at least {MIN_WIDTHS} widths, got {list(self.widths)}")
        if (
            not self.seeds
            or any(not _is_int(s) or s < 0 for s in self.seeds)
            or any(s >= 2**64 for s in self.seeds)
            or len(set(self.seeds)) != len(self.seeds)
        ):
            raise SweepError(
                f"seeds must be distinct non-negative integers below 2**64, got {list(self.seeds)!r}"
            )
        frozen = self.frozen_layers
        if any(not _is_int(l) or l < 1 for l in frozen) or len(set(frozen)) != len(frozen):
            raise SweepError(
                f"frozen_layers must be distinct layer numbers l >= 1 (1: the first layer), "
                f"got {list(self.frozen_layers)!r}"
            )
        if self.model not in MODELS:
            raise SweepError(f"model must be one of {list(MODELS)}, got {short_repr(self.model)}")
        if self.mode not in MODES:
            raise SweepError(f"mode must be one of {list(MODES)}, got {short_repr(self.mode)}")
        reserved = sorted(set(self.model_args) & set(RESERVED_MODEL_ARGS))
        if reserved:
            raise SweepError(f"model_args must not set {reserved}: the sweep sets them per run")
        template = self.model_args.get("widths")
        if template is not None and (not isinstance(template, list) or WIDTH_PLACEHOLDER not in template):
            raise SweepError(
                f"model_args.widths must be a list containing the placeholder {WIDTH_PLACEHOLDER!r} for the "
                f"swept width, e.g. [1000, {WIDTH_PLACEHOLDER}, 1000]; got {short_repr(template)}"
            )
        if self.data.get("name") not in DATA:
            raise SweepError(f"data.name must be one of {list(DATA)}, got {self.data.get('name')!r}")
        reserved = sorted(set(self.data) & set(RESERVED_DATA_ARGS))
        if reserved:
            raise SweepError(f"data must not set {reserved}: a sweep trains with full-batch gradient descent")
        if not _is_int(self.max_steps) or self.max_steps < 1:
            raise SweepError(f"max_steps must be a positive integer, got {short_repr(self.max_steps)}")
        if self.every_n_steps is not None and (not _is_int(self.every_n_steps) or self.every_n_steps < 1):
            raise SweepError(
                f"every_n_steps must be a positive integer or null, got {short_repr(self.every_n_steps)}"
            )
        if self.loss_threshold is not None and not _positive(self.loss_threshold):
            raise SweepError(
                f"loss_threshold must be a positive number or null, got {short_repr(self.loss_threshold)}"
            )
        if (self.lr is None) == (self.lr_scale is None):
            raise SweepError(
                "give exactly one of lr (a fixed step size) and lr_scale (eta = lr_scale / lambda_max(K_0))"
            )
        for name in ("lr", "lr_scale"):
            value = getattr(self, name)
            if value is not None and not _positive(value):
                raise SweepError(f"{name} must be a positive number, got {short_repr(value)}")
        if not _is_int(self.jobs) or self.jobs < 1:
            raise SweepError(f"jobs must be a positive integer, got {short_repr(self.jobs)}")
        if self.threads is not None and (not _is_int(self.threads) or self.threads < 1):
            raise SweepError(f"threads must be a positive integer or null, got {short_repr(self.threads)}")
        if self.reference_slope is not None and (
            not isinstance(self.reference_slope, int | float)
            or isinstance(self.reference_slope, bool)
            or not math.isfinite(self.reference_slope)
        ):
            raise SweepError(
                f"reference_slope must be a number or null, got {short_repr(self.reference_slope)}"
            )
        if self.fit_against not in FIT_AGAINST:
            raise SweepError(
                f"fit_against must be one of {list(FIT_AGAINST)}, got {short_repr(self.fit_against)}"
            )
        if self.ci not in CI_METHODS:
            raise SweepError(f"ci must be one of {list(CI_METHODS)}, got {short_repr(self.ci)}")
        if not _positive(self.confidence) or self.confidence >= 1:
            raise SweepError(f"confidence must be in (0, 1), got {short_repr(self.confidence)}")
        if not isinstance(self.out, str | Path) or not str(self.out).strip():
            raise SweepError(
                f"out must be an output folder path (a non-empty string), got {short_repr(self.out)}"
            )
        if not isinstance(self.name, str):
            raise SweepError(f"name must be a string (the sweep's title), got {short_repr(self.name)}")
        if not isinstance(self.progress, bool):
            raise SweepError(f"progress must be true or false, got {short_repr(self.progress)}")
        if not isinstance(self.log_corrected, bool):
            raise SweepError(f"log_corrected must be true or false, got {short_repr(self.log_corrected)}")
        if self.log_corrected and self.reference_slope is None:
            raise SweepError(
                "log_corrected needs reference_slope, the exponent alpha fixed in one of its fits"
            )
        for metric, options in self.monitor_args.items():
            if not isinstance(options, Mapping):
                raise SweepError(
                    f"monitor_args[{metric!r}] must be a mapping of that metric's options, e.g. "
                    f"{{max_iter: 200}}; got {short_repr(options)}"
                )
        for claim in self.claims:
            if not isinstance(claim, Mapping):
                raise SweepError(
                    f"each claim must be a mapping (column, slope, ...), got {short_repr(claim)}"
                )
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise SweepError(f"the output folder {self.out!r} is a file; give a folder path")
        try:
            check_metric_specs(self.metrics, self.mode)
            self.monitor_options()
        except (ValueError, MisconfigurationException) as err:
            raise SweepError(str(err)) from None

    def monitor_options(self) -> dict[str, dict[str, Any]]:
        """The options of every :class:`LinearityMonitor` metric the runs measure, defaults resolved.

        Part of every run's identity: a run measured under other monitor defaults is a different run.
        """
        specs = [*check_metric_specs(self.metrics, self.mode), *curve_specs(self.curves, self.mode)]
        options = monitor_metrics(specs, self.monitor_args)
        return LinearityMonitor(metrics=options, plots=False).settings()["metrics"]

    # ------------------------------------------------------------------------------------- runs
    def runs(self) -> list[RunSpec]:
        """One :class:`RunSpec` per (width, seed), widths ascending."""
        return [RunSpec(self, width, seed) for width in sorted(self.widths) for seed in self.seeds]

    def model_kwargs(self, width: int) -> dict[str, Any]:
        """``model_args`` at width ``width``: the placeholder in ``widths`` replaced, ``width`` set."""
        kwargs = dict(self.model_args)
        if "widths" in kwargs:
            kwargs["widths"] = [width if w == WIDTH_PLACEHOLDER else w for w in kwargs["widths"]]
        kwargs["width"] = width
        return kwargs

    def data_kwargs(self) -> dict[str, Any]:
        """The data module's arguments (without ``name``), full-batch."""
        kwargs = {k: v for k, v in self.data.items() if k != "name"}
        return {**kwargs, "full_batch": True, "shuffle": False}


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: the config at one width and one seed."""

    config: SweepConfig
    width: int
    seed: int

    def params(self) -> dict[str, Any]:
        """Everything that determines this run's result (not where it is written, nor how it is reported)."""
        c = self.config
        # frozen_layers only when set: the runs of a sweep without it keep their identity (and results)
        frozen = {"frozen_layers": sorted(c.frozen_layers)} if c.frozen_layers else {}
        return _plain(
            {
                **frozen,
                "model": c.model,
                "model_args": c.model_kwargs(self.width),
                "seed": self.seed,
                "data": c.data,
                "mode": c.mode,
                "max_steps": c.max_steps if c.mode == "train" else 0,
                "loss_threshold": c.loss_threshold if c.mode == "train" else None,
                "lr": c.lr,
                "lr_scale": c.lr_scale,
                "every_n_steps": c.every_n_steps if c.mode == "train" else None,
                "metrics": sorted(c.metrics),
                "monitor": c.monitor_options(),
            }
        )

    @property
    def run_id(self) -> str:
        """First 16 hex digits of the SHA-256 of :meth:`params` as canonical JSON."""
        text = json.dumps(self.params(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------- loading
CONFIG_FIELDS = tuple(f.name for f in fields(SweepConfig))


def load_config_file(path: str | Path, profile: str | None = None) -> dict[str, Any]:
    """The fields of a YAML sweep config, with the overrides of ``profile`` applied.

    Raises:
        SweepError: missing or unreadable file, invalid YAML, not a mapping, unknown keys, unknown or
            malformed profile, a file that refers to itself or expands to more than
            :data:`MAX_CONFIG_VALUES` values (all in one line).
    """
    if not isinstance(path, str | Path):
        raise SweepError(f"the config path must be a file path (str), got {short_repr(path)}")
    path = Path(path)
    where = f"config file {str(path)!r}"
    if path.is_dir():
        raise SweepError(f"{where} is a folder; give the path of a YAML file")
    if not path.is_file():
        raise SweepError(f"{where} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise SweepError(f"{where} is not valid YAML: {_yaml_problem(err)}") from None
    except UnicodeDecodeError as err:
        raise SweepError(f"{where} is not UTF-8 text (byte {err.start}); a sweep config is YAML") from None
    except OSError as err:
        raise SweepError(f"{where} cannot be read: {err.strerror or err}") from None
    except RecursionError:
        raise SweepError(f"{where} is nested too deeply to be a sweep config") from None
    if not isinstance(raw, Mapping):
        raise SweepError(f"{where} must hold a mapping of sweep fields")
    _check_size(raw, where)
    raw = dict(raw)
    profiles = raw.pop("profiles", None) or {}
    check_fields(raw, where)
    if not isinstance(profiles, Mapping):
        raise SweepError(f"{where}: profiles must be a mapping name -> overrides, got {short_repr(profiles)}")
    if profile is not None:
        if profile not in profiles:
            names = sorted(map(str, profiles))
            raise SweepError(f"{where} has no profile {profile!r}; profiles: {names}")
        overrides = profiles[profile]
        if not isinstance(overrides, Mapping):
            raise SweepError(
                f"{where}: profile {profile!r} must be a mapping of field overrides, got "
                f"{short_repr(overrides)}"
            )
        check_fields(overrides, f"profile {profile!r}")
        raw.update(overrides)
    return raw


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's own message spans several lines)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or " ".join(str(err).split())
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def check_fields(values: Mapping[str, Any], where: str) -> None:
    if not isinstance(values, Mapping):
        raise SweepError(f"{where} must be a mapping of sweep fields, got {short_repr(values)}")
    unknown = sorted(set(values) - set(CONFIG_FIELDS), key=repr)
    if unknown:
        raise SweepError(f"{where}: unknown field(s) {unknown}; valid fields: {list(CONFIG_FIELDS)}")


def make_config(values: Mapping[str, Any]) -> SweepConfig:
    """A :class:`SweepConfig` from a mapping of fields (missing required fields are a :class:`SweepError`)."""
    check_fields(values, "sweep config")
    missing = [name for name in ("widths", "metrics") if values.get(name) is None]
    if missing:
        raise SweepError(
            f"the sweep needs {' and '.join(missing)} (in the config file or on the command line)"
        )
    try:
        return SweepConfig(**values)
    except TypeError as err:
        raise SweepError(f"bad sweep config: {err}") from None
