"""Rules for the affine weights of normalisation layers (docs/math.md section 2.1).

LayerNorm, RMSNorm, GroupNorm and BatchNorm (eval mode, running statistics) all compute
y = x_hat ⊙ gamma + beta with x_hat the normalised input, which does not depend on gamma and beta. So

    d f_a(x_i)/d gamma = sum_pos D[i,a] ⊙ x_hat[i],      d f_a(x_i)/d beta = sum_pos D[i,a],

summed over the positions that share an affine entry (everything but the normalised shape for LayerNorm,
everything but the channel for the others), and K = G G^T of these small per-sample gradients.
A BatchNorm in training mode or without running statistics normalises by statistics of the batch, which
mixes probe points: the engine does not take such a model (see :mod:`.`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_linearity.metrics.engine._base import Call, Rule, gradient_diagonal, gradient_kernel

NORM_TYPES = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def normalised_input(norm: nn.Module, x: Tensor) -> Tensor:
    """x_hat, the input normalised as ``norm`` does before its affine map."""
    if isinstance(norm, nn.LayerNorm):
        return F.layer_norm(x, norm.normalized_shape, eps=norm.eps)
    if isinstance(norm, nn.RMSNorm):
        return F.rms_norm(x, norm.normalized_shape, eps=norm.eps)
    if isinstance(norm, nn.GroupNorm):
        return F.group_norm(x, norm.num_groups, eps=norm.eps)
    return F.batch_norm(x, norm.running_mean, norm.running_var, training=False, eps=norm.eps)


def is_sample_wise(norm: nn.Module) -> bool:
    """False for a BatchNorm that normalises by statistics of the batch (training mode, no running stats)."""
    return not isinstance(norm, _BatchNorm) or (not norm.training and norm.running_mean is not None)


class NormAffineRule(Rule):
    """gamma (``weight``) and beta (``bias``) of LayerNorm / RMSNorm / GroupNorm / eval-mode BatchNorm."""

    kind = "norm_affine"

    def _sum_positions(self, t: Tensor) -> Tensor:
        """(n, k, *shape) summed over the positions that share an affine entry: (n, k, affine size)."""
        n, k = t.shape[:2]
        if isinstance(self.module, nn.LayerNorm | nn.RMSNorm):
            size = math.prod(self.module.normalized_shape)
            return t.reshape(n, k, -1, size).sum(dim=2)
        return t.reshape(n, k, t.shape[2], -1).sum(dim=3)  # the channel dimension follows (n, k)

    def choose_route(self, calls: list[Call], n: int, k: int, diagonal: bool = False) -> None:
        self.route = "gradient"
        pairs = n if diagonal else n * n
        self.costs = {"gradient": float(pairs * k * k * sum(p.numel() for p in self.params.values()))}

    def factors(self, calls: list[Call], k: int) -> list[Tensor]:
        total = None
        for call in calls:
            g = call.grad()  # (n, k, *x.shape[1:])
            parts = []
            if "weight" in self.params:
                parts.append(
                    self._sum_positions(g * normalised_input(self.module, call.input()).unsqueeze(1))
                )
            if "bias" in self.params:
                parts.append(self._sum_positions(g))
            grads = torch.cat(parts, dim=2)
            total = grads if total is None else total + grads
        return [total]

    def kernel(
        self, parts1: list[Tensor], parts2: list[Tensor], symmetric: bool, chunk: int | None
    ) -> Tensor:
        return gradient_kernel(parts1[0], parts2[0], symmetric)

    def diagonal(self, parts: list[Tensor], chunk: int | None) -> Tensor:
        return gradient_diagonal(parts[0])
