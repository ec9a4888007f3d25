"""000 Figure 3 (right): orthogonality of neuron gradients around a bottleneck layer.

Hidden widths [1000, m_b, 1000], the bottleneck width m_b swept, trained with full-batch gradient
descent on 20 points; prints the mean |cos| between neuron gradients of the bottleneck layer (layer 2)
and of the layer it feeds (layer 3) against m_b, next to the paper's claim.

Usage (any option of ``lightning-linearity sweep`` may be added; runs already in the output folder's
runs.csv are not redone)::

    python examples/reproduce_fig3_cosine_bottleneck.py [--jobs 2] [--out DIR]

Same as ``lightning-linearity sweep --config configs/sweeps/fig3_cosine_bottleneck.yaml``.
"""

import sys
from pathlib import Path

from lightning_linearity.sweep import main

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sweeps" / "fig3_cosine_bottleneck.yaml"

if __name__ == "__main__":
    sys.exit(main(["--config", str(CONFIG), *sys.argv[1:]]))
