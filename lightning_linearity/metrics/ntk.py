"""Empirical neural tangent kernel (MATH.md section 2.1; 004 Eq. 17).

    K[(i,a),(j,b)] = < d f_a(w; x_i)/dw , d f_b(w; x_j)/dw >        shape (n*k, n*k), index i*k + a

``x2`` gives the cross kernel K[(i,a),(j,b)] with x_i from ``x`` and x_j from ``x2`` (shape (n1*k, n2*k)),
e.g. a row block K[x_rank, x_all] when probes are split across DDP ranks.

Two paths compute the same numbers (the tests check both against an explicit Jacobian):

* ``"structured"`` (the package's :class:`LayeredNTKNet`, MATH.md section 3). A weight W_l[r,s] enters only
  through z_l[r] = (sum_s M_l[r,s] W_l[r,s] c_l[s] + b_l[r]) / sqrt(deg_l[r]), so with the backpropagated
  deltas D_l[i,a,r] = d f_a(x_i) / d z_l[r]

      K = sum_l sum_r D_l[i,a,r] D_l[j,b,r] / deg_l[r] * (sum_s M_l[r,s] c_l[i,s] c_l[j,s] [+ 1 with a bias]).

  Without a mask the bracket is the Gram matrix C_l C_l^T (+ 1), the same for every neuron, and layer l
  contributes (C_l C_l^T + 1) ⊙ (D_l diag(1/deg_l) D_l^T) (broadcast over the outputs a, b). With a mask the
  bracket is a per-neuron Gram matrix, computed as one GEMM (c_i ⊙ c_j) @ M_l^T over chunks of probe
  pairs (only pairs i <= j for the symmetric kernel; per neuron for output layers). That costs about
  n^2 * nnz(M_l) / 2, the same order as contracting the Jacobian for k = 1: masked layers gain a constant
  (and a factor ~k^2 with k outputs),
  unmasked ones orders of magnitude (O(n^2 (fan_l + k^2 m_l)) per layer, not O(n^2 k^2 P)). The deltas
  come from one batched backward recursion over the k output basis vectors (plain matmuls with the
  effective weights, sigma' in closed form); the n-by-P Jacobian is never formed.
* ``"generic"`` (any ``nn.Module``, via ``torch.func``): ``generic_impl="jacobian"`` contracts per-probe
  Jacobians ``vmap(jacrev(f))`` block by block; ``generic_impl="ntk_vp"`` is the NTK-vector-product method of
  the torch.func "neural tangent kernels" tutorial: a vjp per probe of ``x`` with the k output basis
  vectors gives J(x_i)^T e_a, and one jvp of the whole ``x2`` batch along it gives the row
  K[(i,a), :] = J(x2) J(x_i)^T e_a, so no Jacobian of ``x2`` is ever stored or recomputed. The generic path
  treats probe points independently (``vmap`` over single inputs), as MATH.md's definition does.

``"auto"`` takes the structured path whenever the model allows it and the generic one otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import jacrev, jvp, vjp, vmap

from lightning_linearity.metrics._functional import (
    Params,
    check_chunk_size,
    check_differentiable,
    check_finite,
    check_probes,
    evaluate,
    functional_model,
    num_parameters,
    single_input_model,
    trainable_parameters,
)
from lightning_linearity.metrics._layered import (
    Method,
    backpropagate,
    check_method,
    structured_net,
    trace_net,
    trainable_flags,
)
from lightning_linearity.metrics._linalg import chunk_slices
from lightning_linearity.nets.layers import NTKLinear
from lightning_linearity.nets.network import LayeredNTKNet

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "empirical_ntk"]

GenericImpl = Literal["jacobian", "ntk_vp"]

#: Elements in the largest intermediate a chunk may create when ``chunk_size`` is None
#: (2**27 elements = 512 MiB in float32).
DEFAULT_CHUNK_ELEMENTS = 2**27


def empirical_ntk(
    model: nn.Module,
    x: Tensor,
    x2: Tensor | None = None,
    *,
    method: Method = "auto",
    generic_impl: GenericImpl = "jacobian",
    chunk_size: int | None = None,
) -> Tensor:
    """The empirical NTK of ``model`` on the probe inputs ``x`` (MATH.md 2.1).

    Args:
        model: any ``nn.Module`` mapping (n, ...) to (n, k) (an (n,) output counts as k = 1); "w" is every
            parameter with ``requires_grad``.
        x: probe inputs, shape (n, ...), on the model's device and in its dtype.
        x2: optional second probe set; then the cross kernel between ``x`` and ``x2`` is returned.
        method: ``"structured"`` (the package's networks only; raises ``ValueError`` otherwise),
            ``"generic"`` (``torch.func``, any module) or ``"auto"`` (structured when possible).
        generic_impl: ``"jacobian"`` (Jacobian contraction) or ``"ntk_vp"`` (NTK-vector products);
            only used on the generic path.
        chunk_size: probe points of ``x`` processed at once (generic path; structured path with masked
            layers). ``None`` sizes chunks so that no intermediate exceeds ``DEFAULT_CHUNK_ELEMENTS``.
            Memory: structured, O((n1*k)(n2*k) + n*k*width) plus the masked chunks; generic
            ``"jacobian"``, two Jacobian blocks of chunk*k*P entries (blocks are recomputed when the whole
            Jacobian does not fit); ``"ntk_vp"``, one block of chunk*k*P entries, nothing recomputed.

    Returns:
        K of shape (n*k, n*k) with row/column index i*k + a, symmetric positive semi-definite; or the
        cross kernel of shape (n1*k, n2*k). Dtype and device follow the model output.

    Raises:
        ValueError: unknown ``method``/``generic_impl``, bad ``chunk_size``, no trainable parameters, probe
            inputs the model cannot take (wrong trailing shape), ``x2`` shaped unlike ``x``, an output that
            does not depend differentiably on the parameters, or ``method="structured"`` on a model it
            cannot handle (the message says why).
        FloatingPointError: NaN or inf in the model output or in K.
    """
    check_method(method)
    if generic_impl not in ("jacobian", "ntk_vp"):
        raise ValueError(f"generic_impl must be 'jacobian' or 'ntk_vp', got {generic_impl!r}")
    check_chunk_size(chunk_size)
    check_probes(x, x2)
    params = trainable_parameters(model)
    net = structured_net(model, required=method == "structured") if method != "generic" else None
    if net is not None:
        kernel = _structured_ntk(net, x, x2, chunk_size)
    else:
        kernel = _generic_ntk(model, params, x, x2, generic_impl, chunk_size)
    return check_finite(kernel, "the empirical NTK")


def _structured_ntk(net: LayeredNTKNet, x: Tensor, x2: Tensor | None, chunk_size: int | None) -> Tensor:
    factors = structured_factors(net, x)
    return structured_kernel(net, factors, None if x2 is None else structured_factors(net, x2), chunk_size)


@dataclass(frozen=True)
class NTKFactors:
    """What the structured NTK needs of a set of n probe points, layer by layer (l = 1..L+1).

    Attributes:
        inputs: c_l, shape (n, in_l).
        deltas: D_l[i, a, r] = d f_a(x_i) / d z_l[r], shape (n, k, m_l).

    Under DDP each rank computes the factors of its probe points; gathered (as rows of :meth:`flatten`)
    they give every rank the whole kernel for half the backward passes of computing it alone.
    """

    inputs: list[Tensor]
    deltas: list[Tensor]

    def flatten(self) -> Tensor:
        """One row per probe point: every c_l and D_l of that point, concatenated."""
        parts = [t.flatten(1) for pair in zip(self.inputs, self.deltas, strict=True) for t in pair]
        return torch.cat(parts, dim=1)

    @classmethod
    def unflatten(cls, rows: Tensor, net: LayeredNTKNet) -> NTKFactors:
        """The inverse of :meth:`flatten` for the layers of ``net``."""
        k = net.out_features
        sizes = [size for layer in net.layers for size in (layer.in_features, k * layer.out_features)]
        parts = rows.split(sizes, dim=1)
        deltas = [d.view(rows.shape[0], k, -1) for d in parts[1::2]]
        return cls(list(parts[0::2]), deltas)


def structured_factors(net: LayeredNTKNet, x: Tensor) -> NTKFactors:
    """c_l and the deltas of the k outputs (one forward pass, one backward pass batched over outputs)."""
    trace = trace_net(net, x)
    identity = torch.eye(net.out_features, dtype=trace.output.dtype, device=trace.output.device)
    return NTKFactors(trace.inputs, backpropagate(net, trace, net.depth + 1, identity))


def structured_kernel(
    net: LayeredNTKNet, factors: NTKFactors, factors2: NTKFactors | None = None, chunk_size: int | None = None
) -> Tensor:
    """K from the factors of ``x`` (and of ``x2`` for the cross kernel), per the module docstring."""
    other = factors if factors2 is None else factors2
    n1, k = factors.deltas[0].shape[:2]
    n2 = other.deltas[0].shape[0]
    kernel = factors.deltas[0].new_zeros(n1, k, n2, k)
    with torch.no_grad():
        for layer, c1, c2, d1, d2 in zip(
            net.layers, factors.inputs, other.inputs, factors.deltas, other.deltas, strict=True
        ):
            weight, bias = trainable_flags(layer)
            if layer.mask is None:
                _add_dense_layer_kernel(kernel, layer, c1, c2, d1, d2, weight, bias)
                continue
            if bias:  # the bias is an unmasked input: its term has the unmasked form, C C^T = 0
                _add_dense_layer_kernel(kernel, layer, c1, c2, d1, d2, False, True)
            if weight:
                _add_masked_layer_kernel(kernel, layer, c1, c2, d1, d2, chunk_size, factors2 is None)
    kernel = kernel.reshape(n1 * k, n2 * k)
    if factors2 is None:  # exact symmetry (the two triangles differ by rounding only)
        kernel = 0.5 * (kernel + kernel.T)
    return kernel


def _add_dense_layer_kernel(
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


def _add_masked_layer_kernel(
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


def _contract_deltas(masked_gram: Tensor, d1: Tensor, d2: Tensor) -> Tensor:
    """sum_r d1[i,a,r] d2[j,b,r] Q[i,j,r] for Q of shape (b1, b2, r): shape (b1, k, b2, k)."""
    b1, b2, m = masked_gram.shape
    k = d1.shape[1]
    weighted = (masked_gram.unsqueeze(2) * d2.unsqueeze(0)).reshape(b1, b2 * k, m)
    return torch.bmm(d1, weighted.transpose(1, 2)).view(b1, k, b2, k)


# ----------------------------------------------------------------------------------------- generic
def _generic_ntk(
    model: nn.Module, params: Params, x: Tensor, x2: Tensor | None, impl: GenericImpl, chunk_size: int | None
) -> Tensor:
    k = evaluate(model, x).shape[1]
    n2 = x.shape[0] if x2 is None else evaluate(model, x2).shape[0]
    check_differentiable(model, x)
    per_point = k * num_parameters(params)
    if impl == "ntk_vp":
        chunk = chunk_size or max(1, DEFAULT_CHUNK_ELEMENTS // per_point)
        other = x if x2 is None else x2
        rows = [_ntk_vp_rows(model, params, x[r], other) for r in chunk_slices(x.shape[0], chunk)]
        kernel = torch.cat(rows).reshape(x.shape[0] * k, n2 * k)
        return 0.5 * (kernel + kernel.T) if x2 is None else kernel
    # two Jacobian blocks are alive at once
    chunk = chunk_size or max(1, DEFAULT_CHUNK_ELEMENTS // (2 * per_point))
    f1 = single_input_model(model)

    def jacobian_rows(probes: Tensor) -> Params:  # J(x) per parameter tensor, (n*k, numel)
        jac = vmap(jacrev(f1), in_dims=(None, 0))(params, probes)
        return {name: j.reshape(j.shape[0] * j.shape[1], -1) for name, j in jac.items()}

    return blocked_jacobian_gram(
        lambda block: jacobian_rows(x[block]),
        x.shape[0],
        chunk,
        None if x2 is None else (lambda block: jacobian_rows(x2[block]), n2),
    )


def blocked_jacobian_gram(
    rows: Callable[[slice], Params],
    n: int,
    chunk: int,
    other: tuple[Callable[[slice], Params], int] | None = None,
) -> Tensor:
    """The Gram matrix sum_p J_p J'_p^T of two Jacobians, assembled block by block.

    ``rows(block)`` returns, per parameter tensor p, the Jacobian rows of the items ``block`` of ``range(n)``,
    flattened to (..., rows, numel) (leading batch dimensions allowed); ``other = (rows', n')`` gives the
    second Jacobian, default the first (then blocks below the diagonal are transposes, not recomputed).
    Only two blocks of ``chunk`` items are alive at once; a block is recomputed each time it is needed.
    """
    other_rows, n_other = other if other is not None else (rows, n)
    grid: list[list[Tensor]] = []
    for a, block1 in enumerate(chunk_slices(n, chunk)):
        jac1 = rows(block1)
        line = []
        for b, block2 in enumerate(chunk_slices(n_other, chunk)):
            if other is None and b < a:
                line.append(grid[b][a].transpose(-1, -2))
                continue
            jac2 = jac1 if other is None and a == b else other_rows(block2)
            line.append(sum(jac1[name] @ jac2[name].transpose(-1, -2) for name in jac1))
        grid.append(line)
    return torch.cat([torch.cat(line, dim=-1) for line in grid], dim=-2)


def _ntk_vp_rows(model: nn.Module, params: Params, x_rows: Tensor, x2: Tensor) -> Tensor:
    """K[(i,a), (j,b)] for the probes ``x_rows`` against all of ``x2``, shape (b, k, n2, k).

    vjp: J(x_i)^T e_a for each probe i and output a (vmap over probes and the basis e_1..e_k); jvp: the
    tangent of f(w; x2) along each of them, J(x2) J(x_i)^T e_a (vmap over the b*k tangents).
    """
    f1 = single_input_model(model)
    f = functional_model(model)

    def pullbacks(xi: Tensor) -> Params:
        out, vjp_fn = vjp(lambda p: f1(p, xi), params)
        basis = torch.eye(out.shape[0], dtype=out.dtype, device=out.device)
        return vmap(vjp_fn)(basis)[0]

    tangents = vmap(pullbacks)(x_rows)  # name -> (b, k, *shape)
    b, k = next(iter(tangents.values())).shape[:2]
    flat = {name: t.reshape(b * k, *t.shape[2:]) for name, t in tangents.items()}

    def push(tangent: Params) -> Tensor:
        return jvp(lambda p: f(p, x2), (params,), (tangent,))[1]

    return vmap(push)(flat).reshape(b, k, x2.shape[0], -1)
