"""The ``lightning-linearity`` command: every config runs, the LightningCLI subcommands, loggers from the
command line, and one clear line (no traceback) for the user's mistakes."""

from __future__ import annotations

import csv
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from jsonargparse import ArgumentError

import lightning_linearity
from lightning_linearity._compat import PRIMARY
from lightning_linearity.cli import TRACEBACK_ENV, LinearityCLI, _expected_error, main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
FCN = str(ROOT / "configs" / "fcn_digits.yaml")
# Tests run each config with its model shrunk to width 16 (the metrics' cost grows with the width).
SMALL = ["--model.init_args.width", "16", "--trainer.enable_progress_bar", "false"]


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """LightningCLI warns when both sys.argv (pytest's) and explicit args are given."""
    monkeypatch.setattr(sys, "argv", ["lightning-linearity"])


def shrink(config: Path) -> list[str]:
    """Arguments that shrink the model of ``config`` to width 16 (a bottleneck net keeps its shape)."""
    if "widths:" in config.read_text():
        return [*SMALL, "--model.init_args.widths", "[16, 4, 16]"]
    return SMALL


def fit(config: Path, save_dir: Path, *extra: str, steps: int = 2) -> Path:
    """Run ``fit`` on ``config`` for ``steps`` steps into ``save_dir``; return the run's log directory."""
    args = ["fit", "--config", str(config), *shrink(config), "--trainer.max_steps", str(steps)]
    assert main([*args, "--trainer.logger.init_args.save_dir", str(save_dir), *extra]) == 0
    (run,) = save_dir.glob("*/version_*")
    return run


def metric_columns(run: Path) -> set[str]:
    with open(run / "metrics.csv", newline="") as f:
        return {key for key in next(csv.reader(f)) if key.startswith("linearity/")}


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_trains_a_few_steps_with_the_monitor(config, tmp_path):
    run = fit(config, tmp_path)

    assert metric_columns(run), f"{config.name} logged no linearity/ metric"
    assert (run / "config.yaml").is_file() and (run / "linearity_curves.png").is_file()


def test_quick_start_config_logs_every_metric_family_and_the_plots(tmp_path, capsys):
    # one epoch of 3 batches, validated, so that ModelCheckpoint saves at its end
    epoch = ["--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1"]
    run = fit(Path(FCN), tmp_path, *epoch, "--data.init_args.num_samples", "192", steps=-1)

    # the run ends by saying where its files are and printing the last round as a table
    out = capsys.readouterr().out
    assert f"Run directory: {run}" in out and "metrics.csv" in out and "ntk_spectrum.png" in out
    with open(run / "metrics.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["linearity/lambda_min"]]
    assert f"| linearity/lambda_min | {float(rows[-1]['linearity/lambda_min']):.6g} |" in out

    assert {
        "linearity/lambda_min",
        "linearity/pl_ratio",
        "linearity/kernel_change",
        "linearity/hessian_norm_max",
        "linearity/grad_cosine/layer_3",
        "linearity/linearization_error_max",
        "linearity/distance_from_init",
    } <= metric_columns(run)
    assert {p.name for p in run.glob("*.png")} == {
        "linearity_curves.png",
        "ntk_spectrum.png",
        "grad_cosines.png",
    }
    checkpoints = list((run / "checkpoints").glob("*.ckpt"))
    assert checkpoints

    # validate / test / predict from the checkpoint, as with any LightningCLI
    for subcommand in ("validate", "test", "predict"):
        args = [subcommand, "--config", FCN, *SMALL, "--ckpt_path", str(checkpoints[0])]
        assert main([*args, "--trainer.logger.init_args.save_dir", str(tmp_path / subcommand)]) == 0
    with open(next((tmp_path / "test").glob("*/version_*/metrics.csv")), newline="") as f:
        assert "test/acc" in next(csv.reader(f))


def test_print_config_shows_the_short_names_resolved(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", FCN, "--print_config"])

    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    for name in ("lightning_linearity.NTKFCN", "DigitsDataModule", "LinearityMonitor", "CSVLogger"):
        assert name in out


def test_help_lists_the_subcommands_and_the_sweep(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])

    out = capsys.readouterr().out
    assert all(name in out for name in ("fit", "validate", "test", "predict", "sweep"))


def test_in_features_follow_the_data_and_csv_is_the_default_logger():
    cli = LinearityCLI(
        ["--model", "NTKFCN", "--data", "GaussianDataModule", "--data.in_features", "7"], run=False
    )

    assert cli.model.hparams.in_features == 7
    assert isinstance(cli.trainer.logger, PRIMARY.loggers.CSVLogger)
    assert Path(cli.trainer.logger.save_dir) == Path("runs")


def test_tensorboard_selected_on_the_command_line_gets_scalars_and_images(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = fit(Path(FCN), tmp_path, "--trainer.logger", "TensorBoardLogger")

    events = EventAccumulator(str(run))
    events.Reload()
    assert "linearity/lambda_min" in events.Tags()["scalars"]
    assert "linearity_plots/linearity_curves" in events.Tags()["images"]
    assert (run / "linearity_curves.png").is_file()


def test_sweep_is_handed_to_the_sweep_module(monkeypatch):
    seen = []
    fake = types.ModuleType("lightning_linearity.sweep")
    fake.main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "lightning_linearity.sweep", fake)

    assert main(["sweep", "--config", "x.yaml"]) == 7
    assert seen == [["--config", "x.yaml"]]


# ------------------------------------------------------------------------------------------ bad input
def unknown_model_config(tmp_path: Path) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  class_path: NTKFoo\n  init_args: {width: 8}\n")
    return str(path)


def unknown_callback_config(tmp_path: Path) -> str:
    path = tmp_path / "bad_callback.yaml"
    path.write_text(
        Path(FCN).read_text().replace("class_path: LinearityMonitor", "class_path: LinearityMonitr")
    )
    return str(path)


BAD_INPUT = {
    "unknown model in a config": (
        lambda tmp: ["fit", "--config", unknown_model_config(tmp)],
        ["model: unknown class 'NTKFoo'", "NTKFCN", "MaskedDAGNet"],
        2,
    ),
    "unknown callback in a config": (
        lambda tmp: ["fit", "--config", unknown_callback_config(tmp)],
        ["trainer.callbacks: unknown class 'LinearityMonitr'", "LinearityMonitor"],
        2,
    ),
    "wrong argument type": (
        lambda tmp: ["fit", "--config", FCN, "--model.init_args.width", "abc"],
        ["model.width: Expected int. Got value: abc"],
        2,
    ),
    "value the model rejects": (
        lambda tmp: ["fit", "--config", FCN, "--model.init_args.width", "-3"],
        ["NTKFCN: width must be a positive integer, got -3"],
        1,
    ),
    "value the monitor rejects": (
        lambda tmp: ["fit", "--config", FCN, "--trainer.callbacks.init_args.every_n_steps", "0"],
        ["LinearityMonitor: every_n_steps must be an integer >= 1"],
        1,
    ),
    "missing data folder": (
        lambda tmp: [
            "fit",
            "--config",
            FCN,
            "--data",
            "CIFAR10DataModule",
            "--data.data_dir",
            str(tmp / "nowhere"),
        ],
        ["CIFAR10DataModule: CIFAR-10 folder not found", "nowhere"],
        1,
    ),
    "missing config file": (
        lambda tmp: ["fit", "--config", str(tmp / "nothere.yaml")],
        ["config: File does not exist", "nothere.yaml"],
        2,
    ),
    "unknown subcommand": (lambda tmp: ["fitt"], ["invalid choice: 'fitt'"], 2),
    "unknown packaged config": (
        lambda tmp: ["fit", "--config", "fcn_digit"],
        ["--config 'fcn_digit' does not exist: it is neither a file nor a packaged config", "fcn_digits"],
        2,
    ),
    "optimiser set twice": (
        lambda tmp: ["fit", "--config", FCN, "--optimizer", "AdamW"],
        ["the optimiser is set twice: model.init_args lr=0.1 and optimizer AdamW; set it in one place"],
        1,
    ),
}


def test_lightning_cli_optimizer_is_what_the_hparams_record(tmp_path, monkeypatch):
    """--optimizer AdamW trains with AdamW, and hparams.yaml says so (not the model's unused sgd / lr)."""
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", FCN, "--model.init_args.lr", "0.01", "--model.init_args.width", "16"]
    args += ["--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false"]
    assert main([*args, "--optimizer", "AdamW", "--optimizer.lr", "0.003"]) == 0
    (hparams,) = tmp_path.glob("runs/fcn_digits/version_*/hparams.yaml")
    recorded = yaml.safe_load(hparams.read_text())
    assert recorded["optimizer"] == "torch.optim.AdamW" and recorded["lr"] == 0.003
    assert recorded["momentum"] is None and recorded["weight_decay"] == 0.01  # AdamW's own default


def test_packaged_config_by_name_and_version(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: the name resolves inside the package
    args = ["fit", "--config", "fcn_digits", "--model.init_args.width", "16", "--trainer.max_steps", "1"]
    assert main([*args, "--trainer.enable_progress_bar", "false"]) == 0
    assert list(tmp_path.glob("runs/fcn_digits/version_0/metrics.csv"))
    capsys.readouterr()
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"lightning-linearity {lightning_linearity.__version__} ")


@pytest.mark.parametrize("case", BAD_INPUT, ids=list(BAD_INPUT))
def test_bad_input_is_one_clear_line(case, tmp_path, capsys):
    make_args, expected, status = BAD_INPUT[case]

    assert main(make_args(tmp_path)) == status

    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1]
    assert errors[0].startswith("lightning-linearity: error: ")
    for text in expected:
        assert text in errors[0]


@pytest.mark.parametrize(
    ("logger", "modules", "extra"),
    [
        ("WandbLogger", ["wandb"], "wandb"),
        ("TensorBoardLogger", ["tensorboard", "tensorboardX"], "tensorboard"),
    ],
)
def test_logger_without_its_package_names_the_extra(logger, modules, extra, monkeypatch, capsys):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # "not installed": importing it fails

    assert main(["fit", "--config", FCN, "--trainer.logger", logger]) == 1

    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"lightning-linearity: error: {logger} needs the {modules[0]} package: "
        f"pip install lightning-linearity[{extra}]"
    )


def test_wandb_account_errors_are_user_errors_and_bugs_are_not():
    usage_error = type("UsageError", (Exception,), {"__module__": "wandb.errors.errors"})

    report = _expected_error(usage_error("No API key configured.\nmore"))
    assert report == "W&B: No API key configured. (to log without an account: WANDB_MODE=offline)"
    assert _expected_error(FileNotFoundError("no such folder")) == "no such folder"
    assert _expected_error(RuntimeError("a bug")) is None


def test_traceback_on_request(monkeypatch):
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(ArgumentError):
        main(["fit", "--config", FCN, "--model.init_args.width", "abc"])


def test_console_script_and_module_entry_points():
    script = Path(sys.executable).parent / "lightning-linearity"
    shown = subprocess.run(
        [str(script), "fit", "--config", FCN, "--print_config"], capture_output=True, text=True
    )
    assert shown.returncode == 0 and "LinearityMonitor" in shown.stdout

    bad = subprocess.run(
        [sys.executable, "-m", "lightning_linearity", "fit", "--config", FCN, "--trainer.max_steps", "x"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        "lightning-linearity: error: trainer.max_steps: Expected int. Got value: x"
    )
