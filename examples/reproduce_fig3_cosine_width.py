"""000 Figure 3 (left): neuron gradients within a layer become orthogonal as the width grows.

A fully-connected network with equal hidden widths m, trained with full-batch gradient descent on 20
points; prints the mean |cos| between neuron gradients of each hidden layer against m (decreasing
monotonically, the paper's claim) and its fitted exponent.

Usage (any option of ``lightning-linearity sweep`` may be added; runs already in the output folder's
runs.csv are not redone)::

    python examples/reproduce_fig3_cosine_width.py [--jobs 2] [--out DIR]

Same as ``lightning-linearity sweep --config configs/sweeps/fig3_cosine_width.yaml``.
"""

import sys
from pathlib import Path

from lightning_linearity.sweep import main

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sweeps" / "fig3_cosine_width.yaml"

if __name__ == "__main__":
    sys.exit(main(["--config", str(CONFIG), *sys.argv[1:]]))
