"""The end-of-fit report: figures from synthetic history/spectra, where the PNGs go, images in TensorBoard."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger

from lightning_linearity.keys import GROUPS
from lightning_linearity.plots import (
    CAPTIONS,
    comparison_figure,
    cosines_figure,
    curves_figure,
    metric_series,
    report_dir,
    spectrum_figure,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_history(steps=(0, 10, 20, 30)) -> list[dict]:
    """Rows as LinearityMonitor logs them; lambda_min spans decades, the Hessian norm does not."""
    return [
        {
            "step": step,
            "linearity/lambda_min": 10.0 ** (-step / 10),
            "linearity/lambda_max": 50.0 + step,
            "linearity/kernel_change": 0.01 * step,
            "linearity/hessian_norm_max": 0.3 + 0.001 * step,
            "linearity/hessian_norm_mean": 0.2,
            "linearity/grad_cosine/layer_1": 0.30 - 0.001 * step,
            "linearity/grad_cosine/layer_2": 0.20,
            "linearity/grad_cosine/layer_10": 0.05,
        }
        for step in steps
    ]


def trainer_with(tmp_path, logger) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=tmp_path, logger=logger, enable_progress_bar=False, enable_model_summary=False
    )


def panels(fig) -> dict[str, object]:
    return {ax.get_title(): ax for ax in fig.axes}


def test_write_report_writes_three_pngs_into_the_csv_log_dir(tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    spectra = {"init": np.array([3.0, 1.0, 0.1]), "final": np.array([2.5, 1.2, 0.2])}

    paths = write_report(trainer_with(tmp_path, logger), synthetic_history(), spectra)

    assert set(paths) == {"linearity_curves", "ntk_spectrum", "grad_cosines"}
    for name, path in paths.items():
        assert path == tmp_path / "run" / "version_0" / f"{name}.png"
        assert path.read_bytes()[:8] == PNG_MAGIC
        assert path.stat().st_size > 10_000  # a drawn figure, not an empty canvas


def test_figures_with_missing_data_are_skipped(tmp_path):
    trainer = trainer_with(tmp_path, CSVLogger(tmp_path))
    without_cosines = [{"step": 0, "linearity/lambda_min": 1.0}, {"step": 5, "linearity/lambda_min": 2.0}]

    assert set(write_report(trainer, without_cosines, {})) == {"linearity_curves"}
    assert set(write_report(trainer, [], {"init": np.array([1.0, 2.0])})) == {"ntk_spectrum"}
    assert write_report(trainer, [], {}) == {}
    assert write_report(trainer, [{"step": 0}], {"init": np.array([])}) == {}


def test_metric_series_sorts_by_step_and_drops_what_cannot_be_drawn():
    history = [
        {"step": 20, "linearity/a": 2.0, "other/b": 1.0},
        {"step": 10, "linearity/a": 1.0, "linearity/c": float("nan")},
        {"step": 30, "linearity/a": "n/a", "linearity/c": float("inf")},
    ]

    series = metric_series(history)

    assert list(series) == ["linearity/a"]
    steps, values = series["linearity/a"]
    assert steps.tolist() == [10, 20] and values.tolist() == [1.0, 2.0]


def test_curves_group_related_keys_and_choose_the_y_scale():
    fig = curves_figure(synthetic_history())
    by_title = panels(fig)

    lam = by_title[GROUPS["lambda"].title]
    assert sorted(text.get_text() for text in lam.get_legend().get_texts()) == ["max", "min"]
    assert lam.get_yscale() == "log"  # lambda_min falls by three decades
    hessian = by_title[GROUPS["hessian_norm"].title]
    assert sorted(line.get_label() for line in hessian.get_lines()) == ["max", "mean"]
    assert hessian.get_yscale() == "linear"  # 0.2 .. 0.33: a log axis would be unreadable
    assert by_title[GROUPS["kernel_change"].title].get_yscale() == "linear"  # starts at 0
    cosines = by_title[GROUPS["grad_cosine"].title]
    assert [line.get_label() for line in cosines.get_lines()] == ["layer 1", "layer 2", "layer 10"]
    # panels follow docs/math.md's order
    assert [ax.get_title() for ax in fig.axes] == [
        GROUPS[group].title for group in ("lambda", "kernel_change", "hessian_norm", "grad_cosine")
    ]
    assert fig.get_suptitle() == CAPTIONS["linearity_curves"]


def test_unknown_metric_groups_get_their_own_panel():
    fig = curves_figure([{"step": 0, "linearity/my_metric": 1.0}, {"step": 1, "linearity/my_metric": 3.0}])

    assert [ax.get_title() for ax in fig.axes] == ["my metric"]
    assert fig.axes[0].get_xlabel() == "global step"


def test_grad_cosines_bars_show_the_last_round():
    fig = cosines_figure(synthetic_history(steps=(0, 40)))
    bars, curves = fig.axes

    heights = [patch.get_height() for patch in bars.patches]
    assert heights == pytest.approx([0.30 - 0.04, 0.20, 0.05])
    assert [label.get_text() for label in bars.get_xticklabels()] == ["layer 1", "layer 2", "layer 10"]
    assert "step 40" in bars.get_title()
    assert len(curves.get_lines()) == 3


def test_spectrum_is_sorted_and_drops_rounding_zeros_on_the_log_axis():
    fig = spectrum_figure(
        {"final": np.array([0.5, -1e-9, 4.0]), "init": np.array([1.0, 8.0, 0.01])}, final_step=7
    )
    ax = fig.axes[0]

    init, final = ax.get_lines()  # init first, whatever the dict order
    assert init.get_ydata().tolist() == [8.0, 1.0, 0.01]
    assert final.get_ydata().tolist() == [4.0, 0.5]
    assert ax.get_yscale() == "log"
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels[0].startswith("init") and "0.01" in labels[0]
    assert labels[1].startswith("final (step 7)") and "1 ≤ 0 not shown" in labels[1]


def test_report_dir_without_logger_is_the_default_root_dir(tmp_path):
    assert report_dir(trainer_with(tmp_path, False)) == tmp_path


class _RemoteLogger(Logger):
    """A logger that is neither CSV nor TensorBoard (like W&B): save_dir, name and an int version."""

    name = "project"
    version = 3
    save_dir = None

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_report_dir_of_another_logger_is_save_dir_name_version(tmp_path):
    logger = _RemoteLogger()
    logger.save_dir = str(tmp_path / "remote")

    assert report_dir(trainer_with(tmp_path, logger)) == tmp_path / "remote" / "project" / "version_3"


def test_tensorboard_receives_the_figures_as_images(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    paths = write_report(trainer_with(tmp_path, logger), synthetic_history(), {"init": np.array([2.0, 1.0])})
    logger.experiment.flush()

    assert all(path.parent == tmp_path / "tb" / "version_0" for path in paths.values())
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert set(events.Tags()["images"]) == {f"linearity_plots/{name}" for name in paths}


def test_pyplot_state_is_left_alone(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    backend, figures = matplotlib.get_backend(), plt.get_fignums()
    write_report(trainer_with(tmp_path, CSVLogger(tmp_path)), synthetic_history(), {"init": np.ones(3)})

    assert matplotlib.get_backend() == backend
    assert plt.get_fignums() == figures


def test_log_span_threshold_is_a_decade():
    fig = curves_figure([{"step": 0, "linearity/x": 1.0}, {"step": 1, "linearity/x": 10.0 + math.ulp(10.0)}])
    assert fig.axes[0].get_yscale() == "log"
    fig = curves_figure([{"step": 0, "linearity/x": 1.0}, {"step": 1, "linearity/x": 9.0}])
    assert fig.axes[0].get_yscale() == "linear"


def two_runs() -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A lazy-looking and a catapult-looking run: the loss, eta * lambda_max / 2 and the kernel change."""
    steps = np.arange(5)
    return {
        "small step": {
            "loss": (steps, 30.0 * 0.5**steps),
            "linearity/catapult": (steps, np.full(5, 0.25)),
            "linearity/kernel_change": (steps, 0.001 * steps),
        },
        "large step": {
            "loss": (steps, np.array([30.0, 300.0, 3000.0, 1.0, np.nan])),
            "linearity/catapult": (steps, np.array([1.5, 1.4, 0.6, 0.45, 0.45])),
        },
    }


def test_comparison_figure_draws_every_run_on_every_panel_it_has_data_for():
    fig = comparison_figure(
        two_runs(),
        ["loss", "linearity/catapult", "linearity/kernel_change"],
        titles={"loss": "training loss"},
        reference_lines={"linearity/catapult": 1.0},
        styles={"large step": {"color": "tab:red", "linestyle": "--"}},
        suptitle="lazy vs catapult",
    )

    loss, catapult, change = fig.axes
    assert [ax.get_title() for ax in fig.axes] == [
        "training loss",  # given
        GROUPS["catapult"].title,  # a linearity/ key: the registry's title
        GROUPS["kernel_change"].title,
    ]
    assert [line.get_label() for line in loss.get_lines()] == ["small step", "large step"]
    large = loss.get_lines()[1]
    assert large.get_color() == "tab:red" and large.get_linestyle() == "--"
    assert large.get_xdata().tolist() == [0, 1, 2, 3]  # the NaN is not drawn
    assert loss.get_yscale() == "log"  # 0.9 .. 3000
    assert catapult.get_yscale() == "linear"  # 0.25 .. 1.5
    # the run lines, then the reference line at 1
    *runs, reference = catapult.get_lines()
    assert len(runs) == 2 and list(reference.get_ydata()) == [1.0, 1.0]
    assert [line.get_label() for line in change.get_lines()] == ["small step"]  # the other run has no data
    assert change.get_yscale() == "linear"  # starts at 0
    assert [text.get_text() for text in fig.legends[0].get_texts()] == ["small step", "large step"]
    assert fig.get_suptitle() == "lazy vs catapult"


def test_comparison_figure_without_data_is_none_and_needs_panels():
    assert comparison_figure({"run": {"loss": (np.arange(2), np.full(2, np.nan))}}, ["loss"]) is None
    assert comparison_figure({"run": {"loss": (np.arange(2), np.ones(2))}}, ["other"]) is None
    with pytest.raises(ValueError, match="panels must name at least one key"):
        comparison_figure(two_runs(), [])


def test_comparison_figure_png(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = comparison_figure(two_runs(), ["loss", "linearity/catapult"])
    FigureCanvasAgg(fig)
    fig.savefig(tmp_path / "runs.png")
    assert (tmp_path / "runs.png").read_bytes()[:8] == PNG_MAGIC
