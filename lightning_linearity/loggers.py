"""Prepare the trainer's loggers for the ``linearity/`` metrics of :class:`LinearityMonitor`.

The callback calls :func:`prepare_loggers` once at ``setup`` on rank 0. For every logger in
``trainer.loggers``:

* Weights & Biases: the metrics ``linearity/*`` (and the report images ``linearity_plots/*``) get the
  trainer's global step ``trainer/global_step`` as their x-axis (``define_metric``), and the monitor's
  settings are added to the run config under ``linearity_monitor``.
* any other logger (CSV, TensorBoard, MLflow, ...): the settings are recorded with ``log_hyperparams``
  under the same ``linearity_monitor`` key (CSV writes them to ``hparams.yaml``).

The model's own hyperparameters reach every logger through Lightning itself (``save_hyperparameters``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lightning_linearity._compat import classes
from lightning_linearity.keys import IMAGE_PREFIX, PREFIX

if TYPE_CHECKING:
    import lightning.pytorch as pl

#: Run-config / hyperparameter key under which the monitor's settings are stored.
SETTINGS_KEY = "linearity_monitor"
#: W&B x-axis of every ``linearity/`` key; Lightning's WandbLogger adds it to each logged row.
STEP_METRIC = "trainer/global_step"
#: Key prefixes that get :data:`STEP_METRIC` as x-axis in W&B: the metrics and the report images.
METRIC_PREFIXES = (PREFIX.rstrip("/"), IMAGE_PREFIX.rstrip("/"))


def plain_settings(value: Any) -> Any:
    """``value`` as YAML/JSON-safe builtins: mappings -> dicts, sequences -> lists, others -> str.

    Loggers store hyperparameters as YAML (CSV), protobuf (TensorBoard) or JSON (W&B); tuples, tensors,
    paths and callables in the callback's settings would otherwise be rejected or stored as opaque tags.
    """
    if isinstance(value, Mapping):
        return {str(key): plain_settings(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain_settings(item) for item in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)


def prepare_loggers(trainer: pl.Trainer, settings: Mapping[str, Any]) -> None:
    """Define the ``linearity/`` x-axis and record the monitor's ``settings`` in every logger of ``trainer``.

    Call on rank 0 only (W&B's ``experiment`` is a dummy on other ranks anyway). Works with no logger,
    CSV, TensorBoard, W&B and any other ``Logger`` of ``lightning.pytorch`` or ``pytorch_lightning``.

    Args:
        trainer: the trainer whose ``loggers`` are prepared.
        settings: the callback's settings (metrics, cadence, probe size, ...); nested values are converted
            with :func:`plain_settings`.
    """
    params = {SETTINGS_KEY: plain_settings(settings)}
    for logger in trainer.loggers:
        if isinstance(logger, classes("loggers.WandbLogger")):
            run = logger.experiment
            run.define_metric(STEP_METRIC)
            for prefix in METRIC_PREFIXES:
                run.define_metric(f"{prefix}/*", step_metric=STEP_METRIC)
            run.config.update(params, allow_val_change=True)
        else:
            logger.log_hyperparams(params)
