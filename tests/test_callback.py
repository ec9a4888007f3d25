"""LinearityMonitor with a real Trainer and real loggers (single process; DDP is in test_callback_ddp.py)."""

import copy
import random
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from ddp_linearity_run import read_rounds
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.strategies import FSDPStrategy
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_linearity.callbacks import LinearityMonitor
from lightning_linearity.keys import is_timing
from lightning_linearity.metrics import split
from lightning_linearity.metrics.cosines import neuron_gradient_cosines
from lightning_linearity.metrics.hessian import hessian_spectral_norm
from lightning_linearity.metrics.ntk import empirical_ntk
from lightning_linearity.metrics.pl import kernel_spectrum, pl_ratio
from lightning_linearity.models import NTKFCN, MaskedDAGNet, NTKDenseNet

IN, OUT, N = 5, 2, 32
#: every metric, on settings cheap enough for tiny models (Lanczos steps dominate the cost)
ALL_METRICS = {
    "ntk": {},
    "kernel_change": {},
    "hessian_norm": {"num_points": 1, "max_iter": 10, "layers": [1], "num_neurons": 1},
    "grad_cosines": {"num_neurons": 8},
    "linearization": {},
}
#: the same for the foreign model below, which names its layers
FOREIGN_METRICS = {
    **ALL_METRICS,
    "hessian_norm": {**ALL_METRICS["hessian_norm"], "layers": ["net.0"]},
    "grad_cosines": {"num_neurons": 8, "layers": ["net.0", "net.3"]},
}
KEYS = [
    "lambda_min",
    "lambda_max",
    "condition_number",
    "ntk_trace",
    "pl_ratio",
    "catapult",  # lr * lambda_max(K) / 2: the ntk knows the optimiser's step size
    "kernel_change",
    "kernel_change_max",
    "hessian_norm_max",
    "hessian_norm_mean",
    "linearization_error_mean",
    "linearization_error_max",
    "linearization_error_relative",
    "distance_from_init",
]


def keys(*extra):
    return sorted(f"linearity/{key}" for key in (*KEYS, *extra))


class ForeignMLP(pl.LightningModule):
    """A LightningModule that is not one of the package's: a plain nn.Sequential, SGD with momentum."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(IN, 16),
            nn.Tanh(),
            nn.Dropout(dropout),
            nn.Linear(16, 16),
            nn.Tanh(),
            nn.Linear(16, OUT),
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return 0.5 * (self(x) - y).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9)


class OneLayer(ForeignMLP):
    """A foreign model without a hidden layer: one nn.Linear."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(IN, OUT)


def make_monitor(*args, **kwargs) -> LinearityMonitor:
    """A monitor without the report figures at the end of training (tested once, below): they cost time."""
    kwargs.setdefault("plots", False)
    return LinearityMonitor(*args, **kwargs)


def fcn(**kwargs):
    return NTKFCN(IN, OUT, width=16, depth=2, init_seed=0, lr=0.05, **kwargs)


def dataset(n: int = N) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, IN, generator=generator), torch.randn(n, OUT, generator=generator))


def loader(batch_size: int = 8, shuffle: bool = False) -> DataLoader:
    return DataLoader(dataset(), batch_size=batch_size, shuffle=shuffle)


def trainer(tmp_path, callbacks=(), **kwargs) -> pl.Trainer:
    kwargs.setdefault("logger", CSVLogger(tmp_path, name="", version=""))
    kwargs.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def finite(rounds):
    return all(np.isfinite(value) for values in rounds.values() for value in values.values())


# ------------------------------------------------------------------------------------------ logging
@pytest.mark.parametrize("family", [NTKFCN, NTKDenseNet, MaskedDAGNet])
def test_every_module_logs_every_key_at_the_scheduled_steps(family, tmp_path):
    model = family(IN, OUT, width=16, depth=2, init_seed=0, lr=0.05)
    monitor = make_monitor(ALL_METRICS, every_n_steps=2, probe_size=8)
    t = trainer(tmp_path, [monitor], max_steps=5, num_sanity_val_steps=1, limit_val_batches=1)
    t.fit(model, loader(), loader())  # with a sanity check, which must not trigger a round
    rounds = read_rounds(tmp_path / "metrics.csv")
    assert sorted(rounds) == [0, 2, 4, 5]  # start, every 2 optimiser steps, end of training
    expected = keys(
        "hessian_norm_max/layer_1", "hessian_norm_mean/layer_1", "grad_cosine/layer_1", "grad_cosine/layer_2"
    )
    assert all(sorted(values) == expected for values in rounds.values())
    assert finite(rounds)
    assert all(values["linearity/lambda_min"] > 0 for values in rounds.values())
    assert rounds[0]["linearity/kernel_change"] == 0 and rounds[5]["linearity/kernel_change"] > 0
    assert [h["step"] for h in monitor.history] == [0, 2, 4, 5]


def test_rounds_count_optimiser_steps_under_gradient_accumulation(tmp_path):
    monitor = make_monitor(["ntk"], every_n_steps=2, probe_size=8)
    t = trainer(tmp_path, [monitor], max_steps=5, accumulate_grad_batches=2)
    t.fit(fcn(), loader(batch_size=4))  # 8 batches per epoch, 4 optimiser steps
    assert sorted(read_rounds(tmp_path / "metrics.csv")) == [0, 2, 4, 5]
    assert t.global_step == 5


def test_every_n_rounds_measures_a_costly_metric_less_often(tmp_path):
    metrics = {"ntk": {}, "hessian_norm": {"max_iter": 10}}
    monitor = make_monitor(metrics, every_n_steps=1, probe_size=8, every_n_rounds={"hessian_norm": 3})
    t = trainer(tmp_path, [monitor], max_steps=7)
    t.fit(fcn(), loader())
    rounds = read_rounds(tmp_path / "metrics.csv")
    assert sorted(rounds) == list(range(8))  # rounds 0..7: steps 0..7
    with_hessian = [step for step, values in rounds.items() if "linearity/hessian_norm_max" in values]
    assert with_hessian == [0, 3, 6]
    assert all("linearity/lambda_min" in values for values in rounds.values())
    assert monitor.settings()["every_n_rounds"] == {"hessian_norm": 3}
    assert monitor.state_dict()["rounds"] == 8


def test_foreign_module_gets_every_metric_equal_to_the_generic_reference(tmp_path):
    """The monitor takes the fast routes on a plain MLP (engine, Linear chain); the reference values come
    from the metrics' independent generic torch.func path."""
    torch.manual_seed(0)
    model = ForeignMLP()
    at_init = copy.deepcopy(model)
    hessian = {**FOREIGN_METRICS["hessian_norm"], "num_points": 2, "max_iter": 100}  # converged to tol
    monitor = make_monitor({**FOREIGN_METRICS, "hessian_norm": hessian}, every_n_steps=2, probe_size=8)
    trainer(tmp_path, [monitor], max_steps=2).fit(model, loader())
    rounds = read_rounds(tmp_path / "metrics.csv")
    expected = keys(
        "hessian_norm_max/net.0", "hessian_norm_mean/net.0", "grad_cosine/net.0", "grad_cosine/net.3"
    )
    assert sorted(rounds) == [0, 2] and sorted(rounds[0]) == expected and finite(rounds)
    # the step-0 values are those of the metric functions on the initial model and the first 8 points
    x, y = dataset()[:8]
    first = rounds[0]
    spectrum = kernel_spectrum(empirical_ntk(at_init, x, method="generic"))
    assert first["linearity/lambda_min"] == pytest.approx(spectrum.lambda_min, rel=1e-4)
    assert first["linearity/ntk_trace"] == pytest.approx(spectrum.trace, rel=1e-5)
    assert first["linearity/pl_ratio"] == pytest.approx(float(pl_ratio(at_init, x, y)), rel=1e-5)
    hessian = hessian_spectral_norm(at_init, x[:2], tol=1e-8, max_iter=500, method="generic")
    assert first["linearity/hessian_norm_max"] == pytest.approx(float(hessian.max()), rel=2e-3)
    for layer in ("net.0", "net.3"):
        cosine = neuron_gradient_cosines(
            at_init, x, layer, num_neurons=8, generator=torch.Generator().manual_seed(0), method="generic"
        )
        assert first[f"linearity/grad_cosine/{layer}"] == pytest.approx(float(cosine), rel=1e-5)


def test_tensorboard_receives_the_metrics_at_the_global_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer(tmp_path, [make_monitor(["ntk"], every_n_steps=2, probe_size=8)], max_steps=4, logger=logger).fit(
        fcn(), loader()
    )
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert [event.step for event in events.Scalars("linearity/lambda_min")] == [0, 2, 4]


def test_every_n_epochs_and_the_progress_bar_summary(tmp_path):
    monitor = make_monitor(
        ["ntk", "kernel_change"], every_n_steps=None, every_n_epochs=1, probe_size=8, progress_bar=True
    )
    t = trainer(tmp_path, [monitor], max_epochs=2)
    t.fit(fcn(), loader())  # 4 optimiser steps per epoch
    assert sorted(read_rounds(tmp_path / "metrics.csv")) == [0, 4, 8]
    summary = t.progress_bar_metrics["linearity"]
    assert summary.startswith("lmin=") and " dK=" in summary
    assert (
        float(t.callback_metrics["linearity/kernel_change"]) == monitor.history[-1]["linearity/kernel_change"]
    )


def test_fast_dev_run_runs_no_round(tmp_path):
    monitor = make_monitor(["ntk"], every_n_steps=1, probe_size=8)
    trainer(tmp_path, [monitor], fast_dev_run=2, logger=False).fit(fcn(), loader())
    assert monitor.history == []


# ------------------------------------------------------------------------------------------ probe set
def test_probe_set_first_random_or_given(tmp_path):
    x, _ = dataset().tensors
    given = torch.randn(3, IN, dtype=torch.float64)
    expected = {
        "first": x[:5],
        "random": x[torch.randperm(N, generator=torch.Generator().manual_seed(7))[:5].sort().values],
    }
    for selection, probe in expected.items():
        monitor = make_monitor(["ntk"], every_n_steps=None, probe_size=5, probe_selection=selection, seed=7)
        trainer(tmp_path, [monitor], max_steps=1, logger=False).fit(fcn(), loader(shuffle=True))
        assert torch.equal(monitor.probe.x, probe)
    monitor = make_monitor(["ntk"], every_n_steps=None, probe_data=given)
    trainer(tmp_path, [monitor], max_steps=1, logger=False).fit(fcn(), loader())
    assert monitor.probe.x.dtype == torch.float32 and torch.equal(monitor.probe.x, given.float())
    assert monitor.probe.y is None and "linearity/pl_ratio" not in monitor.history[0]


# ----------------------------------------------------------------------------------------- training untouched
@pytest.mark.parametrize("make_model", [lambda: ForeignMLP(dropout=0.5), fcn], ids=["foreign-dropout", "fcn"])
def test_training_with_the_monitor_gives_bit_identical_weights(make_model, tmp_path):
    def train(callbacks):
        pl.seed_everything(0)
        model = make_model()
        trainer(tmp_path, callbacks, max_steps=6, logger=False).fit(model, loader(shuffle=True))
        return model.state_dict()

    metrics = FOREIGN_METRICS if isinstance(make_model(), ForeignMLP) else ALL_METRICS
    plain = train([])
    monitored = train([make_monitor(metrics, every_n_steps=2, probe_size=8, probe_selection="random")])
    assert plain.keys() == monitored.keys()
    assert all(torch.equal(plain[key], monitored[key]) for key in plain)


def snapshot(trainer, pl_module):
    return {
        "params": [p.detach().clone() for p in pl_module.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in pl_module.parameters()],
        "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()),
        "modes": [m.training for m in pl_module.modules()],
        "rng": (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()),  # noqa: NPY002
    }


class Snapshots(Callback):
    """Records the training state at every batch end; one instance runs before the monitor, one after."""

    def __init__(self):
        self.taken = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.taken.append(snapshot(trainer, pl_module))


def test_a_round_leaves_params_grads_optimizer_modes_and_rng_untouched(tmp_path):
    model = ForeignMLP(dropout=0.5)
    model.net[2].eval()  # a submodule in eval mode must stay so, the others in train mode
    before, after = Snapshots(), Snapshots()
    monitor = make_monitor(FOREIGN_METRICS, every_n_steps=1, probe_size=8)
    # accumulation: the round after each optimiser step sees non-zero gradients
    trainer(tmp_path, [before, monitor, after], max_steps=3, accumulate_grad_batches=2, logger=False).fit(
        model, loader(batch_size=4, shuffle=True)
    )
    assert len(monitor.history) == 4 and len(before.taken) == len(after.taken) == 6
    for old, new in zip(before.taken, after.taken, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(old["params"], new["params"], strict=True))
        assert all(
            (a is None and b is None) or torch.equal(a, b)
            for a, b in zip(old["grads"], new["grads"], strict=True)
        )
        assert any(g is not None for g in new["grads"])
        assert str(old["optimizer"]) == str(new["optimizer"])
        assert old["modes"] == new["modes"] and not model.net[2].training and model.net[0].training
        assert torch.equal(old["rng"][0], new["rng"][0]) and np.array_equal(old["rng"][1], new["rng"][1])
        assert old["rng"][2] == new["rng"][2]


# ------------------------------------------------------------------------------------------ precision
def test_mixed_and_low_precision_measure_in_float32_without_autocast(tmp_path):
    def first_round(precision, **kwargs):
        metrics = ["ntk", "grad_cosines", "linearization"]
        monitor = make_monitor(metrics, every_n_steps=None, probe_size=8, **kwargs)
        trainer(tmp_path, [monitor], max_steps=1, precision=precision, logger=False).fit(fcn(), loader())
        return {key: value for key, value in monitor.history[0].items() if not is_timing(key)}

    reference = first_round("32-true")
    mixed = first_round("bf16-mixed")
    assert mixed == pytest.approx(reference, rel=1e-6)
    cast = first_round("bf16-true")  # bf16 weights, measured on a float32 copy
    assert cast == pytest.approx(reference, rel=0.05)
    double = first_round("32-true", dtype="float64")
    assert double == pytest.approx(reference, rel=1e-3)


# ------------------------------------------------------------------------------------------ resume
def test_resume_measures_against_the_original_initialisation(tmp_path):
    def fit(root, seed, ckpt_path=None):
        monitor = make_monitor(
            ["ntk", "kernel_change", "linearization"],
            every_n_steps=2,
            probe_size=6,
            probe_selection="random",
            seed=seed,
        )
        checkpoints = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=3, save_top_k=-1)
        t = trainer(root, [monitor, checkpoints], max_steps=6, enable_checkpointing=True)
        t.fit(fcn(), loader(batch_size=N), ckpt_path=ckpt_path)  # full batch: one step per epoch
        return read_rounds(root / "metrics.csv"), monitor

    full, full_monitor = fit(tmp_path / "full", seed=3)
    (checkpoint,) = (tmp_path / "full" / "ckpt").glob("*step=3.ckpt")
    # another seed would pick another probe subset: the checkpoint's probe set must win
    resumed, resumed_monitor = fit(tmp_path / "resumed", seed=4, ckpt_path=checkpoint)
    assert sorted(full) == [0, 2, 4, 6] and sorted(resumed) == [4, 6]
    assert torch.equal(resumed_monitor.probe.x, full_monitor.probe.x)
    for step in (4, 6):
        assert full[step]["linearity/kernel_change"] > 0
        assert resumed[step] == pytest.approx(full[step], rel=1e-6)


def test_resume_without_monitor_state_warns(tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2)
    full_batch = loader(batch_size=N)  # one step per epoch: checkpoints at epoch ends
    plain = trainer(tmp_path, [checkpoints], max_steps=2, enable_checkpointing=True, logger=False)
    plain.fit(fcn(), full_batch)
    (checkpoint,) = (tmp_path / "ckpt").glob("*.ckpt")
    monitor = make_monitor(["kernel_change"], every_n_steps=2, probe_size=8)
    with pytest.warns(UserWarning, match=r"resumes at step 2 without the references .*\['kernel_change'\]"):
        trainer(tmp_path, [monitor], max_steps=4, logger=False).fit(fcn(), full_batch, ckpt_path=checkpoint)
    assert [h["step"] for h in monitor.history] == [2, 4]


# ------------------------------------------------------------------------------------------ report
def test_report_figures_and_settings_reach_the_log_directory(tmp_path):
    monitor = LinearityMonitor(["ntk", "kernel_change", "grad_cosines"], every_n_steps=2, probe_size=8)
    trainer(tmp_path, [monitor], max_steps=2).fit(fcn(), loader())
    assert {"ntk_spectrum.png", "linearity_curves.png", "grad_cosines.png"} <= {
        p.name for p in tmp_path.glob("*.png")
    }
    assert "linearity_monitor" in (tmp_path / "hparams.yaml").read_text()
    assert sorted(monitor.spectra) == ["final", "init"] and monitor.spectra["init"].shape == (8 * OUT,)


def test_failing_report_hooks_only_warn(tmp_path, monkeypatch):
    import lightning_linearity.loggers
    import lightning_linearity.plots

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(lightning_linearity.loggers, "prepare_loggers", broken)
    monkeypatch.setattr(lightning_linearity.plots, "write_report", broken)
    monitor = LinearityMonitor(["ntk"], every_n_steps=2, probe_size=8)
    with pytest.warns(UserWarning, match="writing the report figures failed") as record:
        trainer(tmp_path, [monitor], max_steps=2).fit(fcn(), loader())
    assert any("preparing the loggers failed (OSError: disk full)" in str(w.message) for w in record)
    assert [h["step"] for h in monitor.history] == [0, 2]


# ------------------------------------------------------------------------------------------ failures
def broken_hessian(*args, **kwargs):
    raise RuntimeError("broken Lanczos")


def test_a_failing_metric_warns_once_and_training_continues(tmp_path, monkeypatch):
    monkeypatch.setattr(split, "hessian_spectral_norm", broken_hessian)
    monitor = make_monitor(["ntk", "hessian_norm"], every_n_steps=1, probe_size=8)
    with pytest.warns(UserWarning, match="hessian_norm failed at step 0 on rank 0") as record:
        trainer(tmp_path, [monitor], max_steps=3).fit(fcn(), loader())
    assert sum("broken Lanczos" in str(w.message) for w in record) == 1
    rounds = read_rounds(tmp_path / "metrics.csv")
    assert sorted(rounds) == [0, 1, 2, 3]
    assert all("linearity/lambda_min" in v and "linearity/hessian_norm_max" not in v for v in rounds.values())


def test_a_failure_while_planning_the_split_only_warns(tmp_path, monkeypatch):
    # the Hessian stage evaluates the model to count its outputs before computing any norm
    def broken_evaluate(model, x):
        raise ValueError("broken forward")

    monkeypatch.setattr(split, "evaluate", broken_evaluate)
    monitor = make_monitor(["ntk", "hessian_norm"], every_n_steps=1, probe_size=8)
    with pytest.warns(UserWarning, match="hessian_norm failed at step 0 on rank 0"):
        trainer(tmp_path, [monitor], max_steps=2).fit(fcn(), loader())
    rounds = read_rounds(tmp_path / "metrics.csv")
    assert sorted(rounds) == [0, 1, 2]
    assert all("linearity/lambda_min" in v and "linearity/hessian_norm_max" not in v for v in rounds.values())


def test_on_error_raise_stops_training(tmp_path, monkeypatch):
    monkeypatch.setattr(split, "hessian_spectral_norm", broken_hessian)
    monitor = make_monitor(["hessian_norm"], every_n_steps=1, probe_size=8, on_error="raise")
    with pytest.raises(RuntimeError, match="hessian_norm failed at step 0 on rank 0"):
        trainer(tmp_path, [monitor], max_steps=3, logger=False).fit(fcn(), loader())


class Poison(Callback):
    """Puts a NaN into the first parameter after optimiser step 2."""

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step == 2:
            with torch.no_grad():
                next(pl_module.parameters())[0, 0] = float("nan")


def test_nan_in_the_model_is_reported_once_and_never_raised(tmp_path):
    monitor = make_monitor(["ntk", "kernel_change"], every_n_steps=1, probe_size=8, on_error="raise")
    with pytest.warns(UserWarning, match="NaN or inf") as record:
        trainer(tmp_path, [Poison(), monitor], max_steps=5, logger=False).fit(fcn(), loader())
    assert sum("NaN or inf" in str(w.message) for w in record) == 1
    assert [h["step"] for h in monitor.history] == [0, 1]


# ------------------------------------------------------------------------------------------ bad configuration
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(metrics=["ntk", "sharpnes"]), "unknown metric 'sharpnes'; valid metric names are"),
        (dict(every_n_steps=0), "every_n_steps must be an integer >= 1"),
        (dict(metrics={"hessian_norm": {"tolerance": 1e-3}}), r"unknown option\(s\) \['tolerance'\]"),
        (dict(metrics={"hessian_norm": {"tol": -1.0}}), "tol must be a positive number"),
        (dict(probe_data=torch.randn(4, IN), probe_size=8), "probe_size=8 is larger than probe_data"),
        (dict(on_error="ignore"), "on_error must be 'warn' or 'raise'"),
        (dict(metrics=["ntk"], every_n_rounds={"hessian_norm": 2}), "not among the requested metrics"),
        (dict(every_n_rounds={"hessian_norm": 0}), r"every_n_rounds\['hessian_norm'\] must be an integer"),
    ],
)
def test_bad_arguments_raise_at_init(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        LinearityMonitor(**kwargs)


@pytest.mark.parametrize(
    "make_model, kwargs, match",
    [
        (fcn, dict(metrics={"grad_cosines": {"layers": [3]}}), "unknown hidden layer 3"),
        (ForeignMLP, dict(metrics={"grad_cosines": {"layers": ["net.9"]}}), "unknown layer 'net.9'"),
        (OneLayer, dict(metrics=["grad_cosines"]), "has no hidden nn.Linear / nn.Conv layer"),
        (ForeignMLP, dict(metrics={"hessian_norm": {"layers": ["head"]}}), "unknown layer 'head'"),
        (fcn, dict(metrics={"linearization": {"memory_budget_mb": 0.001}}), "over memory_budget_mb=0.001"),
        (fcn, dict(probe_size=N + 1), f"probe_size={N + 1} is larger than the training data"),
    ],
)
def test_bad_configuration_raises_before_the_first_step(make_model, kwargs, match, tmp_path):
    t = trainer(tmp_path, [LinearityMonitor(**kwargs, on_error="raise")], max_steps=2, logger=False)
    with pytest.raises(MisconfigurationException, match=match):
        t.fit(make_model(), loader())
    assert t.global_step == 0


@pytest.mark.parametrize(
    "make_model, metrics, match",
    [
        (fcn, {"grad_cosines": {"layers": [3]}, "ntk": {}}, "unknown hidden layer 3"),
        (OneLayer, {"grad_cosines": {}, "ntk": {}}, "has no hidden nn.Linear / nn.Conv layer"),
        (fcn, {"linearization": {"memory_budget_mb": 0.001}, "ntk": {}}, "over memory_budget_mb=0.001"),
    ],
)
def test_a_metric_that_does_not_fit_the_model_is_turned_off(make_model, metrics, match, tmp_path):
    """on_error="warn" (the default): the mismatched metric is off for the run with a warning; the others
    and training go on."""
    monitor = make_monitor(metrics, every_n_steps=1, probe_size=8)
    with pytest.warns(UserWarning, match=match):
        trainer(tmp_path, [monitor], max_steps=2, logger=False).fit(make_model(), loader())
    assert [row["step"] for row in monitor.history] == [0, 1, 2]
    assert all("linearity/lambda_min" in row for row in monitor.history)
    off = {"grad_cosines": "grad_cosine/", "linearization": "linearization_error"}
    assert not any(off[m] in key for m in metrics if m in off for row in monitor.history for key in row)


def test_default_cosine_layers_of_a_foreign_model_are_its_hidden_linear_layers(tmp_path):
    monitor = make_monitor(["grad_cosines"], every_n_steps=1, probe_size=4)
    trainer(tmp_path, [monitor], max_steps=1).fit(ForeignMLP(), loader())
    assert monitor.settings()["metrics"]["grad_cosines"]["layers"] == ["net.0", "net.3"]
    assert {key for key in monitor.history[-1] if key.startswith("linearity/grad_cosine/")} == {
        "linearity/grad_cosine/net.0",
        "linearity/grad_cosine/net.3",
    }


def test_sharded_strategies_are_refused_at_setup():
    fake_trainer = SimpleNamespace(fast_dev_run=False, strategy=FSDPStrategy())
    with pytest.raises(MisconfigurationException, match="not FSDPStrategy: sharded strategies"):
        LinearityMonitor().setup(fake_trainer, fcn(), "fit")
