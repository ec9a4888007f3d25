"""Helper for tests/test_callback_ddp.py: one small fit with LinearityMonitor, single-process or DDP.

Run as a script (``python tests/ddp_linearity_run.py OUT_DIR --devices 2``) it trains with
``strategy="ddp"`` on the CPU (gloo), which Lightning launches by re-running this script once per rank.
The test imports :func:`fit` to make the single-process reference run in its own process.

With ``--fail-rank R --fail-step S`` the neuron-cosine metric raises on rank R in the round at step S (a
fault injected into one metric on one rank only, while the rows are computed), and with
``--fail-values-step T`` the kernel's assembly from the gathered rows raises on rank R at step T (a fault
after the all-gather); every rank that finishes fit writes ``done_rank{r}``.
"""

from __future__ import annotations

import argparse
import csv
import os
from datetime import timedelta
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from lightning_linearity.callbacks import LinearityMonitor, _stages
from lightning_linearity.keys import is_timing
from lightning_linearity.metrics import split
from lightning_linearity.models import NTKFCN

NUM_POINTS = 16
MAX_STEPS = 4
EVERY_N_STEPS = 2
#: Cross-entropy is a mean over the batch: with each of 2 ranks holding half of the full batch, the
#: all-reduced DDP gradient equals the single-process full-batch gradient, so both runs take the same steps.
MODEL = dict(in_features=6, out_features=3, width=24, depth=2, init_seed=0, loss="cross_entropy", lr=0.5)
METRICS = {
    "ntk": {},
    "kernel_change": {},
    "hessian_norm": {"num_points": 6, "layers": [2], "num_neurons": 4},
    "grad_cosines": {"num_neurons": 16},
    "linearization": {},
}


def data(devices: int) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(NUM_POINTS, MODEL["in_features"], generator=generator)
    y = torch.randint(0, MODEL["out_features"], (NUM_POINTS,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=NUM_POINTS // devices, shuffle=False)


def inject_fault(rank: int, step: int) -> None:
    """Make ``neuron_gradient_cosines`` raise on ``rank`` in the round at ``step``."""
    if int(os.environ.get("LOCAL_RANK", "0")) != rank:
        return
    original = split.neuron_gradient_cosines
    calls_per_round = len(METRICS["grad_cosines"].get("layers", [1, 2]))
    failing_call = (step // EVERY_N_STEPS) * calls_per_round  # rounds at steps 0, 2, 4, ...
    calls = iter(range(10**6))

    def failing(*args, **kwargs):
        if next(calls) == failing_call:
            raise RuntimeError(f"injected fault on rank {rank}")
        return original(*args, **kwargs)

    split.neuron_gradient_cosines = failing


def inject_values_fault(rank: int, step: int) -> None:
    """Make the kernel's values (after the all-gather of its rows) raise on ``rank`` at ``step``."""
    if int(os.environ.get("LOCAL_RANK", "0")) != rank:
        return
    original = _stages.Kernel.values

    def failing(self, ctx, rows):
        if ctx.step == step:
            raise RuntimeError(f"injected fault after the gather on rank {rank}")
        return original(self, ctx, rows)

    _stages.Kernel.values = failing


def read_rounds(metrics_csv: Path) -> dict[int, dict[str, float]]:
    """``{step: {key: value}}`` of the ``linearity/`` measurements in a CSVLogger's ``metrics.csv`` (without
    the rounds' wall times, which differ from run to run)."""
    rounds: dict[int, dict[str, float]] = {}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            values = {
                k: float(v)
                for k, v in row.items()
                if k.startswith("linearity/") and v != "" and not is_timing(k)
            }
            if values:
                rounds.setdefault(int(row["step"]), {}).update(values)
    return rounds


def fit(out: Path, devices: int) -> LinearityMonitor:
    monitor = LinearityMonitor(metrics=METRICS, every_n_steps=EVERY_N_STEPS, probe_size=12, plots=False)
    # a short collective timeout: a deadlock fails the run instead of hanging it
    ddp = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60))
    strategy = ddp if devices > 1 else "auto"
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        # float64: the DDP run and the single-process run differ only in the order of the gradient sums;
        # in float32 that rounding alone moves a cancellation metric (the linearisation error) by 2e-5
        precision="64-true",
        strategy=strategy,
        max_steps=MAX_STEPS,
        logger=CSVLogger(out, name="", version=""),
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(NTKFCN(**MODEL), data(devices))
    (out / f"done_rank{trainer.global_rank}").touch()
    return monitor


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--fail-rank", type=int, default=None)
    parser.add_argument("--fail-step", type=int, default=None)
    parser.add_argument("--fail-values-step", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # two ranks on a two-core CI machine
    if args.fail_rank is not None:
        inject_fault(args.fail_rank, args.fail_step)
        if args.fail_values_step is not None:
            inject_values_fault(args.fail_rank, args.fail_values_step)
    fit(args.out, args.devices)
