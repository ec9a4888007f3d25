"""A small CNN of your own on the digits as 1x8x8 images, watched by ``LinearityMonitor()`` with its defaults.

Nothing here is the package's: an ordinary ``lightning.LightningModule`` (two 3x3 convolutions with ReLU,
global average pooling, a linear head, cross-entropy, SGD), and the digits as images through
``TensorDataModule`` (which keeps the per-sample shape). The monitor is added with no arguments: it measures
its default metrics (NTK spectrum, kernel change, Hessian norm, neuron-gradient cosines) and chooses the
hidden layers for the cosines itself, here the two convolutions (a neuron of a convolution is one entry of
its output, a channel at a position; docs/math.md 2.7).

    python examples/cnn_digits.py [--channels 32] [--max-steps 100] [--every 50]

It prints one line per metric round and the time each part of the round took.
"""

from __future__ import annotations

import argparse
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from lightning_linearity import LinearityMonitor
from lightning_linearity.data import TensorDataModule

COLUMNS = {
    "lambda_min": "lambda_min(K)",
    "kernel_change": "|K_t - K_0|/|K_0|",
    "hessian_norm_max": "max ||H_f||",
    "grad_cosine/features.0": "|cos| conv 1",
    "grad_cosine/features.2": "|cos| conv 2",
    "seconds/round": "round (s)",
}


class SmallCNN(L.LightningModule):
    """conv 3x3 -> ReLU -> conv 3x3 -> ReLU -> global average pool -> linear, on (n, 1, 8, 8) images."""

    def __init__(self, channels: int = 32, lr: float = 0.05):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(channels, 10)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def digit_images() -> TensorDataModule:
    """scikit-learn's bundled 8x8 digits as images (n, 1, 8, 8) in [0, 1], 1000 for training."""
    digits = load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0
    return TensorDataModule(x=images, y=torch.from_numpy(digits.target), num_samples=1000, batch_size=64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--every", type=int, default=50, help="a metric round every this many steps")
    parser.add_argument("--root", default="runs/cnn_digits", help="where the CSV logs and plots go")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")

    torch.manual_seed(0)
    monitor = LinearityMonitor(every_n_steps=args.every)
    trainer = L.Trainer(
        max_steps=args.max_steps,
        callbacks=[monitor],
        logger=L.pytorch.loggers.CSVLogger(args.root, name=f"channels_{args.channels}"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(SmallCNN(args.channels), datamodule=digit_images())

    layers = monitor.settings()["metrics"]["grad_cosines"]["layers"]
    print(f"\nSmall CNN with {args.channels} channels on 8x8 digits; cosines measured on layers {layers}:")
    print(f"{'step':>5}  " + "  ".join(f"{title:>18}" for title in COLUMNS.values()))
    for row in monitor.history:
        cells = (row.get(f"linearity/{key}", float("nan")) for key in COLUMNS)
        print(f"{row['step']:>5}  " + "  ".join(f"{value:>18.4g}" for value in cells))
    print(f"metrics.csv and plots in {trainer.loggers[0].log_dir}")


if __name__ == "__main__":
    main()
