"""004 Figure 2: the tangent kernel of a wide DAG network barely moves during training.

A 3-layer DenseNet with every edge dropped with probability 1/2, trained with full-batch gradient descent
on the square loss (10 points of digits 0/1) until L < 1e-4, at widths 8 ... 1024 with 3 seeds each.
Prints the fitted exponent of max_t ||K_t - K_0|| / ||K_0|| against the width next to the paper's -1/2
(acceptance: in [-0.7, -0.3]), with the step size eta = 0.5 / lambda_max(K_0) of every run and the
catapult diagnostics (eta * max_t lambda_max(K_t), max_t L_{t+1} / L_t).

Usage (any option of ``lightning-linearity sweep`` may be added; runs already in the output folder's
runs.csv are not redone)::

    python examples/reproduce_fig2_kernel_change.py [--jobs 2] [--out DIR]
    python examples/reproduce_fig2_kernel_change.py --profile paper    # widths up to 4096 and 5 seeds (long)
    python examples/reproduce_fig2_kernel_change.py --seeds [0,1,2,3,4]  # 5 seeds per width

Same as ``lightning-linearity sweep --config configs/sweeps/fig2_kernel_change.yaml``.
"""

import sys
from pathlib import Path

from lightning_linearity.sweep import main

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sweeps" / "fig2_kernel_change.yaml"

if __name__ == "__main__":
    sys.exit(main(["--config", str(CONFIG), *sys.argv[1:]]))
