"""Quick start: add ``LinearityMonitor`` to a plain ``Trainer`` that trains your own LightningModule.

The LightningModule below is ordinary user code: a classifier around the package's NTK-parameterised
network (``LayeredNTKNet``), trained with SGD on the square loss on scikit-learn's 8x8 digits. Exposing
the network as ``layered_net`` lets the monitor use its fast structured paths; any other module works too
(see ``custom_model.py``). The script trains a narrow and a wide copy for the same number of steps and
prints what the theory predicts: the wider network moves its NTK less (kernel change), stays closer to
its linearisation around the initial weights, and has more orthogonal neuron gradients.

    python examples/quickstart.py [--widths 32 1024] [--max-steps 60]
"""

from __future__ import annotations

import argparse
import warnings

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from lightning_linearity.callbacks import LinearityMonitor
from lightning_linearity.data import DigitsDataModule
from lightning_linearity.nets import LayeredNTKNet

COLUMNS = {
    "lambda_min": "lambda_min(K)",
    "kernel_change": "|K_t - K_0|/|K_0|",
    "linearization_error_relative": "|f - f_lin|/|f - f_0|",
    "grad_cosine/layer_2": "|cos| layer 2",
}


class DigitClassifier(pl.LightningModule):
    """Your own LightningModule: an NTK FCN on 64 pixels, square loss 1/2 sum ||f - onehot||^2, SGD."""

    def __init__(self, width: int, lr: float = 0.1):
        super().__init__()
        self.net = LayeredNTKNet.fcn(64, [width, width], 10, activation="tanh", seed=0)
        self.lr = lr

    @property
    def layered_net(self) -> LayeredNTKNet:
        return self.net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = 0.5 * (self(x) - F.one_hot(y, 10).float()).pow(2).sum()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def train(width: int, max_steps: int, root: str) -> dict[str, float]:
    """Train one width with the monitor; return the last metric round."""
    monitor = LinearityMonitor(
        metrics=("ntk", "kernel_change", "grad_cosines", "linearization"),
        every_n_steps=max_steps,  # a round at the start and one at the end
        probe_size=16,
    )
    trainer = pl.Trainer(
        max_steps=max_steps,
        callbacks=[monitor],
        default_root_dir=root,
        logger=pl.loggers.CSVLogger(root, name=f"width_{width}"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(DigitClassifier(width), datamodule=DigitsDataModule(batch_size=64, seed=0))
    print(f"width {width}: metrics.csv and plots in {trainer.loggers[0].log_dir}")
    return monitor.history[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 1024])
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--root", default="runs/quickstart", help="where the CSV logs and plots go")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")

    rows = {width: train(width, args.max_steps, args.root) for width in args.widths}
    print(f"\nAfter {args.max_steps} SGD steps (square loss, batch 64), on 16 probe digits:")
    print(f"{'width':>6}  " + "  ".join(f"{title:>22}" for title in COLUMNS.values()))
    for width, row in rows.items():
        cells = (row.get(f"linearity/{key}", float("nan")) for key in COLUMNS)
        print(f"{width:>6}  " + "  ".join(f"{value:>22.4g}" for value in cells))
    print("Wider -> smaller kernel change, linearisation error and |cos|: the transition to linearity.")


if __name__ == "__main__":
    main()
