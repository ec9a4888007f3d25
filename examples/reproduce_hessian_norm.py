"""004 Theorem 3.6: the Hessian spectral norm of the network output scales like 1/sqrt(width).

Three networks (FCN, DenseNet, 004's masked DAG), each at widths 32 ... 1024 with 3 seeds, trained with
full-batch gradient descent on 10 points; the norm max_i ||d^2 f(w; x_i) / dw^2||_2 is measured at init
and after training. Prints, per network, the fitted exponents next to the paper's -1/2 (acceptance: in
[-0.7, -0.3]).

Usage (any option of ``lightning-linearity sweep`` may be added and applies to all three sweeps)::

    python examples/reproduce_hessian_norm.py [--jobs 2] [--out DIR]

Same as ``lightning-linearity sweep --config configs/sweeps/hessian_<net>.yaml`` for <net> in fcn,
densenet and masked_dag.
"""

import sys
from pathlib import Path

from lightning_linearity.sweep import main

CONFIGS = [
    Path(__file__).resolve().parents[1] / "configs" / "sweeps" / f"hessian_{net}.yaml"
    for net in ("fcn", "densenet", "masked_dag")
]

if __name__ == "__main__":
    sys.exit(max(main(["--config", str(config), *sys.argv[1:]]) for config in CONFIGS))
