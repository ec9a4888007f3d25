"""LinearityMonitor under DDP: two CPU processes (gloo), the metric work split between them.

Trains ``NTKFCN`` on the 8x8 digits with ``Trainer(accelerator="cpu", devices=2, strategy="ddp")``. In every
metric round each process computes its share of the probe points (its rows of the NTK, the neuron-gradient
cosines of its points); the pieces are all-gathered, so every rank ends the round with the values one
process would log, and rank 0 logs them. To show it, rank 0 also computes the NTK spectrum at the initial
weights in this single process with the metric functions and prints both.

    python examples/ddp_cpu.py [--max-steps 30] [--width 256]

On GPUs the same script runs with ``accelerator="gpu"`` and ``devices=N``; with the command line:
``lightning-linearity fit --config configs/fcn_digits.yaml --trainer.strategy ddp --trainer.devices 2``.
"""

from __future__ import annotations

import argparse
import warnings

import pytorch_lightning as pl
import torch

from lightning_linearity import NTKFCN, LinearityMonitor
from lightning_linearity.data import DigitsDataModule
from lightning_linearity.metrics import empirical_ntk, kernel_spectrum

PROBE_SIZE = 16


def single_process_reference(model: NTKFCN, probe: torch.Tensor) -> dict[str, float]:
    """The spectrum of K(w_0) on the probe set, computed here in one process with the metric functions."""
    spectrum = kernel_spectrum(empirical_ntk(model, probe))
    return {
        "linearity/lambda_min": float(spectrum.lambda_min),
        "linearity/lambda_max": float(spectrum.lambda_max),
        "linearity/ntk_trace": float(spectrum.trace),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--root", default="runs/ddp_cpu", help="where the CSV logs and plots go")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    torch.set_num_threads(1)  # one core per process

    data = DigitsDataModule(batch_size=32, seed=0)  # 32 per process: a global batch of 64
    model = NTKFCN(64, 10, width=args.width, depth=2, lr=0.1, init_seed=0)
    monitor = LinearityMonitor(
        metrics=("ntk", "kernel_change", "grad_cosines"), every_n_steps=10, probe_size=PROBE_SIZE
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=args.max_steps,
        callbacks=[monitor],
        logger=pl.loggers.CSVLogger(args.root, name="ddp_cpu"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    reference = (
        single_process_reference(model, data.train_split.x[:PROBE_SIZE]) if trainer.is_global_zero else {}
    )
    trainer.fit(model, datamodule=data)
    if not trainer.is_global_zero:
        return

    share = PROBE_SIZE // trainer.world_size
    print(f"\n{trainer.world_size} processes, each computing the NTK rows of {share} of {PROBE_SIZE} probes:")
    print(f"{'key':>22}  {'one process, w_0':>18}  {'DDP, step 0':>18}")
    for key, value in reference.items():
        print(f"{key:>22}  {value:>18.7g}  {monitor.history[0][key]:>18.7g}")
    print(f"\n{'step':>5}  {'lambda_min(K)':>14}  {'|K_t - K_0|/|K_0|':>18}  {'|cos| layer 2':>14}")
    for row in monitor.history:
        lam, change, cos = (
            row[f"linearity/{key}"] for key in ("lambda_min", "kernel_change", "grad_cosine/layer_2")
        )
        print(f"{row['step']:>5}  {lam:>14.4g}  {change:>18.4g}  {cos:>14.4g}")
    print(f"metrics.csv and plots in {trainer.loggers[0].log_dir}")


if __name__ == "__main__":
    main()
