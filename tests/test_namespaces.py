"""Everything public works with both Lightning namespaces, ``lightning`` and ``pytorch_lightning``, installed
side by side: the callback, the LightningModules, the DataModules, W&B, and LightningCLI configs, each with a
real Trainer of that namespace (and a user's own LightningModule of that namespace)."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from lightning_linearity import NTKFCN, LinearityMonitor, MaskedDAGNet, NTKDenseNet
from lightning_linearity._compat import NAMESPACE_NAMES, NAMESPACES, MisconfigurationException
from lightning_linearity.data import DigitsDataModule, GaussianDataModule, TensorDataModule
from lightning_linearity.keys import is_timing

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's small-data/worker notices


def test_both_namespaces_are_installed():
    """The tests below are only meaningful if both are there (the package depends on both)."""
    assert [ns.__name__ for ns in NAMESPACES] == list(NAMESPACE_NAMES)


@pytest.fixture(params=NAMESPACE_NAMES)
def ns(request):
    return importlib.import_module(request.param)


def make_trainer(ns, tmp_path, callbacks=(), **kwargs):
    kwargs.setdefault("logger", ns.loggers.CSVLogger(tmp_path, name="", version=""))
    kwargs.setdefault("enable_checkpointing", False)
    return ns.Trainer(
        default_root_dir=tmp_path,
        max_steps=2,
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def measured_keys(monitor):
    return {key for row in monitor.history for key in row if key != "step" and not is_timing(key)}


DEFAULT_KEYS = {
    "linearity/lambda_min",
    "linearity/lambda_max",
    "linearity/condition_number",
    "linearity/ntk_trace",
    "linearity/pl_ratio",
    "linearity/catapult",
    "linearity/kernel_change",
    "linearity/kernel_change_max",
    "linearity/hessian_norm_max",
    "linearity/hessian_norm_mean",
}


@pytest.mark.parametrize(
    "family, data",
    [
        (NTKFCN, lambda: DigitsDataModule(num_samples=32, batch_size=16, classes=[0, 1])),
        (NTKDenseNet, lambda: GaussianDataModule(in_features=6, num_samples=16, full_batch=True)),
        (MaskedDAGNet, lambda: DigitsDataModule(num_samples=32, batch_size=16, classes=[0, 1])),
    ],
)
def test_package_modules_and_data_train_with_the_monitor(ns, family, data, tmp_path):
    datamodule = data()
    out = 1 if family is NTKDenseNet else 2
    model = family(datamodule.in_features, out, width=16, depth=2, init_seed=0, lr=0.05)
    assert isinstance(model, ns.LightningModule) and isinstance(datamodule, ns.LightningDataModule)
    monitor = LinearityMonitor(every_n_steps=1, probe_size=8, plots=False)
    checkpoint = ns.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(ns, tmp_path, [monitor, checkpoint], enable_checkpointing=True)
    trainer.fit(model, datamodule=datamodule)
    assert trainer.global_step == 2 and [row["step"] for row in monitor.history] == [0, 1, 2]
    assert DEFAULT_KEYS <= measured_keys(monitor)
    assert {"linearity/grad_cosine/layer_1", "linearity/grad_cosine/layer_2"} <= measured_keys(monitor)
    reloaded = family.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    for a, b in zip(reloaded.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b.cpu())
    trainer.validate(model, datamodule=datamodule)  # the other loops take the modules too


def foreign_module(ns, kind: str):
    """A user's own LightningModule of namespace ``ns``: a plain MLP or a small CNN on (1, 8, 8) inputs."""

    class Foreign(ns.LightningModule):
        def __init__(self):
            super().__init__()
            if kind == "mlp":
                self.net = nn.Sequential(
                    nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)
                )
            else:
                self.net = nn.Sequential(
                    nn.Conv2d(1, 4, 3, padding=1),
                    nn.Tanh(),
                    nn.Conv2d(4, 4, 3, stride=2),
                    nn.Tanh(),
                    nn.AdaptiveAvgPool2d(1),
                    nn.Flatten(),
                    nn.Linear(4, 3),
                )

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    return Foreign()


@pytest.mark.parametrize("kind, layers", [("mlp", ["net.1", "net.3"]), ("cnn", ["net.0", "net.2"])])
def test_monitor_defaults_log_every_default_key_on_a_foreign_model(ns, kind, layers, tmp_path):
    generator = torch.Generator().manual_seed(0)
    images = TensorDataModule(
        x=torch.rand(24, 1, 8, 8, generator=generator), y=torch.arange(24) % 3, batch_size=8
    )
    monitor = LinearityMonitor(plots=False, probe_size=6)  # the defaults otherwise
    make_trainer(ns, tmp_path, [monitor]).fit(foreign_module(ns, kind), datamodule=images)
    assert monitor.settings()["metrics"]["grad_cosines"]["layers"] == layers
    cosines = {f"linearity/grad_cosine/{layer}" for layer in layers}
    assert measured_keys(monitor) == DEFAULT_KEYS | cosines
    assert [row["step"] for row in monitor.history] == [0, 2]
    assert all(value == value for row in monitor.history for value in row.values())  # no NaN


def test_exceptions_are_those_of_both_namespaces(ns):
    with pytest.raises(ns.utilities.exceptions.MisconfigurationException, match="every_n_steps"):
        LinearityMonitor(every_n_steps=0)
    assert issubclass(MisconfigurationException, ns.utilities.exceptions.MisconfigurationException)


def test_wandb_offline_run_gets_metrics_axis_and_images(ns, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from test_wandb import finished_run_records, items

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = ns.loggers.WandbLogger(project="ll-ns", save_dir=str(tmp_path))
    monitor = LinearityMonitor(metrics=["ntk", "grad_cosines"], every_n_steps=1, probe_size=8)
    data = DigitsDataModule(num_samples=32, batch_size=16, classes=[0, 1])
    try:
        make_trainer(ns, tmp_path, [monitor], logger=logger).fit(
            NTKFCN(64, 2, width=16, depth=2, init_seed=0), datamodule=data
        )
    finally:
        wandb.finish()
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    records = finished_run_records(run_file)
    history = [items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    metrics = {
        r.metric.glob_name: r.metric.step_metric for r in records if r.WhichOneof("record_type") == "metric"
    }
    assert metrics["linearity/*"] == "trainer/global_step"
    assert [row["trainer/global_step"] for row in history if "linearity/lambda_min" in row] == [0, 1, 2]
    assert any("linearity_plots/linearity_curves/filenames" in row for row in history)


def test_lightning_cli_of_the_namespace_takes_the_package_classes(ns, tmp_path, monkeypatch):
    """A user's own LightningCLI (not the package's command) with the package's classes in its config."""
    config = tmp_path / "user_config.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            model:
              class_path: lightning_linearity.NTKFCN
              init_args: {{in_features: 64, out_features: 2, width: 16, depth: 2}}
            data:
              class_path: lightning_linearity.data.DigitsDataModule
              init_args: {{num_samples: 32, batch_size: 16, classes: [0, 1]}}
            trainer:
              max_steps: 2
              default_root_dir: {tmp_path / "run"}
              enable_progress_bar: false
              logger: false
              callbacks:
                - class_path: lightning_linearity.LinearityMonitor
                  init_args: {{metrics: [ntk], every_n_steps: 1, probe_size: 4, plots: false}}
            """
        )
    )
    monkeypatch.setattr(sys, "argv", ["cli"])
    cli_module = importlib.import_module(f"{ns.__name__}.cli")
    cli = cli_module.LightningCLI(
        args=["fit", "--config", str(config)], subclass_mode_model=True, subclass_mode_data=True
    )
    (monitor,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, LinearityMonitor)]
    assert cli.trainer.global_step == 2 and [row["step"] for row in monitor.history] == [0, 1, 2]


@pytest.mark.parametrize("missing", NAMESPACE_NAMES)
def test_the_package_works_with_only_one_namespace_installed(missing, tmp_path):
    """With one namespace hidden from imports, the package uses the other one alone."""
    script = textwrap.dedent(
        f"""
        import sys, importlib.abc

        class Hide(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == {missing!r} or name.startswith({missing!r} + "."):
                    raise ImportError("hidden: " + name)

        sys.meta_path.insert(0, Hide())
        from lightning_linearity import LinearityMonitor, NTKFCN, _compat
        import torch
        from torch.utils.data import DataLoader, TensorDataset
        (ns,) = _compat.NAMESPACES
        assert ns.__name__ != {missing!r}
        monitor = LinearityMonitor(metrics=["ntk"], every_n_steps=1, probe_size=4, plots=False)
        data = DataLoader(TensorDataset(torch.randn(8, 3), torch.randn(8, 1)), batch_size=4)
        trainer = ns.Trainer(max_steps=2, callbacks=[monitor], logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(NTKFCN(3, 1, width=8, depth=1), data)
        print("rounds", [row["step"] for row in monitor.history], ns.__name__)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rounds [0, 1, 2]" in done.stdout
