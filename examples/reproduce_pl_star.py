"""004 Section 4: the PL* condition holds along training because lambda_min(K_t) stays away from 0.

004's DAG network trained with full-batch gradient descent on 10 points; a metric round every 5 steps
records lambda_min(K_t) and the realised ||grad L||^2 / (2 L). Prints, per width, how much of
lambda_min(K_0) is retained along training and whether the realised ratio ever drops below
lambda_min(K_t) (004 Eq. 16 says it cannot).

Usage (any option of ``lightning-linearity sweep`` may be added; runs already in the output folder's
runs.csv are not redone)::

    python examples/reproduce_pl_star.py [--jobs 2] [--out DIR]

Same as ``lightning-linearity sweep --config configs/sweeps/pl_star.yaml``.
"""

import sys
from pathlib import Path

from lightning_linearity.sweep import main

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sweeps" / "pl_star.yaml"

if __name__ == "__main__":
    sys.exit(main(["--config", str(CONFIG), *sys.argv[1:]]))
