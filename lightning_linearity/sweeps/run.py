"""One run of a sweep: build the data and the model, pick the step size, train with Lightning, collect.

For a :class:`~lightning_linearity.sweeps.config.RunSpec` at width m and seed s:

1. The data module's training split (x, y) is the full batch of gradient descent and the probe set X of
   every metric.
2. The model is initialised from seed s (weights; also the mask of a masked DAG). Its NTK K_0 on X gives
   the step size eta = lr_scale / lambda_max(K_0) (unless a fixed ``lr`` is set). For the square loss
   L = 1/2 sum_i ||f(w; x_i) - y_i||^2, gradient descent in the linearised model is stable for
   eta < 2 / lambda_max(K); close to that edge the loss first grows and the kernel moves by O(1) at any
   width (the "catapult" regime), which would spoil a width scaling.
3. A Lightning ``Trainer`` (``lightning.pytorch``, else ``pytorch_lightning``) runs full-batch gradient
   descent (SGD without momentum) with a
   :class:`~lightning_linearity.callbacks.LinearityMonitor` (metric rounds at step 0, every
   ``every_n_steps`` and at the end) and :class:`GradientDescentControl` (records L(w_t), stops once it is
   below ``loss_threshold``, or before the first step in mode ``"init"``).
4. The requested metrics are reduced from the monitor's history (:mod:`~lightning_linearity.sweeps.collect`).

The record also holds diagnostics: ``lr``, ``lambda_max_0``, ``eta_lambda_max`` = eta * max_t
lambda_max(K_t) (near or above 2: catapult), ``max_loss_ratio`` = max_t L(w_{t+1}) / L(w_t) (above 1: the
loss went up at some step), ``steps``, ``final_loss``, ``status`` (``converged``, ``max_steps``,
``diverged`` or ``init``), the network's width in the sense of 004 Def. 2.7 (``min_in_degree``) and the
warnings the run emitted.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from typing_extensions import override

from lightning_linearity import keys
from lightning_linearity._compat import PRIMARY as pl
from lightning_linearity._compat import Callback
from lightning_linearity.callbacks.linearity_monitor import LinearityMonitor
from lightning_linearity.data import DigitsDataModule, GaussianDataModule
from lightning_linearity.metrics.ntk import empirical_ntk
from lightning_linearity.metrics.pl import kernel_spectrum
from lightning_linearity.models import NTKFCN, LinearityModule, MaskedDAGNet, NTKDenseNet
from lightning_linearity.sweeps.collect import (
    LOSS_KEY,
    check_metric_specs,
    collect,
)
from lightning_linearity.sweeps.config import RunSpec, SweepConfig

MODEL_CLASSES: dict[str, type[LinearityModule]] = {
    "NTKFCN": NTKFCN,
    "NTKDenseNet": NTKDenseNet,
    "MaskedDAGNet": MaskedDAGNet,
}
DATA_CLASSES: dict[str, type[pl.LightningDataModule]] = {
    "digits": DigitsDataModule,
    "gaussian": GaussianDataModule,
}
#: Lightning messages that say nothing about a full-batch run on CPU.
_IGNORED_WARNINGS = (
    ".*does not have many workers.*",
    ".*GPU available.*",
    ".*smaller than the logging interval.*",
)


class GradientDescentControl(Callback):
    """Record the training loss L(w_t) of every step; stop below a threshold, on NaN, or at once.

    Args:
        loss_threshold: stop once L(w_t) < loss_threshold (``None``: never).
        stop_at_start: stop before the first optimiser step (the sweep's mode ``"init"``; the monitor's
            initial round still runs in ``on_train_start``).

    Attributes:
        losses: ``(t, L(w_t))`` for every step taken; the loss of step t is computed at w_t, before the
            update that makes w_{t+1}.
    """

    def __init__(self, loss_threshold: float | None, stop_at_start: bool = False) -> None:
        self.loss_threshold = loss_threshold
        self.stop_at_start = stop_at_start
        self.losses: list[tuple[int, float]] = []

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.losses = []
        if self.stop_at_start:
            trainer.should_stop = True

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = float(outputs["loss"])
        self.losses.append((trainer.global_step - 1, loss))
        if not math.isfinite(loss) or (self.loss_threshold is not None and loss < self.loss_threshold):
            trainer.should_stop = True

    @property
    def diverged(self) -> bool:
        return any(not math.isfinite(loss) for _, loss in self.losses)

    @property
    def max_loss_ratio(self) -> float:
        """max_t L(w_{t+1}) / L(w_t) over the recorded steps (NaN with fewer than two)."""
        ratios = [b / a for (_, a), (_, b) in zip(self.losses, self.losses[1:], strict=False) if a > 0]
        return max(ratios) if ratios else float("nan")


def build_data(config: SweepConfig) -> pl.LightningDataModule:
    """The sweep's data module (full batch, unshuffled); its splits are materialised."""
    data = DATA_CLASSES[config.data["name"]](**config.data_kwargs())
    data.setup("fit")
    return data


def build_model(config: SweepConfig, width: int, seed: int, in_features: int) -> LinearityModule:
    """The model of one run: ``model_args`` at ``width``, weights (and a masked DAG's mask) from ``seed``,
    the layers of ``frozen_layers`` frozen (``requires_grad=False``).

    Raises:
        ValueError: a frozen layer number above the network's L + 1 layers, every layer frozen (or the
            model's own checks).
    """
    kwargs = config.model_kwargs(width)
    kwargs.update(in_features=in_features, init_seed=seed, loss="mse", optimizer="sgd", momentum=0.0)
    if config.model == "MaskedDAGNet":
        kwargs["mask_seed"] = seed
    model = MODEL_CLASSES[config.model](**kwargs)
    layers = model.layered_net.layers
    for number in config.frozen_layers:
        if number > len(layers):
            raise ValueError(
                f"frozen_layers: the network has layers 1..{len(layers)} ({len(layers)}: the output layer), "
                f"got {number}"
            )
        layers[number - 1].requires_grad_(False)
    if len(set(config.frozen_layers)) == len(layers):
        raise ValueError(f"frozen_layers freezes all {len(layers)} layers; leave at least one trainable")
    return model


@contextmanager
def quiet_lightning() -> Iterator[list[warnings.WarningMessage]]:
    """Silence Lightning's INFO lines and irrelevant warnings; yield the other warnings, caught."""
    loggers = [
        logging.getLogger(name) for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric")
    ]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for pattern in _IGNORED_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            yield caught
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def execute_run(spec: RunSpec) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Run one (width, seed) of a sweep; returns its CSV record and its history (see the module docstring)."""
    config = spec.config
    start = time.perf_counter()
    specs = check_metric_specs(config.metrics, config.mode)
    with quiet_lightning() as caught:
        data = build_data(config)
        x, y = data.train_split.x, data.train_split.y
        model = build_model(config, spec.width, spec.seed, data.in_features)
        lambda_max_0 = kernel_spectrum(empirical_ntk(model, x)).lambda_max
        lr = config.lr if config.lr is not None else config.lr_scale / lambda_max_0
        model.lr = model.hparams.lr = lr
        layer_names = model.layered_net.hidden_layer_names
        training = config.mode == "train"
        monitor = LinearityMonitor(
            metrics=config.monitor_options(),
            every_n_steps=config.every_n_steps if training else None,
            probe_data=(x, y),
            seed=spec.seed,
            on_error="raise",
            plots=False,
        )
        control = GradientDescentControl(
            config.loss_threshold if training else None, stop_at_start=not training
        )
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=config.max_steps if training else 1,
            max_epochs=-1,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            log_every_n_steps=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[monitor, control],
        )
        trainer.fit(model, datamodule=data)
    history = sorted(
        [*monitor.history, *({"step": t, LOSS_KEY: loss} for t, loss in control.losses)],
        key=lambda row: row["step"],
    )
    key = keys.logged(keys.LAMBDA_MAX)
    lambda_maxes = [row[key] for row in monitor.history if key in row]
    final_loss = control.losses[-1][1] if control.losses else float("nan")
    if not training:
        status = "init"
    elif control.diverged:
        status = "diverged"
    elif config.loss_threshold is not None and final_loss < config.loss_threshold:
        status = "converged"
    else:
        status = "max_steps"
    record = {
        "run_id": spec.run_id,
        "model": config.model,
        "width": spec.width,
        "seed": spec.seed,
        **collect(specs, history, layer_names),
        "min_in_degree": model.layered_net.width,
        "num_params": sum(p.numel() for p in model.parameters()),
        "lr": lr,
        "lambda_max_0": lambda_max_0,
        "eta_lambda_max": lr * max(lambda_maxes) if lambda_maxes else float("nan"),
        "max_loss_ratio": control.max_loss_ratio,
        "steps": trainer.global_step,
        "final_loss": final_loss,
        "status": status,
        "seconds": round(time.perf_counter() - start, 3),
        "warnings": " | ".join(sorted({f"{w.category.__name__}: {w.message}" for w in caught})),
    }
    return record, history
