"""The NTK-parameterised (optionally masked) linear layer of docs/math.md section 1.

    z[r] = ( sum_s M[r,s] * W[r,s] * c[s]  +  b[r] ) / sqrt(deg[r]),
    deg[r] = sum_s M[r,s]  (+ 1 with a bias: the bias is a weight on a constant-1 input).

``W`` (and ``b``) hold the N(0, 1) entries; the 1/sqrt(in-degree) scaling lives in ``forward``. They are
drawn in float32 on the CPU and then cast (:func:`standard_normal`), so a seed names one network whatever
torch's default dtype and device: the float64 network of a seed is its float32 network, upcast exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_linearity.nets._checks import check_flag, check_positive_int


def standard_normal(shape: torch.Size | tuple[int, ...], generator: torch.Generator | None = None) -> Tensor:
    """i.i.d. N(0, 1) entries of ``shape``, drawn in float32 on the CPU from ``generator``.

    ``None`` uses torch's global CPU generator (seeded by ``torch.manual_seed``). Drawing always in one dtype
    on one device makes the entries of a seed the same numbers whatever torch's default dtype and device (a
    float64 draw is not the float32 draw of the same generator state, rounded or not). float32 because it
    is the common case, and its draws are exact in float64 and about 4x faster to make on a CPU.
    """
    return torch.empty(shape, dtype=torch.float32, device="cpu").normal_(0.0, 1.0, generator=generator)


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
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        bias = check_flag("bias", bias)
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features))
        self.bias = nn.Parameter(torch.empty(self.out_features)) if bias else None
        # Checks run where the mask's values are (the CPU for a list): the default device may be "meta".
        shape = (self.out_features, self.in_features)
        if mask is not None:
            try:
                home = mask.device if isinstance(mask, Tensor) else torch.device("cpu")
                mask = torch.as_tensor(mask, device=home).to(self.weight.dtype)
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(
                    f"mask must be a 0/1 tensor of shape {shape}, got {type(mask).__name__}"
                ) from None
            if mask.shape != shape:
                raise ValueError(
                    f"mask has shape {tuple(mask.shape)}, expected (out_features, in_features) = {shape}"
                )
            if not torch.all((mask == 0) | (mask == 1)):
                raise ValueError("mask entries must be 0 or 1")
            degree = mask.sum(dim=1)
        else:
            degree = torch.full((self.out_features,), float(self.in_features), device="cpu")
        if bias:
            degree = degree + 1.0
        if torch.any(degree < 1):
            empty = torch.nonzero(degree < 1).flatten().tolist()
            raise ValueError(
                f"neurons {empty} have in-degree 0; every neuron needs at least one incoming edge"
            )
        device = self.weight.device
        self.register_buffer("mask", None if mask is None else mask.to(device))
        self.register_buffer("in_degree", degree.to(device=device, dtype=self.weight.dtype))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw every stored entry i.i.d. N(0, 1) (the NTK initialisation), the weight first, then the bias.

        ``generator`` must be a CPU generator (``None``: torch's global one); the entries are drawn by
        :func:`standard_normal` and cast to each parameter's dtype and device.
        """
        with torch.no_grad():
            for parameter in (self.weight, self.bias):
                if parameter is not None:
                    parameter.copy_(standard_normal(parameter.shape, generator))

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
