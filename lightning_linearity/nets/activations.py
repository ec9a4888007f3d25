"""Activation functions by name, each with its closed-form derivative.

The theory (docs/math.md section 1; 004 Assumption 3.2) wants sigma twice differentiable with Lipschitz
sigma' and sigma''. ``tanh``, ``erf``, ``softplus``, ``gelu`` and ``sigmoid`` qualify; ``relu`` is allowed,
but its sigma'' vanishes almost everywhere; ``identity`` gives a linear network.

The derivatives are used by the structured metric paths (e.g. the neuron-gradient Gram recursion of
docs/math.md section 3, and sigma'' by the structured Hessian-vector products), which never call autograd on
the activation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)


@dataclass(frozen=True)
class Activation:
    """An elementwise activation ``sigma`` together with ``sigma'`` and ``sigma''``."""

    name: str
    fn: Callable[[Tensor], Tensor]
    derivative: Callable[[Tensor], Tensor]
    second_derivative: Callable[[Tensor], Tensor]

    def __call__(self, z: Tensor) -> Tensor:
        return self.fn(z)


def _sigmoid_derivative(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1.0 - s)


def _sigmoid_second_derivative(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1.0 - s) * (1.0 - 2.0 * s)


def _tanh_second_derivative(z: Tensor) -> Tensor:
    t = torch.tanh(z)
    return -2.0 * t * (1.0 - t * t)


def _erf_derivative(z: Tensor) -> Tensor:
    return _TWO_OVER_SQRT_PI * torch.exp(-z * z)


def _gelu(z: Tensor) -> Tensor:
    # exact (erf) GELU: z * Phi(z)
    return 0.5 * z * (1.0 + torch.erf(z * _INV_SQRT_2))


def _gelu_derivative(z: Tensor) -> Tensor:
    # d/dz z Phi(z) = Phi(z) + z phi(z)
    return 0.5 * (1.0 + torch.erf(z * _INV_SQRT_2)) + z * _INV_SQRT_2PI * torch.exp(-0.5 * z * z)


def _gelu_second_derivative(z: Tensor) -> Tensor:
    # d/dz (Phi(z) + z phi(z)) = 2 phi(z) + z phi'(z) = (2 - z^2) phi(z)
    return (2.0 - z * z) * _INV_SQRT_2PI * torch.exp(-0.5 * z * z)


ACTIVATIONS: dict[str, Activation] = {
    "tanh": Activation("tanh", torch.tanh, lambda z: 1.0 - torch.tanh(z) ** 2, _tanh_second_derivative),
    "erf": Activation("erf", torch.erf, _erf_derivative, lambda z: -2.0 * z * _erf_derivative(z)),
    "softplus": Activation("softplus", torch.nn.functional.softplus, torch.sigmoid, _sigmoid_derivative),
    "gelu": Activation("gelu", _gelu, _gelu_derivative, _gelu_second_derivative),
    "sigmoid": Activation("sigmoid", torch.sigmoid, _sigmoid_derivative, _sigmoid_second_derivative),
    "relu": Activation("relu", torch.relu, lambda z: (z > 0).to(z.dtype), torch.zeros_like),
    "identity": Activation("identity", lambda z: z, torch.ones_like, torch.zeros_like),
}


def get_activation(name: str) -> Activation:
    """Look up an activation by name; raises ``ValueError`` listing the valid names."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None
