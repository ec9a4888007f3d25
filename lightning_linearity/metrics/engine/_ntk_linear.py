"""Rule for the package's own NTK layer (:class:`NTKLinear`, docs/math.md sections 1 and 3).

A weight W[r,s] enters only through z[r] = (sum_s M[r,s] W[r,s] c[s] + b[r]) / sqrt(deg[r]), so with
D[i,a,r] = d f_a(x_i) / d z[r]

    K = sum_r D[i,a,r] D[j,b,r] / deg[r] * (sum_s M[r,s] c[i,s] c[j,s] [+ 1 with a bias]).

Without a mask the bracket is C C^T (+ 1) for every neuron: (C C^T + 1) ⊙ (D diag(1/deg) D^T). With a mask
it is a per-neuron Gram matrix, one GEMM (c_i ⊙ c_j) @ M^T over chunks of probe pairs (or per neuron for
a layer with few neurons). The structured path of :mod:`lightning_linearity.metrics.ntk` and the engine's
rule share these contractions.

For the blocks of one probe point (i = j) the bracket is the private gradient energy
gamma[i,r] = (sum_s M[r,s] c[i,s]^2 [+ 1]) / deg[r] = ||d z[r] / d(row r of W, b[r])||^2, and
K[i,a,i,b] = sum_r D[i,a,r] D[i,b,r] gamma[i,r] (:func:`private_gradient_energy`, shared with the
structured neuron-gradient Gram of :mod:`lightning_linearity.metrics.cosines`, docs/math.md section 3).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_linearity.metrics._layered import trainable_flags
from lightning_linearity.metrics._linalg import chunk_slices
from lightning_linearity.metrics.engine._base import DEFAULT_CHUNK_ELEMENTS, Call, Rule
from lightning_linearity.nets.layers import NTKLinear


def add_ntk_linear_kernel(
    kernel: Tensor,
    layer: NTKLinear,
    c1: Tensor,
    c2: Tensor,
    d1: Tensor,
    d2: Tensor,
    chunk_size: int | None,
    symmetric: bool,
) -> None:
    """K += the block of one NTKLinear layer from its inputs c (n, in) and deltas D (n, k, out)."""
    weight, bias = trainable_flags(layer)
    if layer.mask is None:
        add_dense_layer_kernel(kernel, layer, c1, c2, d1, d2, weight, bias)
        return
    if bias:  # the bias is an unmasked input: its term has the unmasked form, C C^T = 0
        add_dense_layer_kernel(kernel, layer, c1, c2, d1, d2, False, True)
    if weight:
        add_masked_layer_kernel(kernel, layer, c1, c2, d1, d2, chunk_size, symmetric)


def add_dense_layer_kernel(
    kernel: Tensor, layer: NTKLinear, c1: Tensor, c2: Tensor, d1: Tensor, d2: Tensor, weight: bool, bias: bool
) -> None:
    """K += (C1 C2^T + 1) ⊙ (D1 diag(1/deg) D2^T): one Gram matrix of inputs shared by all neurons."""
    if not (weight or bias):
        return
    n1, k, m = d1.shape
    n2 = d2.shape[0]
    inputs_gram = c1 @ c2.T if weight else c1.new_zeros(n1, n2)
    if bias:
        inputs_gram = inputs_gram + 1.0
    deltas_gram = (d1 / layer.in_degree.to(d1.dtype)).reshape(n1 * k, m) @ d2.reshape(n2 * k, m).T
    kernel += deltas_gram.view(n1, k, n2, k) * inputs_gram[:, None, :, None]


def add_masked_layer_kernel(
    kernel: Tensor,
    layer: NTKLinear,
    c1: Tensor,
    c2: Tensor,
    d1: Tensor,
    d2: Tensor,
    chunk_size: int | None,
    symmetric: bool,
) -> None:
    """K[i,a,j,b] += sum_r D1[i,a,r] D2[j,b,r] / deg[r] * Q[i,j,r],  Q[i,j,r] = sum_s M[r,s] c1[i,s] c2[j,s].

    Q comes from one GEMM per chunk: (c1_i ⊙ c2_j) @ M^T over chunks of probe pairs, or, for a layer with
    few neurons (an output layer), (C1 ⊙ M_r) @ C2^T over chunks of neurons r, whichever needs the smaller
    elementwise product. 1/deg is folded into D2. ``symmetric`` (c2, d2 are c1, d1): a chunk of rows i is
    paired with the probes j >= its first row only, and the part below the diagonal is filled in by
    transposition (at least 8 chunks, so about half the pairs are skipped).
    """
    n1, k, m = d1.shape
    n2 = d2.shape[0]
    mask = layer.mask.to(c1.dtype)
    d2 = d2 / layer.in_degree.to(d2.dtype)
    if 8 * m <= n2:
        per_neuron = n1 * max(layer.in_features, n2 * k)
        for neurons in chunk_slices(m, max(1, DEFAULT_CHUNK_ELEMENTS // per_neuron)):
            masked_gram = ((c1.unsqueeze(0) * mask[neurons, None, :]) @ c2.T).permute(1, 2, 0)  # (n1, n2, r)
            kernel += _contract_deltas(masked_gram, d1[:, :, neurons], d2[:, :, neurons])
        return
    chunk = chunk_size or max(1, DEFAULT_CHUNK_ELEMENTS // (n2 * max(layer.in_features, k * m)))
    if symmetric:
        chunk = min(chunk, -(-n1 // 8))
    for rows in chunk_slices(n1, chunk):
        cols = slice(rows.start if symmetric else 0, n2)
        block = _contract_deltas((c1[rows, None, :] * c2[None, cols, :]) @ mask.T, d1[rows], d2[cols])
        kernel[rows, :, cols] += block
        if symmetric:  # K[j, b, i, a] = K[i, a, j, b] for the probes j past this chunk
            kernel[rows.stop :, :, rows] += block[:, :, rows.stop - rows.start :].permute(2, 3, 0, 1)


def private_gradient_energy(layer: NTKLinear, c: Tensor, weight: bool, bias: bool) -> Tensor:
    """gamma[i, q] = (sum_t M[q,t] c[i,t]^2 + 1[bias]) / deg[q] = ||d z[q] / d(row q of W, b[q])||^2.

    ``weight``/``bias`` say which of the two are trainable. ``c`` has shape (n, in); returns (n, out).
    """
    squares = c * c
    if not weight:
        energy = c.new_zeros(c.shape[0], layer.out_features)
    elif layer.mask is None:
        energy = squares.sum(dim=1, keepdim=True).expand(-1, layer.out_features)
    else:
        energy = squares @ layer.mask.to(c.dtype).T
    if bias:
        energy = energy + 1.0
    return energy / layer.in_degree.to(c.dtype)


def _contract_deltas(masked_gram: Tensor, d1: Tensor, d2: Tensor) -> Tensor:
    """sum_r d1[i,a,r] d2[j,b,r] Q[i,j,r] for Q of shape (b1, b2, r): shape (b1, k, b2, k)."""
    b1, b2, m = masked_gram.shape
    k = d1.shape[1]
    weighted = (masked_gram.unsqueeze(2) * d2.unsqueeze(0)).reshape(b1, b2 * k, m)
    return torch.bmm(d1, weighted.transpose(1, 2)).view(b1, k, b2, k)


class NTKLinearRule(Rule):
    """:class:`NTKLinear` called once per forward pass on inputs (n, in_features)."""

    kind = "ntk_linear"

    def __init__(self, name: str, module: nn.Module, params: dict[str, nn.Parameter]):
        super().__init__(name, module, params)
        self.route = "gram"

    def choose_route(self, calls: list[Call], n: int, k: int, diagonal: bool = False) -> None:
        layer = self.module
        nnz = layer.in_features * layer.out_features if layer.mask is None else int(layer.mask.sum())
        pairs = n if diagonal else n * n
        dense = pairs * (layer.in_features + k * k * layer.out_features)
        self.costs = {"gram": float(dense if layer.mask is None else dense + pairs * nnz)}

    def factors(self, calls: list[Call], k: int) -> list[Tensor]:
        (call,) = calls
        return [call.input(), call.grad()]

    def kernel(
        self, parts1: list[Tensor], parts2: list[Tensor], symmetric: bool, chunk: int | None
    ) -> Tensor:
        (c1, d1), (c2, d2) = parts1, parts2
        kernel = d1.new_zeros(d1.shape[0], d1.shape[1], d2.shape[0], d2.shape[1])
        add_ntk_linear_kernel(kernel, self.module, c1, c2, d1, d2, chunk, symmetric)
        return kernel

    def diagonal(self, parts: list[Tensor], chunk: int | None) -> Tensor:
        c, d = parts
        energy = private_gradient_energy(self.module, c, *trainable_flags(self.module))  # (n, out)
        return torch.bmm(d * energy.unsqueeze(1), d.transpose(1, 2))
