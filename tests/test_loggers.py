"""prepare_loggers: the W&B x-axis and run config, hyperparameters for other loggers, no logger at all."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import yaml
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from lightning_linearity.loggers import SETTINGS_KEY, plain_settings, prepare_loggers

SETTINGS = {
    "metrics": {"ntk": {"method": "auto"}, "hessian_norm": {"layers": (1, 2)}},
    "every_n_steps": 50,
    "probe_data": None,
    "dtype": None,
    "plots": True,
}


def trainer_with(tmp_path, logger) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=tmp_path, logger=logger, enable_progress_bar=False, enable_model_summary=False
    )


def test_plain_settings_become_yaml_and_json_safe_builtins():
    value = {"a": (1, 2.5, "x"), 3: {Path("/p"), None} - {None}, "inf": float("inf"), "ok": [True, None]}

    assert plain_settings(value) == {"a": [1, 2.5, "x"], "3": ["/p"], "inf": "inf", "ok": [True, None]}
    assert plain_settings(object).startswith("<class")


def test_no_logger_is_fine(tmp_path):
    prepare_loggers(trainer_with(tmp_path, False), SETTINGS)


def test_csv_logger_writes_the_settings_to_hparams_yaml(tmp_path):
    logger = CSVLogger(tmp_path)
    prepare_loggers(trainer_with(tmp_path, logger), SETTINGS)

    saved = yaml.safe_load(Path(logger.log_dir, "hparams.yaml").read_text())
    assert saved == {
        SETTINGS_KEY: {**SETTINGS, "metrics": {"ntk": {"method": "auto"}, "hessian_norm": {"layers": [1, 2]}}}
    }


def test_tensorboard_logger_records_the_settings(tmp_path):
    pytest.importorskip("tensorboard")
    logger = TensorBoardLogger(tmp_path)
    prepare_loggers(trainer_with(tmp_path, logger), SETTINGS)

    assert logger.hparams[SETTINGS_KEY]["every_n_steps"] == 50
    assert any(Path(logger.log_dir).glob("events.out.tfevents.*"))


class _RecordingRun:
    """Stands in for a wandb Run: records define_metric calls and config updates."""

    def __init__(self):
        self.metrics: list[tuple[str, dict]] = []
        self.config = self

    def define_metric(self, name, **kwargs):
        self.metrics.append((name, kwargs))

    def update(self, params, allow_val_change=False):
        self.updates = (params, allow_val_change)


def test_wandb_gets_the_step_axis_and_the_settings_in_the_run_config(tmp_path):
    pytest.importorskip("wandb")
    run = _RecordingRun()
    logger = WandbLogger(experiment=run)

    prepare_loggers(trainer_with(tmp_path, logger), SETTINGS)

    assert run.metrics == [
        ("trainer/global_step", {}),
        ("linearity/*", {"step_metric": "trainer/global_step"}),
        ("linearity_plots/*", {"step_metric": "trainer/global_step"}),
    ]
    params, allow_change = run.updates
    assert params == {SETTINGS_KEY: plain_settings(SETTINGS)} and allow_change
