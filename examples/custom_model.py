"""LinearityMonitor on a model that is not one of the package's: the per-module engine.

The network here is a plain PyTorch MLP (``nn.Linear`` layers in PyTorch's standard parameterisation
and default initialisation) inside an ordinary LightningModule trained with cross-entropy. Nothing in it
knows about the package: the monitor differentiates it with the per-module derivative rules of
``lightning_linearity.metrics.engine`` (docs/math.md 3: the NTK and the neuron-gradient Grams from one
forward and one backward pass, no per-sample Jacobian) and one jvp for the linearisation; models the engine
cannot take get the generic ``torch.func`` path. Here the cosines are told which submodules output the
pre-activations whose neuron gradients should be compared (``grad_cosines``' ``layers``: the two hidden
``nn.Linear`` modules; without it the monitor picks hidden layers itself).

    python examples/custom_model.py [--width 256] [--max-steps 60] [--every 30]

It prints one line per metric round: how far the weights moved, how much the NTK changed, the
linearisation error and the neuron-gradient cosines of both hidden layers.
"""

from __future__ import annotations

import argparse
import warnings

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_linearity.callbacks import LinearityMonitor
from lightning_linearity.data import DigitsDataModule
from lightning_linearity.metrics.ntk import ntk_path

HIDDEN_LAYERS = ["features.0", "features.2"]  # the nn.Linear modules: their outputs are pre-activations
COLUMNS = {
    "distance_from_init": "|w_t - w_0|",
    "kernel_change": "|K_t - K_0|/|K_0|",
    "linearization_error_max": "max |f - f_lin|",
    **{f"grad_cosine/{name}": f"|cos| {name}" for name in HIDDEN_LAYERS},
}


class PlainMLP(pl.LightningModule):
    """An everyday PyTorch classifier: Linear -> tanh -> Linear -> tanh -> Linear, cross-entropy, Adam."""

    def __init__(self, width: int = 256, lr: float = 1e-3):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh())
        self.head = nn.Linear(width, 10)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=30, help="a metric round every this many steps")
    parser.add_argument("--root", default="runs/custom_model", help="where the CSV logs and plots go")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")

    torch.manual_seed(0)
    monitor = LinearityMonitor(
        metrics={
            "ntk": {},
            "kernel_change": {},
            "grad_cosines": {"layers": HIDDEN_LAYERS, "num_neurons": 64},  # a fixed sample of 64 per layer
            "linearization": {},
        },
        every_n_steps=args.every,
        probe_size=16,
    )
    trainer = pl.Trainer(
        max_steps=args.max_steps,
        callbacks=[monitor],
        logger=pl.loggers.CSVLogger(args.root, name=f"width_{args.width}"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    model = PlainMLP(args.width)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64, seed=0))

    path = ntk_path(model, torch.zeros(2, 64)).name
    print(f"\nPlain MLP of width {args.width} (the NTK on the {path} path), 16 probe digits:")
    print(f"{'step':>5}  " + "  ".join(f"{title:>18}" for title in COLUMNS.values()))
    for row in monitor.history:
        cells = (row.get(f"linearity/{key}", float("nan")) for key in COLUMNS)
        print(f"{row['step']:>5}  " + "  ".join(f"{value:>18.4g}" for value in cells))
    last = monitor.history[-1]
    print(
        f"Adam moved this standard-parameterisation MLP {last['linearity/distance_from_init']:.3g} from its "
        f"initial weights and changed its NTK by {last['linearity/kernel_change']:.3g} times its norm:\n"
        f"at this width it is far from the kernel regime; the {path} path measured it all the same."
    )
    print(f"metrics.csv and plots in {trainer.loggers[0].log_dir}")


if __name__ == "__main__":
    main()
