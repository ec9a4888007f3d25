"""Plain ``torch.nn`` NTK-parameterised networks (docs/math.md section 1)."""

from lightning_linearity.nets.activations import ACTIVATIONS, Activation, get_activation
from lightning_linearity.nets.dag import DAGLayout, layer_edges
from lightning_linearity.nets.layers import NTKLinear
from lightning_linearity.nets.network import LayeredNTKNet, NetworkTrace

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "DAGLayout",
    "LayeredNTKNet",
    "NTKLinear",
    "NetworkTrace",
    "get_activation",
    "layer_edges",
]
