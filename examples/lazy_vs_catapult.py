"""Lazy vs catapult: the same network trained with a small and a large step, side by side (docs/regimes.md).

Full-batch gradient descent on the summed square loss L = 1/2 sum_i (f(w; x_i) - y_i)^2 (docs/math.md 2.2)
of scikit-learn's digits 0 and 1 (labels +/-1), with the step eta = c / lambda_max(K_0) set from the
empirical NTK at initialisation on the whole training set (docs/math.md 2.1). The linearised dynamics
r_{t+1} = (I - eta K) r_t converge only while eta * lambda_max(K) < 2 (docs/math.md 2.9), so

* c < 2 (default 0.5): the **lazy** regime, the loss falls monotonically and K stays near K_0, the closer
  the wider the network;
* 2 < c < ~4 (default 3): the **catapult** regime (Lewkowycz et al. 2020), the loss first grows, lambda_max(K)
  falls until eta * lambda_max(K) < 2, then the loss converges; K moves by O(1) at every width;
* larger c diverges (between c = 4 and 5 for this network: try ``--scales 0.5 3 4 5``).

The table's ``regime`` column says what each run did, read off its loss (see ``Run.regime``).

Every run is the same network (same seed), at each width of ``--widths``, monitored by
``LinearityMonitor`` at every step on the whole training set (metrics ``ntk``, ``kernel_change``,
``sharpness``; the monitor logs ``catapult`` = eta * lambda_max(K) / 2 and ``edge_of_stability`` =
eta * sharpness / 2). The script prints a table (also written as ``table.md``) and draws the loss,
eta * lambda_max(K) / 2 and the kernel change of all runs in ``lazy_vs_catapult.png``, in ``--out``.

    python examples/lazy_vs_catapult.py [--widths 256 1024] [--scales 0.5 3] [--steps 100] [--out DIR]
    python examples/lazy_vs_catapult.py --quick     # one width, 40 steps, a few seconds (the test's path)
"""

from __future__ import annotations

import argparse
import itertools
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg

from lightning_linearity import NTKFCN, LinearityMonitor
from lightning_linearity.data import DigitsDataModule
from lightning_linearity.keys import CATAPULT, EDGE_OF_STABILITY, KERNEL_CHANGE, logged
from lightning_linearity.metrics import empirical_ntk
from lightning_linearity.plots import comparison_figure, metric_series

#: Rounds between two measurements of the loss sharpness (the NTK is measured at every step).
SHARPNESS_EVERY = 5
LOSS = "loss"
PANELS = (LOSS, logged(CATAPULT), logged(KERNEL_CHANGE))
TITLES = {
    LOSS: "training loss  ½ Σ (f - y)²",
    logged(CATAPULT): "η · λ_max(K) / 2  (catapult above 1)",
    logged(KERNEL_CHANGE): "kernel change  ‖K_t - K_0‖ / ‖K_0‖",
}
COLUMNS = (
    "width",
    "c",
    "regime",
    "eta",
    "lambda_max(K_0)",
    "loss_0",
    "loss_max",
    "loss_end",
    "loss_rises",
    "eta*lambda_max(K_end)/2",
    "eta*sharpness_end/2",
    "kernel_change_end",
)


class LossHistory(L.Callback):
    """The training loss at every optimiser step, before that step's update: ``{step: loss}``."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step - 1] = float(outputs["loss"])


@dataclass
class Run:
    """One trained network: its settings, the loss per step and the monitor's history."""

    width: int
    scale: float
    eta: float
    lambda_max_0: float
    losses: dict[int, float]
    history: list[dict[str, float]]

    @property
    def regime(self) -> str:
        """What the run did: ``divergent`` (the loss ends above its start, or not finite), ``catapult`` (it
        rose above its start, then fell below it), else ``lazy``."""
        losses = [self.losses[s] for s in sorted(self.losses)]
        if not math.isfinite(losses[-1]) or losses[-1] > losses[0]:
            return "divergent"
        return "catapult" if max(losses) > losses[0] else "lazy"

    @property
    def label(self) -> str:
        return f"{self.regime} c={self.scale:g}, width {self.width}"

    def series(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The plotted curves: loss, eta * lambda_max(K) / 2 and the kernel change against the step."""
        logged_series = metric_series(self.history)
        steps = np.array(sorted(self.losses))
        change_steps, change = logged_series[logged(KERNEL_CHANGE)]
        moved = change > 0  # not step 0, where K is K_0: the change is drawn on a log axis
        return {
            LOSS: (steps, np.array([self.losses[s] for s in steps])),
            logged(CATAPULT): logged_series[logged(CATAPULT)],  # logged by ntk at every step
            logged(KERNEL_CHANGE): (change_steps[moved], change[moved]),
        }

    def row(self) -> dict[str, float | str]:
        """The table row: settings; the loss at the start, at its peak, at the end and how many steps raised
        it; the last round's eta * lambda_max(K) / 2, eta * sharpness / 2 and kernel change."""
        losses = [self.losses[s] for s in sorted(self.losses)]
        last = self.history[-1]
        nan = float("nan")
        return {
            "width": self.width,
            "c": self.scale,
            "regime": self.regime,
            "eta": self.eta,
            "lambda_max(K_0)": self.lambda_max_0,
            "loss_0": losses[0],
            "loss_max": max(losses, key=lambda v: v if math.isfinite(v) else math.inf),
            "loss_end": losses[-1],
            "loss_rises": sum(after > before for before, after in itertools.pairwise(losses)),
            "eta*lambda_max(K_end)/2": last.get(logged(CATAPULT), nan),
            "eta*sharpness_end/2": last.get(logged(EDGE_OF_STABILITY), nan),
            "kernel_change_end": last.get(logged(KERNEL_CHANGE), nan),
        }


def train(width: int, scale: float, steps: int, num_samples: int, seed: int) -> Run:
    """Train ``NTKFCN(width)`` with eta = scale / lambda_max(K_0) for ``steps`` full-batch GD steps."""
    data = DigitsDataModule(
        classes=[0, 1], num_samples=num_samples, full_batch=True, shuffle=False, seed=seed
    )
    data.setup("fit")
    x, y = next(iter(data.train_dataloader()))
    x = x.double()
    model = NTKFCN(64, 1, width=width, depth=1, activation="tanh", init_seed=seed).double()
    lambda_max_0 = float(torch.linalg.eigvalsh(empirical_ntk(model, x))[-1])
    model.lr = scale / lambda_max_0  # the optimiser is built from it at fit time
    monitor = LinearityMonitor(
        metrics=("ntk", "kernel_change", "sharpness"),
        every_n_steps=1,
        every_n_rounds={"sharpness": SHARPNESS_EVERY},  # Lanczos on the loss Hessian: the costly metric
        probe_data=(x, y),  # the whole training set: lambda_max(K) is the curvature GD sees
        plots=False,
    )
    losses = LossHistory()
    trainer = L.Trainer(
        max_steps=steps,
        precision="64-true",
        callbacks=[monitor, losses],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=data)
    return Run(width, scale, model.lr, lambda_max_0, losses.losses, monitor.history)


def markdown_table(runs: list[Run]) -> str:
    """The runs' rows as a markdown table (4 significant digits)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for run in runs:
        cells = (v if isinstance(v, str | int) else f"{v:.4g}" for v in run.row().values())
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines)


def plot(runs: list[Run], path: Path) -> None:
    """Loss, eta * lambda_max(K) / 2 and the kernel change of every run, one panel each, side by side."""
    colours = {"lazy": "tab:blue", "catapult": "tab:red", "divergent": "tab:gray"}
    widths = sorted({run.width for run in runs})
    dashes = {w: "-" if w == widths[-1] else (0, (2 + 2 * i, 2)) for i, w in enumerate(widths)}
    fig = comparison_figure(
        {run.label: run.series() for run in runs},
        PANELS,
        titles=TITLES,
        reference_lines={logged(CATAPULT): 1.0},
        styles={run.label: {"color": colours[run.regime], "linestyle": dashes[run.width]} for run in runs},
        suptitle="Same network, small vs large step: lazy training vs the catapult",
    )
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument(
        "--scales", type=float, nargs="+", default=[0.5, 3.0], help="c in eta = c/lambda_max(K_0)"
    )
    parser.add_argument("--steps", type=int, default=100, help="full-batch gradient descent steps")
    parser.add_argument("--num-samples", type=int, default=64, help="training points (digits 0 and 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and of the data subset")
    parser.add_argument("--quick", action="store_true", help="one width (256) and 40 steps")
    parser.add_argument("--out", type=Path, default=Path("runs/lazy_vs_catapult"))
    args = parser.parse_args()
    if args.quick:
        args.widths, args.steps = [256], 40
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    args.out.mkdir(parents=True, exist_ok=True)

    runs = [
        train(width, scale, args.steps, args.num_samples, args.seed)
        for width in args.widths
        for scale in args.scales
    ]
    table = markdown_table(runs)
    (args.out / "table.md").write_text(table + "\n")
    plot(runs, args.out / "lazy_vs_catapult.png")
    print(
        f"{args.steps} full-batch GD steps on {args.num_samples} digits (0 vs 1), eta = c / lambda_max(K_0):"
    )
    print(table)
    print(f"table.md and lazy_vs_catapult.png in {args.out}")


if __name__ == "__main__":
    main()
