"""Width sweeps: configuration checks, metric collection, the run store, resume, parallel runs, CLI."""

from __future__ import annotations

import csv
import math
import subprocess
import sys

import pytest
import torch
import yaml

import lightning_linearity.sweep as sweep_module
import lightning_linearity.sweeps.run as run_module
from lightning_linearity.metrics import analytic_ntk, empirical_ntk
from lightning_linearity.sweep import main, run_sweep
from lightning_linearity.sweeps.collect import collect, monitor_metrics, parse_metric_spec
from lightning_linearity.sweeps.config import SweepConfig, SweepError, load_config_file
from lightning_linearity.sweeps.run import build_data, build_model, execute_run
from lightning_linearity.sweeps.store import RunStore

#: A sweep that trains in well under a second per run.
TINY = {
    "model": "NTKFCN",
    "model_args": {"depth": 2, "out_features": 1},
    "data": {"name": "digits", "classes": [0, 1], "num_samples": 6},
    "widths": [4, 8, 16],
    "metrics": ["lambda_min:init", "kernel_change:max"],
    "max_steps": 5,
    "every_n_steps": 2,
    "threads": 1,
    "progress": False,
}


def tiny(tmp_path, **overrides) -> SweepConfig:
    return SweepConfig(**{**TINY, "out": str(tmp_path / "out"), **overrides})


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"widths": [0, 8, 16]}, "widths must be positive integers"),
        ({"widths": [8, 16.5, 32]}, "widths must be positive integers"),
        ({"widths": [8, True, 32]}, "widths must be positive integers"),
        ({"widths": [8, 16]}, "at least 3 widths"),
        ({"widths": [8, 8, 16]}, "must not repeat"),
        ({"widths": 8}, "widths must be a list"),
        ({"seeds": [-1]}, "seeds must be distinct non-negative"),
        ({"metrics": ["curvature"]}, "cannot collect metric 'curvature'"),
        ({"metrics": ["kernel_change:median"]}, "unknown reduction"),
        ({"metrics": []}, "at least one metric"),
        ({"metrics": ["lambda_min/layer_2"]}, "only per-layer metrics take a layer"),
        ({"mode": "init", "metrics": ["kernel_change"]}, "only moves with training"),
        ({"mode": "init", "metrics": ["lambda_min:max"]}, "only the value at initialisation"),
        ({"model": "ResNet"}, "model must be one of"),
        ({"model_args": {"lr": 0.1}}, "must not set"),
        ({"model_args": {"widths": [100, 8, 100]}}, "placeholder 'm'"),
        ({"data": {"name": "mnist"}}, "data.name must be one of"),
        ({"lr": 0.1}, "exactly one of lr"),
        ({"lr_scale": -1.0}, "lr_scale must be a positive number"),
        ({"max_steps": 0}, "max_steps must be a positive integer"),
        ({"jobs": 0}, "jobs must be a positive integer"),
        ({"threads": 0}, "threads must be a positive integer"),
        ({"reference_slope": "half"}, "reference_slope must be a number"),
        ({"fit_against": "depth"}, "fit_against must be one of"),
        ({"curves": ["grad_cosine"]}, "cannot plot 'grad_cosine' against the step"),
        ({"mode": "init", "metrics": ["lambda_min"], "curves": ["lambda_min"]}, "need mode 'train'"),
        ({"frozen_layers": [0]}, "frozen_layers must be distinct layer numbers"),
        ({"frozen_layers": [1, 1]}, "frozen_layers must be distinct layer numbers"),
        ({"frozen_layers": [True]}, "frozen_layers must be distinct layer numbers"),
        ({"frozen_layers": 1}, "frozen_layers must be a list"),
        ({"log_corrected": "yes"}, "log_corrected must be true or false"),
        ({"log_corrected": True, "reference_slope": None}, "log_corrected needs reference_slope"),
    ],
)
def test_bad_config_is_refused(tmp_path, overrides, match):
    with pytest.raises(SweepError, match=match):
        tiny(tmp_path, **overrides)


def test_output_folder_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "taken"
    path.write_text("not a folder")
    with pytest.raises(SweepError, match="is a file"):
        SweepConfig(**{**TINY, "out": str(path)})


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"model_args": {"depth": 0}}, "cannot build NTKFCN"),
        ({"data": {"name": "digits", "classes": [0, 11]}}, "cannot build the data"),
        ({"metrics": ["grad_cosine/layer_7"]}, "no hidden layer 'layer_7'"),
        ({"monitor_args": {"hessian_norm": {"max_iter": 5}}}, "none of the requested metrics uses"),
        ({"monitor_args": {"ntk": {"colour": "red"}}}, "unknown option"),
        ({"claims": [{"column": "loss:last", "decreasing": True}]}, "does not collect it"),
        ({"claims": [{"column": "kernel_change:max"}]}, "tests nothing"),
        ({"claims": [{"column": "kernel_change:max", "log_power": [0, 1]}]}, "need log_corrected: true"),
        ({"claims": [{"column": "kernel_change:max", "log_power": [1, 0]}]}, "log_power must be a range"),
        ({"frozen_layers": [4]}, "the network has layers 1..3"),
        ({"frozen_layers": [1, 2, 3]}, "freezes all 3 layers"),
    ],
)
def test_mistakes_found_before_any_run_starts(tmp_path, monkeypatch, overrides, match):
    monkeypatch.setattr(sweep_module, "execute_run", pytest.fail)
    with pytest.raises(SweepError, match=match):
        run_sweep(tiny(tmp_path, **overrides))


def test_run_identity_is_the_full_parameter_set(tmp_path):
    base = tiny(tmp_path)
    ids = {spec.run_id for spec in base.runs()}
    assert len(ids) == 3  # three widths, one seed
    assert base.runs()[0].params()["monitor"]["kernel_change"]  # the monitor's defaults, resolved
    assert tiny(tmp_path, out=str(tmp_path / "elsewhere"), jobs=2).runs()[0].run_id == base.runs()[0].run_id
    changes = (
        {"max_steps": 6},
        {"lr_scale": 0.25},
        {"metrics": ["lambda_min:init"]},
        {"seeds": [1]},
        {"monitor_args": {"ntk": {"pl_ratio": False}}},  # the monitor's options, defaults resolved, count
        {"frozen_layers": [1]},
    )
    for change in changes:
        assert tiny(tmp_path, **change).runs()[0].run_id not in ids


def test_run_identity_without_frozen_layers_is_unchanged(tmp_path):
    """Sweeps that freeze nothing keep the run ids (and so the finished runs) they had before the field."""
    assert "frozen_layers" not in tiny(tmp_path).runs()[0].params()
    assert tiny(tmp_path, frozen_layers=[2, 1]).runs()[0].params()["frozen_layers"] == [1, 2]


@pytest.mark.parametrize("model", ["NTKFCN", "NTKDenseNet", "MaskedDAGNet"])
def test_frozen_layers_are_not_trained_and_not_in_w(tmp_path, model):
    config = tiny(tmp_path, model=model, frozen_layers=[1])
    net = build_model(config, 8, 0, 64).layered_net
    assert [p.requires_grad for p in net.layers[0].parameters()] == [False]
    assert all(p.requires_grad for layer in net.layers[1:] for p in layer.parameters())
    # what the sweep trains is what it measures: one row of K per point, from the trainable weights only
    x = torch.randn(3, 64, dtype=torch.float64)
    net = net.double()
    trainable = [p for p in net.parameters() if p.requires_grad]
    jacobian = torch.cat(
        [
            j.reshape(3, -1)
            for j in torch.autograd.functional.jacobian(
                lambda *w: _forward(net, trainable, w, x), tuple(trainable)
            )
        ],
        dim=1,
    )
    torch.testing.assert_close(empirical_ntk(net, x), jacobian @ jacobian.T)


def _forward(net, params, values, x):
    """``net(x)[:, 0]`` with ``params`` replaced by ``values`` (for an explicit Jacobian)."""
    names = {id(p): name for name, p in net.named_parameters()}
    replaced = {names[id(p)]: v for p, v in zip(params, values, strict=True)}
    return torch.func.functional_call(net, replaced, (x,))[:, 0]


def test_frozen_first_layer_stays_at_its_initial_values(tmp_path, monkeypatch):
    config = tiny(tmp_path, frozen_layers=[1], metrics=["hessian_norm:init", "hessian_norm:last"])
    built = []
    monkeypatch.setattr(
        run_module, "build_model", lambda *args: built.append(build_model(*args)) or built[-1]
    )
    record, _ = execute_run(config.runs()[-1])
    assert record["steps"] == 5 and record["hessian_norm:last"] > 0
    trained, initial = built[0].layered_net.layers, build_model(config, 16, 0, 64).layered_net.layers
    torch.testing.assert_close(trained[0].weight, initial[0].weight, rtol=0, atol=0)
    assert not torch.equal(trained[1].weight, initial[1].weight)


def test_kernel_regime_is_the_distance_of_k0_from_the_analytic_kernel(tmp_path):
    config = tiny(
        tmp_path, mode="init", metrics=["kernel_regime"], model_args={"depth": 2, "out_features": 2}
    )
    spec = config.runs()[1]
    record, _ = execute_run(spec)
    data = build_data(config)
    model = build_model(config, spec.width, spec.seed, data.in_features)
    x = data.train_split.x
    limit = torch.kron(analytic_ntk(model, x), torch.eye(2))
    distance = torch.linalg.matrix_norm(empirical_ntk(model, x) - limit, ord=2) / torch.linalg.matrix_norm(
        limit, ord=2
    )
    assert record["kernel_regime:init"] == pytest.approx(float(distance), rel=1e-4)


def test_log_corrected_fits_are_reported_and_claimed(tmp_path):
    claim = {"column": "lambda_min:init", "log_power": [-100, 100], "paper": "a test"}
    result = run_sweep(tiny(tmp_path, seeds=[0, 1], log_corrected=True, claims=[claim]))
    free, fixed = result.corrected["lambda_min:init"]
    assert not free.slope_fixed and fixed.slope_fixed and fixed.slope == -0.5
    report = result.files["report"].read_text()
    assert "Log-corrected fits" in report and "b at alpha = -0.5" in report
    assert result.passed and "expected b in [-100, 100]" in report


def test_bottleneck_placeholder_is_replaced_by_the_width(tmp_path):
    config = tiny(tmp_path, model_args={"widths": [50, "m", 50], "out_features": 1})
    assert config.model_kwargs(8)["widths"] == [50, 8, 50]


def test_config_file_profiles(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(
        "widths: [4, 8, 16]\nmetrics: [lambda_min]\nseeds: [0, 1]\n"
        "profiles:\n  small: {seeds: [0]}\n  bad: {colour: red}\n"
    )
    assert load_config_file(path)["seeds"] == [0, 1]
    assert load_config_file(path, "small")["seeds"] == [0]
    with pytest.raises(SweepError, match="no profile 'huge'"):
        load_config_file(path, "huge")
    with pytest.raises(SweepError, match="unknown field"):
        load_config_file(path, "bad")
    with pytest.raises(SweepError, match="does not exist"):
        load_config_file(tmp_path / "missing.yaml")


# ------------------------------------------------------------------------------------------ collect
HISTORY = [
    {"step": 0, "linearity/lambda_min": 0.4, "linearity/pl_ratio": 0.8, "linearity/grad_cosine/layer_2": 0.3},
    {"step": 0, "train/loss": 2.0},
    {"step": 1, "train/loss": 1.0},
    {"step": 2, "linearity/lambda_min": 0.2, "linearity/pl_ratio": 0.3, "linearity/kernel_change": 0.5},
    {"step": 2, "train/loss": 0.5},
    {"step": 4, "linearity/lambda_min": 0.3, "linearity/pl_ratio": 0.9, "linearity/kernel_change": 0.25},
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("lambda_min:init", 0.4),
        ("lambda_min:last", 0.3),
        ("lambda_min", 0.2),  # default reduction: min
        ("lambda_min:max", 0.4),
        ("kernel_change", 0.5),  # default reduction: max
        ("kernel_change:last", 0.25),
        ("loss", 0.5),
        ("loss:init", 2.0),
        ("pl_margin", 1.5),  # min over rounds of pl_ratio / lambda_min = min(2, 1.5, 3)
        ("lambda_min_retained", 0.5),  # min of lambda_min_t / lambda_min_0
    ],
)
def test_reductions_over_the_history(text, expected):
    spec = parse_metric_spec(text)
    values = collect([spec], HISTORY, ["layer_1", "layer_2"])
    assert values == {f"{spec.name}:{spec.reduction}": pytest.approx(expected)}


def test_per_layer_columns_and_missing_values():
    values = collect([parse_metric_spec("grad_cosine")], HISTORY, ["layer_1", "layer_2"])
    assert values["grad_cosine/layer_2:last"] == pytest.approx(0.3)
    assert math.isnan(values["grad_cosine/layer_1:last"])  # no round logged it


def test_monitor_metrics_always_measure_the_kernel_and_restrict_layers():
    specs = [parse_metric_spec("grad_cosine/layer_2"), parse_metric_spec("hessian_norm:init")]
    options = monitor_metrics(specs, {"hessian_norm": {"max_iter": 20}})
    assert options == {"grad_cosines": {"layers": ["layer_2"]}, "hessian_norm": {"max_iter": 20}, "ntk": {}}


# -------------------------------------------------------------------------------------------- store
def test_store_round_trip_and_new_columns(tmp_path):
    store = RunStore(tmp_path)
    store.add({"run_id": "0123", "width": 8, "seed": 0, "a:last": 0.5, "status": "converged"}, [{"step": 0}])
    store.add({"run_id": "abcd", "width": 16, "seed": 0, "a:last": math.nan, "b:max": 2.0, "status": "x"}, [])
    reread = RunStore(tmp_path)
    assert "0123" in reread and "abcd" in reread and len(reread) == 2
    first, second = reread.rows(["0123", "abcd"])
    assert first["run_id"] == "0123" and first["width"] == 8 and first["a:last"] == 0.5
    assert math.isnan(first["b:max"]) and math.isnan(second["a:last"]) and second["b:max"] == 2.0
    assert reread.histories(["0123"]) == {"0123": [{"step": 0}]}
    with (tmp_path / "runs.csv").open() as handle:
        assert next(csv.reader(handle)) == ["run_id", "width", "seed", "a:last", "status", "b:max"]


# ----------------------------------------------------------------------------- sweeps end to end
def test_sweep_writes_csv_report_and_plots_and_resumes(tmp_path, monkeypatch):
    calls, real = [], sweep_module.execute_run

    def counting(spec):
        calls.append(spec.run_id)
        return real(spec)

    monkeypatch.setattr(sweep_module, "execute_run", counting)
    result = run_sweep(tiny(tmp_path, curves=["lambda_min_retained"], reference_slope=None))
    assert len(calls) == 3 and result.executed == 3
    assert [row["width"] for row in result.rows] == [4, 8, 16]
    for row in result.rows:
        assert row["status"] == "max_steps" and row["steps"] == 5
        assert row["kernel_change:max"] > 0 and row["lambda_min:init"] > 0
        assert row["lr"] == pytest.approx(0.5 / row["lambda_max_0"])
    assert set(result.fits) == {"lambda_min:init", "kernel_change:max"}
    assert result.slope("kernel_change:max").num_runs == 3
    for name in ("sweep.md", "sweep_kernel_change_max.png", "sweep_lambda_min_init.png", "runs.csv",
                 "sweep_lambda_min_retained_vs_step.png"):  # fmt: skip
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert "| `kernel_change:max` |" in (tmp_path / "out" / "sweep.md").read_text()

    again = run_sweep(tiny(tmp_path, seeds=[0, 1], curves=["lambda_min_retained"]))  # seed 1 runs only
    assert len(calls) == 6 and again.executed == 3
    assert [row["width"] for row in again.rows] == [4, 4, 8, 8, 16, 16]
    assert again.rows[0] == result.rows[0]


def test_init_mode_takes_no_step(tmp_path):
    result = run_sweep(tiny(tmp_path, mode="init", metrics=["lambda_min", "hessian_norm"]))
    for row in result.rows:
        assert row["status"] == "init" and row["steps"] == 0
        assert row["hessian_norm:init"] > 0


def test_too_large_a_step_is_reported_as_diverged(tmp_path):
    """eta = 8 / lambda_max(K_0) is far beyond the stable 2 / lambda_max: the loss blows up."""
    record, _ = execute_run(tiny(tmp_path, lr_scale=8.0, max_steps=40).runs()[-1])
    assert record["status"] == "diverged" and record["steps"] < 40
    assert record["max_loss_ratio"] > 1 and record["eta_lambda_max"] > 2


def test_parallel_runs_match_sequential_runs(tmp_path):
    sequential = run_sweep(tiny(tmp_path / "seq"))
    parallel = run_sweep(tiny(tmp_path / "par", jobs=2))
    assert parallel.executed == 3
    for a, b in zip(sequential.rows, parallel.rows, strict=True):
        assert a["run_id"] == b["run_id"]
        assert b["kernel_change:max"] == pytest.approx(a["kernel_change:max"], rel=1e-4)


# ------------------------------------------------------------------------------------- command line
def test_cli_runs_a_sweep(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["--model", "NTKFCN", "--model_args", "{depth: 2, out_features: 1}",
            "--widths", "[4, 8, 16]", "--metrics", "[lambda_min:init]", "--mode", "init",
            "--data", "{name: digits, num_samples: 6}", "--out", str(out), "--progress", "false"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| `lambda_min:init` |" in printed and "3 runs (0 resumed" in printed
    assert main(argv) == 0
    assert "3 runs (3 resumed" in capsys.readouterr().out


def test_cli_flags_override_a_packaged_config_and_its_profile(capsys):
    argv = ["--config", "fig2_kernel_change", "--profile", "ci", "--seeds", "[0, 1]", "--lr", "0.01"]
    assert main([*argv, "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["widths"] == [16, 64, 256]  # from the ci profile
    assert printed["model"] == "MaskedDAGNet"  # from the file
    assert printed["seeds"] == [0, 1] and printed["lr"] == 0.01 and printed["lr_scale"] is None  # flags


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--widths", "[8, 16]", "--metrics", "[kernel_change]"], "at least 3 widths"),
        (["--widths", "[8, -16, 32]", "--metrics", "[kernel_change]"], "widths must be positive integers"),
        (["--widths", "[8, 16, 32]", "--metrics", "[entropy]"], "cannot collect metric 'entropy'"),
        (["--widths", "[8, 16, 32]"], "the sweep needs metrics"),
        (["--profile", "ci", "--widths", "[8, 16, 32]"], "--profile needs --config"),
        (["--config", "missing.yaml"], "does not exist"),
        (["--config", "fig2_kernel"], "is neither a file nor a packaged config"),
        (["--config", "fig2_kernel_change", "--profile", "huge"], "has no profile 'huge'"),
    ],
)
def test_cli_user_errors_are_one_line(argv, match, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lightning-linearity sweep: error:") and match in err


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--widths", "[8, x, 32]", "--metrics", "[lambda_min]"], "widths"),
        (["--widths", "[8, 16, 32]", "--metrics", "[lambda_min]", "--model_args", "depth"], "model_args"),
        (["--max_steps", "many"], "max_steps"),
        (["--colour", "red"], "colour"),
    ],
)
def test_cli_unparsable_arguments_are_one_line_with_status_2(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lightning-linearity sweep: error:") and match in err


def test_cli_output_folder_is_a_file(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("")
    argv = ["--widths", "[8, 16, 32]", "--metrics", "[lambda_min]", "--out", str(target)]
    assert main(argv) == 1
    assert "is a file" in capsys.readouterr().err


def test_python_dash_m_entry_point(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "lightning_linearity.sweep", "--widths", "[1,2]", "--metrics", "[lambda_min]"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "lightning-linearity sweep: error: a slope fit needs at least 3 widths, got [1, 2]"
    ]
