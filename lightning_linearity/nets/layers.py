"""The NTK-parameterised (optionally masked) linear layer of MATH.md section 1.

    z[r] = ( sum_s M[r,s] * W[r,s] * c[s]  +  b[r] ) / sqrt(deg[r]),
    deg[r] = sum_s M[r,s]  (+ 1 with a bias: the bias is a weight on a constant-1 input).

``W`` (and ``b``) hold the N(0, 1) entries; the 1/sqrt(in-degree) scaling lives in ``forward``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class NTKLinear(nn.Module):
    """Linear map with NTK scaling by each output neuron's own in-degree (004 Eq. 5).

    Args:
        in_features: size of the layer input ``c``.
        out_features: number of neurons ``z`` this layer computes.
        mask: optional 0/1 tensor of shape (out_features, in_features); ``None`` means fully connected.
            Every row must keep at least one edge (or the layer must have a bias).
        bias: add a bias, i.e. an always-present weight on a constant-1 input.
    """

    def __init__(self, in_features: int, out_features: int, mask: Tensor | None = None, bias: bool = False):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        if mask is not None:
            mask = torch.as_tensor(mask).to(dtype=torch.get_default_dtype())
            if mask.shape != (out_features, in_features):
                raise ValueError(
                    f"mask has shape {tuple(mask.shape)}, expected (out_features, in_features) = "
                    f"{(out_features, in_features)}"
                )
            if not torch.all((mask == 0) | (mask == 1)):
                raise ValueError("mask entries must be 0 or 1")
        self.register_buffer("mask", mask)
        degree = mask.sum(dim=1) if mask is not None else torch.full((out_features,), float(in_features))
        if bias:
            degree = degree + 1.0
        if torch.any(degree < 1):
            empty = torch.nonzero(degree < 1).flatten().tolist()
            raise ValueError(
                f"neurons {empty} have in-degree 0; every neuron needs at least one incoming edge"
            )
        self.register_buffer("in_degree", degree)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw every stored entry i.i.d. N(0, 1) (the NTK initialisation)."""
        with torch.no_grad():
            self.weight.normal_(0.0, 1.0, generator=generator)
            if self.bias is not None:
                self.bias.normal_(0.0, 1.0, generator=generator)

    @property
    def is_masked(self) -> bool:
        return self.mask is not None

    def effective_weight(self) -> Tensor:
        """``M * W`` (the weights of the edges that exist)."""
        return self.weight if self.mask is None else self.weight * self.mask

    def forward(self, c: Tensor) -> Tensor:
        z = c @ self.effective_weight().T
        if self.bias is not None:
            z = z + self.bias
        return z * self.in_degree.rsqrt().to(z.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, masked={self.is_masked}, "
            f"min_in_degree={int(self.in_degree.min().item()) if self.out_features else 0}"
        )
