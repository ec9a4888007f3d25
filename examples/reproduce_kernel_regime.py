"""Distance from the kernel regime: ||K_t - kron(Theta, I_k)|| / ||kron(Theta, I_k)|| against the width.

A 3-layer tanh FCN at widths 16 ... 2048 with 8 seeds, trained with full-batch gradient descent on 10
points; the distance of its empirical NTK from the analytic infinite-width kernel Theta (docs/math.md 2.8)
is measured at init, every 10 steps and at the end. Prints the fitted exponents next to the expected -1/2.

Usage (any option of ``lightning-linearity sweep`` may be added)::

    python examples/reproduce_kernel_regime.py [--jobs 2] [--out DIR]

Same as ``lightning-linearity sweep --config configs/sweeps/kernel_regime.yaml``.
"""

import sys
from pathlib import Path

from lightning_linearity.sweep import main

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sweeps" / "kernel_regime.yaml"

if __name__ == "__main__":
    sys.exit(main(["--config", str(CONFIG), *sys.argv[1:]]))
