"""Rule for ``nn.Conv1d/2d/3d`` with any stride, padding (and padding mode), dilation, groups, bias
(docs/math.md section 2.1).

A convolution is an affine map applied at every output position l to the input patch P[i,g,l] (the
kernel-sized window of the input channels of group g; zeros, or the padding mode's values, outside the
input). With D[i,a,g,l] = d f_a(x_i) / d y[i,g,:,l] (the output channels of group g at position l) it is
the Linear rule of :mod:`._linear` per group, positions l of every call pooled:

    d f_a(x_i)/dW_g = sum_l D[i,a,g,l] P[i,g,l]^T,      d f_a(x_i)/db_g = sum_l D[i,a,g,l],
    K = sum_g sum_{l,l'} (P[i,g,l] . P[j,g,l'] + 1) (D[i,a,g,l] . D[j,b,g,l']).

Routes: *gradient* (per-sample weight gradients from the unfolded patches, then G G^T; about
n k O L C_g k^d + n^2 k^2 O C_g k^d flops) or *gram* (the patch Gram matrix, about
n^2 G L^2 (C_g k^d + k^2 O_g) flops), whichever costs less. The gradient route wins for many output
positions L, the gram route for few positions and many channels or outputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_linearity.metrics.engine._base import Call
from lightning_linearity.metrics.engine._linear import AffineRule, affine_costs, affine_gradients, cheapest

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def conv_patches(conv: nn.Module, x: Tensor) -> Tensor:
    """The input patches of every output position, shape (n, G, L, C/G * prod(kernel_size)).

    The patch entries are ordered like a weight row (C/G, *kernel_size), positions like the flattened
    output. ``F.unfold`` (im2col) for 1-d and 2-d convolutions with zero padding, strided windows of the
    padded input otherwise.
    """
    dims = len(conv.kernel_size)
    n, channels = x.shape[:2]
    if dims <= 2 and conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
        lift = (lambda t: (1, *t)) if dims == 1 else tuple  # a 1-d convolution as a 2-d one of height 1
        image = x.unsqueeze(2) if dims == 1 else x
        columns = F.unfold(image, lift(conv.kernel_size), lift(conv.dilation), (0, *conv.padding)
                           if dims == 1 else conv.padding, lift(conv.stride))  # fmt: skip
        return columns.view(n, conv.groups, -1, columns.shape[-1]).transpose(2, 3)
    pad = list(conv._reversed_padding_repeated_twice)
    if any(pad):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, pad, mode=mode)
    for i in range(dims):
        span = conv.dilation[i] * (conv.kernel_size[i] - 1) + 1
        x = x.unfold(2 + i, span, conv.stride[i])  # (n, C, O_1.., W_1..) windows appended last
    window = (slice(None),) * (2 + dims) + tuple(slice(None, None, d) for d in conv.dilation)
    x = x[window]  # (n, C, O_1..O_d, k_1..k_d)
    positions = math.prod(x.shape[2 : 2 + dims])
    x = x.reshape(n, conv.groups, channels // conv.groups, positions, -1)  # (n, G, C_g, L, k^d)
    return x.permute(0, 1, 3, 2, 4).reshape(n, conv.groups, positions, -1)


class ConvRule(AffineRule):
    """``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d``."""

    kind = "conv"

    def _deltas(self, call: Call) -> Tensor:
        """D of one call as (n, k, G, L, O_g)."""
        g = call.grad()
        n, k = g.shape[:2]
        groups = self.module.groups
        return g.reshape(n, k, groups, self.module.out_channels // groups, -1).transpose(3, 4)

    def _seeded_inputs(self, call: Call, neurons: Tensor) -> tuple[Tensor, Tensor]:
        conv = self.module
        patches = conv_patches(conv, call.input())  # (n, G, L, d); neuron o * L + l
        positions = patches.shape[2]
        neurons = neurons.to(patches.device)
        channels = neurons // positions
        groups = channels // (conv.out_channels // conv.groups)
        return channels, patches[:, groups, neurons % positions]

    def choose_route(self, calls: list[Call], n: int, k: int, diagonal: bool = False) -> None:
        conv = self.module
        positions = sum(math.prod(call.outputs[0].shape[2:]) for call in calls)
        d = conv.in_channels // conv.groups * math.prod(conv.kernel_size)
        m = conv.out_channels // conv.groups
        self.costs = affine_costs(n, k, conv.groups, positions, d, m, self.weight, self.bias, diagonal)
        self.route = cheapest(self.costs)

    def factors(self, calls: list[Call], k: int) -> list[Tensor]:
        deltas = _cat([self._deltas(call) for call in calls], dim=3)
        if not self.weight:
            return [deltas.sum(dim=3).reshape(deltas.shape[0], k, -1)]
        patches = _cat([conv_patches(self.module, call.input()) for call in calls], dim=2)
        if self.route == "gram":
            return [patches, deltas]
        return [affine_gradients(patches, deltas, self.weight, self.bias)]


def _cat(tensors: list[Tensor], dim: int) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)
