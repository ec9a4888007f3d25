r"""
Linearity Monitor
=================

Log the "transition to linearity" metrics of docs/math.md section 2 (empirical NTK spectrum, kernel change,
Hessian spectral norm, neuron gradient cosines, linearisation error) while a model trains, on one device
or under DDP, through whatever loggers the Trainer has.
"""

from __future__ import annotations

import copy
import importlib
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from lightning_utilities.core.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_linearity import keys
from lightning_linearity._compat import Callback, MisconfigurationException, classes
from lightning_linearity._text import short_repr
from lightning_linearity.callbacks._distributed import agree, gather_rows, probe_share
from lightning_linearity.callbacks._isolation import training_untouched
from lightning_linearity.callbacks._probe import (
    DEFAULT_PROBE_SIZE,
    PROBE_SELECTIONS,
    ProbeSelection,
    ProbeSet,
    explicit_probe,
    probe_from_loader,
)
from lightning_linearity.callbacks._schedule import OverheadBudget, StepSchedule, check_steps
from lightning_linearity.callbacks._stages import (
    Kernel,
    RoundContext,
    Stage,
    build_stages,
    options_settings,
    parse_metrics,
)
from lightning_linearity.keys import PREFIX, PROGRESS_BAR_KEY, SUMMARY_KEYS
from lightning_linearity.metrics import as_layered_net, evaluate
from lightning_linearity.metrics.pl import square_loss_targets

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import Strategy

#: A round whose previous round took longer than this (seconds), or that has run this long, reports its parts.
PROGRESS_AFTER = 5.0
#: Metrics measured when ``metrics`` is not given (``linearization`` keeps a copy of w_0: opt in).
DEFAULT_METRICS = ("ntk", "kernel_change", "hessian_norm", "grad_cosines")


class LinearityMonitor(Callback):
    r"""Measure and log transition-to-linearity metrics during training (docs/math.md section 2).

    All metrics are evaluated at the current parameters on one fixed probe set X. A *metric round* runs

    * at the start of training, before the first optimiser step: K_0 = K(w_0) (and w_0 for
      ``linearization``) are recorded there and kept, also across a resume from a checkpoint;
    * every ``every_n_steps`` optimiser steps (``trainer.global_step``, so gradient accumulation is
      respected), at ``log_spaced`` steps per decade, at the listed ``steps``, every ``every_n_epochs``
      epochs if set (any of them that are set), and at the end of training; with ``max_overhead`` the
      rounds are also spaced so that they take at most that share of the wall time (see
      :mod:`lightning_linearity.callbacks._schedule`);
    * never during the sanity check, and not at all under ``fast_dev_run``.

    Values are logged under ``linearity/`` against ``trainer.global_step`` through every logger of the
    trainer (CSV, TensorBoard, W&B, ...), from rank zero only; they are also put in
    ``trainer.callback_metrics`` (so ``ModelCheckpoint`` / ``EarlyStopping`` can monitor them) and kept
    in :attr:`history`. Logged keys (see :mod:`lightning_linearity.callbacks._stages`):

    ``ntk``: ``lambda_min``, ``lambda_max``, ``condition_number``, ``ntk_trace`` of K (docs/math.md 2.1, 2.2),
    and ``pl_ratio`` = ||grad L||^2 / (2 L) for the square loss when the probe set has targets;
    ``kernel_change``: ||K_t - K_0|| / ||K_0|| (2.3) and its running maximum ``kernel_change_max``;
    ``hessian_norm``: ``hessian_norm_max`` / ``hessian_norm_mean`` over probes and outputs of
    ||d^2 f_a(w; x_i) / dw^2||_2 (2.4), optionally per hidden layer ``hessian_norm_max/layer_2``, ..., and
    (``eigenvector_shares``, the package's networks) where the top eigenvector of the output Hessians
    lives, ``hessian_eigenvector_share/layer_1``, ... and ``hessian_eigenvector_neuron_share``;
    ``grad_cosines``: ``grad_cosine/layer_2``, ... mean |cos| between neuron gradients (2.5);
    ``linearization``: ``linearization_error_mean`` / ``_max`` / ``_relative`` and ``distance_from_init``
    (2.6); ``kernel_regime``: ||K_t - kron(Theta, I_k)|| / ||kron(Theta, I_k)||, the distance from the
    infinite-width NTK (2.8; the package's networks); ``sharpness``: the top eigenvalue of the loss Hessian
    on the probe set, of its Gauss-Newton part, and against the optimiser's current step size eta (SGD;
    divided by 1 + beta with momentum beta: the step of plain gradient descent with the same threshold),
    ``edge_of_stability`` = eta * sharpness / 2 and ``catapult`` = eta * lambda_max(K) / 2 (2.9; ``catapult``
    is also logged by ``ntk`` whenever the optimiser's step size is known).

    The metrics see the LightningModule itself (never the DDP wrapper): the package's networks through
    their ``layered_net`` (fast structured paths), any other module through the per-module engine where it
    applies, else ``torch.func`` (generic paths). They run in eval mode, with autocast off, in float32
    (float64 under ``precision="64-true"`` or with ``dtype="float64"``; a model held in another dtype is
    measured on a cast copy), and leave the parameters, ``.grad``, optimiser state, train/eval modes and
    random states exactly as they were.

    Under DDP every rank computes a share of the probe points (the NTK factor rows of its points, the
    Hessian norms and |cos| of its points: each metric's work split, :mod:`lightning_linearity.metrics.ntk`
    and :mod:`lightning_linearity.metrics.split`); the strategy's all-gather puts the pieces together, so
    every rank ends the round with the values a single process would log. Before each collective that a
    failure could skip, the ranks agree on success, so a metric failing on one rank is skipped on all of
    them and nobody waits forever.

    Args:
        metrics: names out of ``ntk``, ``kernel_change``, ``hessian_norm``, ``grad_cosines``,
            ``linearization``, ``kernel_regime``, ``sharpness``; or a mapping from name to that metric's
            options, e.g. ``{"hessian_norm": {"num_points": 8}, "grad_cosines": {"layers": ["net.0"]}}``.
            Options:
            ``ntk``: ``method``, ``chunk_size``, ``pl_ratio``; ``kernel_change``: ``ord``
            (``"spectral"``/``"fro"``); ``hessian_norm``: ``num_points`` (default 1), ``tol``, ``max_iter``,
            ``layers``, ``num_neurons``, ``method``, ``eigenvector_shares``; ``grad_cosines``: ``layers``,
            ``num_points`` (default 8), ``num_neurons`` (default 32), ``method``, ``chunk_size``;
            ``linearization``: ``memory_budget_mb``; ``kernel_regime``: ``ord``; ``sharpness``: ``loss``,
            ``tol``, ``max_iter`` (see the option classes in :mod:`lightning_linearity.callbacks._stages`).
            To measure a costly metric less often than the others, see ``every_n_rounds``.
        every_n_steps: a round every this many optimiser steps; ``None`` for none.
        every_n_epochs: a round at the end of every this many training epochs; ``None`` (default) for none.
        probe_size: number of probe points; default: all of ``probe_data``, else 32 training points.
        probe_data: the probe set, as inputs ``x`` or a pair ``(x, y)``; default: taken from the training
            data set at the start of fit (by index, the same on every rank).
        probe_selection: ``"first"``: the training set's first ``probe_size`` points; ``"random"``: a random
            subset drawn with ``seed``.
        seed: seeds the random probe subset, the sampled neurons and the Lanczos start vectors (never the
            global random state); the same in every round, so the same neurons are followed.
        dtype: ``"float32"`` or ``"float64"`` for the metrics; ``None``: float64 under 64-bit precision,
            float32 otherwise (also under mixed precision).
        on_error: a metric that fails ``"warn"`` s (once per distinct reason) and is skipped for that round,
            or ``"raise"`` s on every rank. NaN/inf in the model is always only reported, once.
        progress_bar: show a one-line summary (``lmin``, ``dK``, ``H``, ``lin``) in the progress bar.
        plots: at the end of training write the report figures (curves, NTK spectrum at init and at the
            end) with :func:`lightning_linearity.plots.write_report`.
        every_n_rounds: measure a metric only in every n-th round, e.g. ``{"hessian_norm": 4}`` for the
            costliest one: rounds 0, 4, 8, ... (counted from the first, which always measures everything;
            ``ntk`` and ``kernel_change`` share their kernel, so the smaller period serves both).
        log_spaced: rounds at this many log-spaced steps per decade (1, 2, 3, 6, 10, 18, ... for 4): dense
            early, where the kernel moves most. Combine with ``every_n_steps=None`` for log spacing only.
        steps: rounds at these global steps (e.g. ``[10, 100, 1000]``).
        max_overhead: keep the rounds' share of the wall time under this fraction (e.g. ``0.1``): after
            each round the monitor plans the next from the time rounds and training steps took; due steps
            whose round would not fit are skipped, and with no other schedule (``every_n_steps=None``) the
            rounds run as often as the budget allows. The share so far is logged as ``overhead``.
        output_transform: for a model whose forward returns more than one tensor (a tuple, a dict, a
            dataclass): a function of that output returning the (n, k) tensor f(w; x) to measure, e.g.
            ``lambda out: out[0]``. It is applied to every forward pass of the metrics (a forward hook on
            the module while a round runs), and the metrics then take the paths for foreign models.

    Every round also logs the wall time of each part, ``seconds/<part>`` (``seconds/round`` in all), so
    the cost of each metric is visible; parts of a round that runs longer than a few seconds are reported
    as they start and finish.

    Raises:
        MisconfigurationException: at init for an unknown metric or option, ``every_n_steps < 1``, a
            ``probe_size`` larger than ``probe_data``; at setup for a sharded strategy (FSDP, DeepSpeed),
            a layer that does not exist, ``linearization`` over its memory budget; at the start of
            training for a ``probe_size`` larger than the training data.

    Example::

        >>> from lightning_linearity import LinearityMonitor
        >>> monitor = LinearityMonitor(metrics=("ntk", "kernel_change"), every_n_steps=10)
    """

    def __init__(
        self,
        metrics: Sequence[str] | Mapping[str, Mapping[str, Any] | None] = DEFAULT_METRICS,
        every_n_steps: int | None = 50,
        every_n_epochs: int | None = None,
        probe_size: int | None = None,
        probe_data: Tensor | Sequence[Tensor] | None = None,
        probe_selection: ProbeSelection = "first",
        seed: int = 0,
        dtype: Literal["float32", "float64"] | None = None,
        on_error: Literal["warn", "raise"] = "warn",
        progress_bar: bool = False,
        plots: bool = True,
        every_n_rounds: Mapping[str, int] | None = None,
        log_spaced: int | None = None,
        steps: Sequence[int] | None = None,
        max_overhead: float | None = None,
        output_transform: Callable[[Any], Tensor] | None = None,
    ) -> None:
        periods = {"every_n_steps": every_n_steps, "every_n_epochs": every_n_epochs, "log_spaced": log_spaced}
        for name, value in periods.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise MisconfigurationException(
                    f"LinearityMonitor: {name} must be an integer >= 1 or None, got {short_repr(value)}"
                )
        if probe_size is not None and (
            isinstance(probe_size, bool) or not isinstance(probe_size, int) or probe_size < 1
        ):
            raise MisconfigurationException(
                f"LinearityMonitor: probe_size must be an integer >= 1, got {short_repr(probe_size)}"
            )
        if probe_selection not in PROBE_SELECTIONS:
            raise MisconfigurationException(
                f"LinearityMonitor: probe_selection must be one of {PROBE_SELECTIONS}, "
                f"got {short_repr(probe_selection)}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise MisconfigurationException(
                f"LinearityMonitor: seed must be an integer, got {short_repr(seed)}"
            )
        if dtype not in (None, "float32", "float64"):
            raise MisconfigurationException(
                f"LinearityMonitor: dtype must be 'float32', 'float64' or None, got {short_repr(dtype)}"
            )
        if on_error not in ("warn", "raise"):
            raise MisconfigurationException(
                f"LinearityMonitor: on_error must be 'warn' or 'raise', got {short_repr(on_error)}"
            )
        if max_overhead is not None and (
            isinstance(max_overhead, bool)
            or not isinstance(max_overhead, int | float)
            or not 0 < max_overhead < 1
        ):
            raise MisconfigurationException(
                f"LinearityMonitor: max_overhead must be a fraction of the wall time in (0, 1), e.g. 0.1, "
                f"or None, got {short_repr(max_overhead)}"
            )
        try:
            self.steps = check_steps(steps)
        except ValueError as err:
            raise MisconfigurationException(f"LinearityMonitor: {err}") from err
        if output_transform is not None and not callable(output_transform):
            raise MisconfigurationException(
                f"LinearityMonitor: output_transform must be a callable picking the (n, k) tensor out of the "
                f"model's output, e.g. lambda out: out[0]; got {short_repr(output_transform)}"
            )
        self.output_transform = output_transform
        self.options = parse_metrics(metrics)
        self.every_n_rounds = _check_every_n_rounds(every_n_rounds, self.options)
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.log_spaced = log_spaced
        self.max_overhead = max_overhead
        self._schedule = StepSchedule(every_n_steps, log_spaced, self.steps)
        self._budget = OverheadBudget(max_overhead if max_overhead is not None else 1.0)
        self.probe_size = probe_size
        self.probe_selection = probe_selection
        self.seed = seed
        self.dtype = dtype
        self.on_error = on_error
        self.progress_bar = progress_bar
        self.plots = plots
        self._given_probe = None if probe_data is None else explicit_probe(probe_data, probe_size)
        self._stages: list[Stage] = build_stages(self.options)
        self._active: list[Stage] = list(self._stages)  # those that passed their setup in this fit

        # state of the current run (reset at setup, restored by load_state_dict)
        self.probe: ProbeSet | None = None
        self.history: list[dict[str, float]] = []
        self._last_step = -1
        self._rounds = 0  # rounds run so far (for every_n_rounds)
        # per-fit working state
        self._enabled = True
        self._compute_dtype = torch.float32
        self._targets: Tensor | None = None
        self._cast_model: nn.Module | None = None
        self._warned: set[tuple] = set()

    # ------------------------------------------------------------------------------------- identity
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(metrics=sorted(self.options))

    def settings(self) -> dict[str, Any]:
        """The constructor options, as plain values (for the loggers' run config)."""
        if self._given_probe is not None:
            probe_size, probe_data = len(self._given_probe), f"given: {len(self._given_probe)} points"
        else:
            probe_size, probe_data = self.probe_size or DEFAULT_PROBE_SIZE, None
        metrics = options_settings(self.options)
        for stage in self._active:  # what a stage chose itself (e.g. the cosines' layers) at setup
            for name, chosen in stage.chosen_options().items():
                metrics[name].update(chosen)
        return {
            "metrics": metrics,
            "every_n_steps": self.every_n_steps,
            "every_n_epochs": self.every_n_epochs,
            "log_spaced": self.log_spaced,
            "steps": list(self.steps),
            "max_overhead": self.max_overhead,
            "probe_size": probe_size,
            "probe_data": probe_data,
            "probe_selection": self.probe_selection,
            "seed": self.seed,
            "dtype": self.dtype,
            "on_error": self.on_error,
            "progress_bar": self.progress_bar,
            "plots": self.plots,
            "every_n_rounds": dict(self.every_n_rounds),
            "output_transform": None if self.output_transform is None else repr(self.output_transform),
        }

    @property
    def spectra(self) -> dict[str, np.ndarray]:
        """Eigenvalues of K_0 (``"init"``) and of the last round's K (``"final"``) when the NTK ran."""
        kernel = next((stage for stage in self._stages if isinstance(stage, Kernel)), None)
        if kernel is None:
            return {}
        matrices = {"init": kernel.reference, "final": kernel.latest}
        return {
            name: torch.linalg.eigvalsh(matrix.double()).cpu().numpy()
            for name, matrix in matrices.items()
            if matrix is not None
        }

    # ------------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.probe, self.history, self._last_step, self._rounds = None, [], -1, 0
        self._cast_model, self._targets, self._warned = None, None, set()
        for metric_stage in self._stages:
            metric_stage.reset()
        self._enabled = not trainer.fast_dev_run
        if not self._enabled:
            rank_zero_info("LinearityMonitor: fast_dev_run is set, so no metric round will run.")
            return
        _check_strategy(trainer.strategy)
        if self.dtype is not None:
            self._compute_dtype = getattr(torch, self.dtype)
        else:
            self._compute_dtype = torch.float64 if str(trainer.precision).startswith("64") else torch.float32
        model = self._measured_module(pl_module)
        self._active = [stage for stage in self._stages if self._set_up(stage, model)]
        if trainer.is_global_zero:
            self._guarded(
                "preparing the loggers",
                "lightning_linearity.loggers",
                "prepare_loggers",
                trainer,
                self.settings(),
            )

    def _choose_probe(self, trainer: pl.Trainer) -> None:
        """The probe set: restored from a checkpoint (kept, with a warning if the settings now ask for another
        one, since K_0 and w_0 were measured on it), given, or taken from the training data."""
        if self.probe is not None:
            restored = len(self.probe)
            asked = len(self._given_probe) if self._given_probe is not None else self.probe_size
            differs = self._given_probe is not None and not torch.equal(
                self._given_probe.x.to(self.probe.x), self.probe.x
            )
            if differs or (asked is not None and asked != restored):
                what = "probe_data" if self._given_probe is not None else f"probe_size={asked}"
                rank_zero_warn(
                    f"LinearityMonitor: resuming with the checkpoint's probe set of {restored} points, on "
                    f"which K_0 and w_0 were measured; the {what} given now is not used (start a new run to "
                    f"change it)"
                )
            return
        self.probe = self._given_probe or probe_from_loader(
            trainer.train_dataloader, self.probe_size or DEFAULT_PROBE_SIZE, self.probe_selection, self.seed
        )

    def _set_up(self, stage: Stage, model: nn.Module) -> bool:
        """Check a stage against the model; a mismatch (a layer that is not there, a budget exceeded) is
        fatal under ``on_error="raise"``, else a warning that turns the stage's metrics off for this fit."""
        try:
            stage.setup(model, self._compute_dtype)
        except Exception as err:
            if self.on_error == "raise":
                raise
            rank_zero_warn(
                f"LinearityMonitor: {', '.join(stage.metrics)} is off for this run: {err} "
                f"(training continues; on_error='warn')"
            )
            return False
        return True

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._enabled:
            return
        device = pl_module.device
        with training_untouched(pl_module, device):
            try:
                self._choose_probe(trainer)
            except Exception as err:  # the same on every rank: the data set is indexed alike everywhere
                if self.on_error == "raise":
                    raise
                rank_zero_warn(
                    f"LinearityMonitor: no probe set, so no metric is measured in this run: {err} "
                    f"(training continues; on_error='warn')"
                )
                self._enabled = False
                return
            self.probe = self.probe.to(device, self._compute_dtype)
            self._targets = self._encode_targets(pl_module)
        missing = [name for stage in self._active if stage.missing_reference() for name in stage.metrics]
        if missing and trainer.global_step > 0:
            rank_zero_warn(
                f"LinearityMonitor: training resumes at step {trainer.global_step} without the references "
                f"from the initialisation for {missing} (no LinearityMonitor state in the checkpoint); they "
                f"are measured from the weights at step {trainer.global_step} instead"
            )
        self._budget.start(trainer.global_step)
        if missing or self._last_step < 0:
            self._round(trainer, pl_module, take_references=True)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self._schedule.fixed:
            if not self._schedule.due(step):
                return
        elif self.max_overhead is None:
            return  # every_n_epochs only
        if self.max_overhead is not None and not self._budget_allows(trainer, step):
            return
        self._round(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs is None or (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        if self.max_overhead is None or self._budget_allows(trainer, trainer.global_step):
            self._round(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._enabled:
            return
        self._round(trainer, pl_module)
        if self.history:
            steps = [int(row["step"]) for row in self.history]
            shown = ", ".join(map(str, steps[:12])) + (", ..." if len(steps) > 12 else "")
            budget = f" (budget {100 * self.max_overhead:.0f}%)" if self.max_overhead is not None else ""
            rank_zero_info(
                f"LinearityMonitor: {len(steps)} rounds (steps {shown}) took "
                f"{100 * self._budget.share():.1f}% of the wall time{budget}"
            )
        if self.plots and trainer.is_global_zero and self.history:
            self._guarded(
                "writing the report figures",
                "lightning_linearity.plots",
                "write_report",
                trainer,
                history=self.history,
                spectra=self.spectra,
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._cast_model = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "probe": None if self.probe is None else self.probe.state_dict(),
            "last_step": self._last_step,
            "rounds": self._rounds,
            "history": self.history,
            "stages": {type(stage).__name__: stage.state_dict() for stage in self._stages},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        probe = state_dict["probe"]
        self.probe = None if probe is None else ProbeSet(probe["x"], probe["y"])
        self._last_step = int(state_dict["last_step"])
        self.history = list(state_dict["history"])
        self._rounds = int(state_dict.get("rounds", len(self.history)))
        for stage in self._stages:
            stage_state = state_dict["stages"].get(type(stage).__name__)
            if stage_state is not None:
                stage.load_state_dict(stage_state)

    # ------------------------------------------------------------------------------------- a round
    def _round(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, take_references: bool = False
    ) -> None:
        """One metric round at ``trainer.global_step`` (once per step; see the class docstring)."""
        step = trainer.global_step
        if not self._enabled or trainer.sanity_checking or (step == self._last_step and not take_references):
            return
        self._last_step = step
        strategy, values = trainer.strategy, {}
        started = self._budget.clock()
        progress = _Progress(step, self._budget.clock, verbose=self._budget.last_round > PROGRESS_AFTER)
        with training_untouched(pl_module, pl_module.device), self._picked_output(pl_module) as model:
            finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
            error = None if finite else FloatingPointError("the model has NaN or inf parameters")
            if not self._agreed(strategy, "the round", error, step):
                return
            ctx = RoundContext(
                model, self.probe, self._targets, self.seed, take_references, step, _lr(trainer)
            )
            for stage in self._active:
                if take_references or self._rounds % self._stage_period(stage) == 0:
                    progress.begin(stage.name)
                    measured = self._run_stage(strategy, stage, ctx, step)
                    seconds = progress.end(stage.name)
                    if measured:  # a stage that failed everywhere logs nothing, not even its time
                        values.update(measured)
                        values[keys.logged(keys.seconds_key(stage.name))] = seconds
            self._rounds += 1
        seconds = self._budget.clock() - started
        self._budget.record(seconds)
        if self.max_overhead is not None:  # every rank takes rank 0's plan: they all run the same rounds
            self._budget.next_step = strategy.broadcast(self._budget.plan(step), src=0)
        if values:
            values[keys.logged(keys.seconds_key("round"))] = seconds
            values[keys.logged(keys.OVERHEAD)] = self._budget.share()
            self._publish(trainer, step, values)

    def _budget_allows(self, trainer: pl.Trainer, step: int) -> bool:
        """Whether a round at ``step`` fits ``max_overhead``; a plan made before any training step was timed
        is made again first (on every rank alike, from rank 0's clock)."""
        if self._budget.provisional and step >= self._budget.next_step:
            self._budget.next_step = trainer.strategy.broadcast(self._budget.plan(step), src=0)
        return self._budget.allows(step)

    def _stage_period(self, stage: Stage) -> int:
        """A stage runs every this many rounds: the smallest ``every_n_rounds`` of its metrics."""
        return min(self.every_n_rounds.get(name, 1) for name in stage.metrics)

    def _run_stage(self, strategy: Strategy, stage: Stage, ctx: RoundContext, step: int) -> dict[str, float]:
        """This rank's rows -> agree -> all-gather -> values -> agree; ``{}`` if the stage failed anywhere."""

        def share_rows(ctx: RoundContext) -> tuple[int, dict[str, Tensor]]:
            n = stage.num_units(ctx)  # may evaluate the model: a failure here is the stage's failure
            return n, stage.rows(ctx, probe_share(n, strategy.global_rank, strategy.world_size))

        names = ", ".join(stage.metrics)
        result, error = self._attempt(stage, share_rows, ctx)
        if not self._agreed(strategy, names, error, step):
            return {}
        n, rows = result

        def gathered(rows: dict[str, Tensor]) -> dict[str, Tensor]:  # every rank enters each collective
            return {key: gather_rows(strategy, value, n) for key, value in rows.items()}

        rows, error = self._attempt(stage, gathered, rows)
        if not self._agreed(strategy, names, error, step):
            return {}
        values, error = self._attempt(stage, stage.values, ctx, rows)
        if not self._agreed(strategy, names, error, step):
            return {}
        return {PREFIX + key: value for key, value in values.items()}

    def _attempt(self, stage: Stage, compute: Callable, *args: Any) -> tuple[Any, BaseException | None]:
        """``compute(*args)`` and the exception it raised (or ``None``); its warnings re-emitted once."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result, error = compute(*args), None
            except Exception as err:
                result, error = None, err
        for warning in caught:  # once per stage and reason (counts vary between rounds), from its origin
            key = (stage.metrics, warning.category, re.sub(r"\d+", "#", str(warning.message)))
            if key not in self._warned:
                self._warned.add(key)
                message = f"LinearityMonitor ({', '.join(stage.metrics)}): {warning.message} (reported once)"
                warnings.warn_explicit(message, warning.category, warning.filename, warning.lineno)
        return result, error

    def _agreed(self, strategy: Strategy, what: str, error: BaseException | None, step: int) -> bool:
        """Agree across ranks whether ``what`` succeeded everywhere; report a failure as ``on_error`` says.

        The failing rank reports its own reason; rank zero says when only another rank failed. NaN/inf
        (``FloatingPointError``) is reported once per run and never raised.
        """
        outcome = agree(strategy, error)
        if not outcome.failed:
            return True
        if outcome.raisable and self.on_error == "raise":
            where = f"on rank {strategy.global_rank}" if error is not None else "on another rank"
            raise RuntimeError(
                f"LinearityMonitor: {what} failed at step {step} {where} (on_error='raise')"
            ) from error
        if isinstance(error, FloatingPointError):
            self._warn_once(
                ("non-finite",),
                f"LinearityMonitor: {what} at step {step}: {error}; skipped while the model is not finite "
                f"(reported once)",
                local=True,
            )
        elif error is not None:
            self._warn_once(
                (what, type(error), str(error)),
                f"LinearityMonitor: {what} failed at step {step} on rank {strategy.global_rank} and is "
                f"skipped this round (training continues; on_error='warn'): {type(error).__name__}: {error}",
                local=True,
            )
        else:
            self._warn_once(
                (what, "another rank"),
                f"LinearityMonitor: {what} failed at step {step} on another rank and is skipped this round "
                f"on every rank (training continues)",
            )
        return False

    def _publish(self, trainer: pl.Trainer, step: int, values: dict[str, float]) -> None:
        self.history.append({"step": step, **values})
        trainer.callback_metrics.update({key: torch.tensor(value) for key, value in values.items()})
        if self.progress_bar:
            summary = [
                f"{short}={values[PREFIX + key]:.3g}" for key, short in SUMMARY_KEYS if PREFIX + key in values
            ]
            trainer.progress_bar_metrics[PROGRESS_BAR_KEY] = " ".join(summary)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=step)

    # ------------------------------------------------------------------------------------- helpers
    def _measured_module(self, pl_module: pl.LightningModule) -> nn.Module:
        """The package network behind ``pl_module`` (structured paths), or ``pl_module`` itself (always
        itself with an ``output_transform``, which only the module's own forward pass goes through)."""
        if self.output_transform is not None:
            return pl_module
        return as_layered_net(pl_module) or pl_module

    @contextmanager
    def _picked_output(self, pl_module: pl.LightningModule) -> Iterator[nn.Module]:
        """The module to measure (:meth:`_compute_model`), its output passed through ``output_transform``
        by a forward hook while the ``with`` block runs."""
        model = self._compute_model(pl_module)
        if self.output_transform is None:
            yield model
            return
        transform = self.output_transform
        handle = model.register_forward_hook(lambda _module, _inputs, out: transform(out))
        try:
            yield model
        finally:
            handle.remove()

    def _compute_model(self, pl_module: pl.LightningModule) -> nn.Module:
        """The measured module in the compute dtype: itself, or a cast copy holding its current values."""
        source = self._measured_module(pl_module)
        if all(p.dtype == self._compute_dtype for p in source.parameters() if p.is_floating_point()):
            return source
        if self._cast_model is None:
            self._cast_model = copy.deepcopy(source).to(self._compute_dtype).eval()
        with torch.no_grad():
            for copied, original in zip(self._cast_model.parameters(), source.parameters(), strict=True):
                copied.copy_(original)
            for copied, original in zip(self._cast_model.buffers(), source.buffers(), strict=True):
                copied.copy_(original)
        return self._cast_model

    def _encode_targets(self, pl_module: pl.LightningModule) -> Tensor | None:
        """Probe targets as regression targets (n, k) of the model output (for ``pl_ratio``), or ``None``.

        Float targets with as many entries as the output are taken as they are; integer class labels become
        one-hot rows (or +/-1 for one output), as the square loss of docs/math.md 2.2 reads them
        (:func:`~lightning_linearity.metrics.square_loss_targets`). Anything else only warns.
        """
        wanted = ("ntk" in self.options and self.options["ntk"].pl_ratio) or "sharpness" in self.options
        if self.probe.y is None or not wanted:
            return None
        try:
            with self._picked_output(pl_module) as model:
                out = evaluate(model, self.probe.x)
            return square_loss_targets(self.probe.y, out)
        except Exception as err:  # a preparation: never fatal (the round reports a model that fails)
            rank_zero_warn(f"LinearityMonitor: the probe targets do not fit the square loss: {err}")
        return None

    def _warn_once(
        self, key: tuple, message: str, category: type[Warning] = UserWarning, local: bool = False
    ) -> None:
        """Warn the first time ``key`` comes up: on this rank if ``local`` to it, else on rank zero."""
        if key not in self._warned:
            self._warned.add(key)
            (warnings.warn if local else rank_zero_warn)(message, category=category, stacklevel=2)

    @staticmethod
    def _guarded(what: str, module: str, function: str, *args: Any, **kwargs: Any) -> None:
        """Call the optional reporting function ``module.function``; a failure (or no module) only warns."""
        try:
            getattr(importlib.import_module(module), function)(*args, **kwargs)
        except Exception as err:
            rank_zero_warn(
                f"LinearityMonitor: {what} failed ({type(err).__name__}: {err}); training is unaffected"
            )


def _lr(trainer: pl.Trainer) -> float | None:
    """The step size eta of plain gradient descent with the stability threshold of the trainer's first
    optimiser (its first parameter group), docs/math.md 2.9: ``lr`` for SGD without momentum,
    lr (1 - dampening) / (1 + beta) with heavy-ball momentum beta, lr (1 + 2 beta) / (1 + beta) with
    Nesterov's; ``None`` for other optimisers (Adam has no threshold in its step size alone) or none."""
    optimizers = getattr(trainer, "optimizers", None) or []
    try:
        optimizer, group = optimizers[0], optimizers[0].param_groups[0]
        if not isinstance(optimizer, torch.optim.SGD):
            return None
        lr, beta = float(group["lr"]), float(group.get("momentum", 0.0))
    except (IndexError, KeyError, TypeError, ValueError, AttributeError):
        return None
    if group.get("nesterov", False):
        return lr * (1 + 2 * beta) / (1 + beta)
    return lr * (1 - float(group.get("dampening", 0.0))) / (1 + beta)


def _check_strategy(strategy: Strategy) -> None:
    """Single-device and DDP strategies only: the metrics need every parameter, whole, on every rank."""
    supported = classes("strategies.SingleDeviceStrategy") + classes("strategies.DDPStrategy")
    if isinstance(strategy, classes("strategies.DeepSpeedStrategy")) or not isinstance(strategy, supported):
        raise MisconfigurationException(
            f"LinearityMonitor supports single-device and DDP strategies, not {type(strategy).__name__}: "
            f"sharded strategies (FSDP, DeepSpeed, model parallel) split the parameters across ranks, while "
            f"the metrics differentiate the whole model on every rank. Use strategy='ddp' or one device."
        )


def _check_every_n_rounds(periods: Mapping[str, int] | None, options: Mapping[str, Any]) -> dict[str, int]:
    """``every_n_rounds`` as a dict; its keys must be requested metrics and its values integers >= 1."""
    periods = dict(periods or {})
    for name, period in periods.items():
        if name not in options:
            raise MisconfigurationException(
                f"LinearityMonitor: every_n_rounds names {name!r}, which is not among the requested metrics "
                f"{sorted(options)}"
            )
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise MisconfigurationException(
                f"LinearityMonitor: every_n_rounds[{name!r}] must be an integer >= 1, got "
                f"{short_repr(period)}"
            )
    return periods


class _Progress:
    """Reports the parts of a long round as they start and end (rank 0, through Lightning's logger)."""

    def __init__(self, step: int, clock: Callable[[], float], verbose: bool) -> None:
        self.step, self.clock, self.verbose = step, clock, verbose
        self.round_start = self.part_start = clock()

    def _report(self) -> bool:
        return self.verbose or self.clock() - self.round_start > PROGRESS_AFTER

    def begin(self, part: str) -> None:
        self.part_start = self.clock()
        if self._report():
            rank_zero_info(f"LinearityMonitor: step {self.step}: measuring {part} ...")

    def end(self, part: str) -> float:
        seconds = self.clock() - self.part_start
        if self._report():
            total = self.clock() - self.round_start
            message = f"LinearityMonitor: step {self.step}: {part} took {seconds:.1f} s ({total:.1f} s all)"
            rank_zero_info(message)
        return seconds
