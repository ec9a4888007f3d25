"""Empirical neural tangent kernel (docs/math.md section 2.1; 004 Eq. 17).

    K[(i,a),(j,b)] = < d f_a(w; x_i)/dw , d f_b(w; x_j)/dw >        shape (n*k, n*k), index i*k + a

``x2`` gives the cross kernel K[(i,a),(j,b)] with x_i from ``x`` and x_j from ``x2`` (shape (n1*k, n2*k)).

Work split (DDP): :func:`ntk_path` decides the path once (the same on every rank), :func:`ntk_share_rows`
gives the rows of a share of the probe points (the factors of those points only, on the structured and
engine paths), :func:`ntk_from_share_rows` K from the rows of all of them.

Three paths compute the same numbers (the tests check each against an explicit Jacobian):

* ``"structured"`` (the package's :class:`LayeredNTKNet`, docs/math.md 3). A weight W_l[r,s] enters only
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
  treats probe points independently (``vmap`` over single inputs), as docs/math.md's definition does.

* ``"engine"`` (any model made of standard layers, :mod:`lightning_linearity.metrics.engine`): one forward
  pass with hooks and one backward pass batched over the k outputs give each parametrised module's inputs
  and output gradients; a derivative rule per module type (Linear, convolutions, Embedding, norm affines,
  NTKLinear, a per-module ``torch.func`` fallback) adds that module's block of K, e.g.
  (C C^T + 1) ⊙ (D D^T) for a Linear layer. No per-sample Jacobian of the whole model is formed.

``"auto"`` takes the structured path for the package's networks, the engine for any other model it can
take (one that treats probe points independently: eval-mode BatchNorm, no dropout in training mode), and
the generic path otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import jacrev, jvp, vjp, vmap

from lightning_linearity._text import short_repr
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
    ENGINE_METHODS,
    EngineMethod,
    backpropagate,
    check_method,
    structured_net,
    trace_net,
)
from lightning_linearity.metrics._linalg import chunk_slices
from lightning_linearity.metrics.engine import (
    DEFAULT_CHUNK_ELEMENTS,
    NTKPlan,
    engine_ntk,
    ntk_from_rows,
    ntk_plan,
    ntk_rows,
    unless_unsupported,
)
from lightning_linearity.metrics.engine._ntk_linear import add_ntk_linear_kernel
from lightning_linearity.nets.network import LayeredNTKNet

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "NTKPath",
    "empirical_ntk",
    "ntk_from_share_rows",
    "ntk_path",
    "ntk_share_rows",
    "rows_of_share",
]

GenericImpl = Literal["jacobian", "ntk_vp"]
NTKMethod = EngineMethod


def empirical_ntk(
    model: nn.Module,
    x: Tensor,
    x2: Tensor | None = None,
    *,
    method: NTKMethod = "auto",
    generic_impl: GenericImpl = "jacobian",
    chunk_size: int | None = None,
) -> Tensor:
    """The empirical NTK of ``model`` on the probe inputs ``x`` (docs/math.md 2.1).

    Args:
        model: any ``nn.Module`` mapping (n, ...) to (n, k) (an (n,) output counts as k = 1); "w" is every
            parameter with ``requires_grad``.
        x: probe inputs, shape (n, ...), on the model's device and in its dtype.
        x2: optional second probe set; then the cross kernel between ``x`` and ``x2`` is returned.
        method: ``"structured"`` (the package's networks only; raises ``ValueError`` otherwise),
            ``"engine"`` (per-module derivative rules, :mod:`lightning_linearity.metrics.engine`; any model
            that treats probe points independently, else ``ValueError`` saying why), ``"generic"``
            (``torch.func``, any module) or ``"auto"`` (structured when possible, else the engine when the
            model allows it, else generic).
        generic_impl: ``"jacobian"`` (Jacobian contraction) or ``"ntk_vp"`` (NTK-vector products);
            only used on the generic path.
        chunk_size: probe points of ``x`` processed at once (generic path; structured path with masked
            layers; engine rules that sum over positions). ``None`` sizes chunks so that no intermediate
            exceeds ``DEFAULT_CHUNK_ELEMENTS``. Memory: structured, O((n1*k)(n2*k) + n*k*width) plus the
            masked chunks; engine, the factor rows (per module: its inputs and output gradients, or its
            per-sample gradients where that route is cheaper) and K; generic
            ``"jacobian"``, two Jacobian blocks of chunk*k*P entries (blocks are recomputed when the whole
            Jacobian does not fit); ``"ntk_vp"``, one block of chunk*k*P entries, nothing recomputed.

    Returns:
        K of shape (n*k, n*k) with row/column index i*k + a, symmetric positive semi-definite; or the
        cross kernel of shape (n1*k, n2*k). Dtype and device follow the model output.

    Raises:
        ValueError: unknown ``method``/``generic_impl``, bad ``chunk_size``, no trainable parameters, probe
            inputs the model cannot take (wrong trailing shape), ``x2`` shaped unlike ``x``, an output that
            does not depend differentiably on the parameters, or ``method="structured"``/``"engine"`` on
            a model it cannot handle (the message says why).
        FloatingPointError: NaN or inf in the model output or in K.
    """
    if generic_impl not in ("jacobian", "ntk_vp"):
        raise ValueError(f"generic_impl must be 'jacobian' or 'ntk_vp', got {short_repr(generic_impl)}")
    check_chunk_size(chunk_size)
    check_probes(x, x2)
    params = trainable_parameters(model)
    path = ntk_path(model, x, method=method)
    if path.net is not None:
        kernel = _structured_ntk(path.net, x, x2, chunk_size)
    elif path.plan is not None:
        kernel = engine_ntk(model, x, x2, chunk_size=chunk_size, plan=path.plan)
    else:
        kernel = _generic_ntk(model, params, x, x2, generic_impl, chunk_size)
    return check_finite(kernel, "the empirical NTK")


# ----------------------------------------------------------------------------------- the work split
@dataclass(frozen=True)
class NTKPath:
    """The path :func:`empirical_ntk` takes for a model, decided once by :func:`ntk_path`.

    Attributes:
        model: the model.
        name: ``"structured"`` (``net`` set), ``"engine"`` (``plan`` set) or ``"generic"``.
        net: the package's network behind the model, for the structured factors.
        plan: the engine's plan for the probe set (:func:`~lightning_linearity.metrics.engine.ntk_plan`).
    """

    model: nn.Module
    name: Literal["structured", "engine", "generic"]
    net: LayeredNTKNet | None = None
    plan: NTKPlan | None = None


def ntk_path(model: nn.Module, x: Tensor, *, method: NTKMethod = "auto") -> NTKPath:
    """Which path computes the NTK of ``model`` on the probe set ``x``: the one place that decides it.

    ``"auto"`` takes the structured path for the package's networks, the engine for any other model it
    can take (the plan traces the first two probe points; :func:`ntk_plan`), and the generic path
    otherwise; ``"structured"`` and ``"engine"`` raise ``ValueError`` saying why a model does not qualify.
    The result is the same on every DDP rank (it depends on the model and the probe set only).
    """
    check_method(method, ENGINE_METHODS)
    net = structured_net(model, required=method == "structured") if method in ("auto", "structured") else None
    if net is not None:
        return NTKPath(model, "structured", net=net)
    if method in ("auto", "engine"):
        plan = unless_unsupported(lambda: ntk_plan(model, x), required=method == "engine")
        if plan is not None:
            return NTKPath(model, "engine", plan=plan)
    return NTKPath(model, "generic")


def rows_of_share(compute: Callable[[Tensor], Tensor], x: Tensor, share: slice) -> Tensor:
    """``compute(x[share])``: the rows of a share of the probe points, one per point (the convention of every
    metric's work split, :mod:`lightning_linearity.metrics.split`).

    An empty share (a DDP rank when there are fewer points than ranks) evaluates one point and keeps no
    row, so that its (0, ...) result still has the trailing shape the all-gather needs.
    """
    if share.stop > share.start:
        return compute(x[share])
    return compute(x[:1])[:0]


def ntk_share_rows(path: NTKPath, x: Tensor, share: slice, *, chunk_size: int | None = None) -> Tensor:
    """The rows of the probe points ``x[share]`` (one row per point) from which :func:`ntk_from_share_rows`
    assembles K on all of ``x``; the rows of disjoint shares, concatenated in probe order, are the rows of
    all points (a DDP rank computes its share, an all-gather joins them).

    Per path: the structured factors c_l and D_l of the share (:class:`NTKFactors`, docs/math.md 3); the
    engine's factor rows (:func:`~lightning_linearity.metrics.engine.ntk_rows`): either way only the share's
    probe points are backpropagated. The generic path has no factors of bounded size: its rows are the
    row block K[x_share, x] of the cross kernel (every point's Jacobian is formed on every rank).
    An empty share gives (0, row size) rows.
    """
    if path.net is not None:
        return rows_of_share(lambda xs: structured_factors(path.net, xs).flatten(), x, share)
    if path.plan is not None:
        return rows_of_share(lambda xs: ntk_rows(path.model, xs, path.plan), x, share)

    def block(x_rows: Tensor) -> Tensor:
        x2 = None if x_rows.shape[0] == x.shape[0] else x  # the whole kernel: let it use the symmetry
        kernel = empirical_ntk(path.model, x_rows, x2, method="generic", chunk_size=chunk_size)
        return kernel.reshape(x_rows.shape[0], -1)  # rows (i, a) of K -> one row per probe point i

    return rows_of_share(block, x, share)


def ntk_from_share_rows(path: NTKPath, rows: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """K (n*k, n*k) from the rows of all n probe points (:func:`ntk_share_rows`), exactly symmetric; what
    :func:`empirical_ntk` gives on the path ``path``.

    Raises:
        FloatingPointError: NaN or inf in K.
    """
    if path.net is not None:
        factors = NTKFactors.unflatten(rows, path.net)
        kernel = structured_kernel(path.net, factors, chunk_size=chunk_size)
    elif path.plan is not None:
        kernel = ntk_from_rows(path.plan, rows, chunk_size=chunk_size)
    else:
        side = math.isqrt(rows.numel())  # n * k
        kernel = rows.reshape(side, side)
        kernel = 0.5 * (kernel + kernel.T)  # the blocks of different ranks differ by rounding
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
            add_ntk_linear_kernel(kernel, layer, c1, c2, d1, d2, chunk_size, factors2 is None)
    kernel = kernel.reshape(n1 * k, n2 * k)
    if factors2 is None:  # exact symmetry (the two triangles differ by rounding only)
        kernel = 0.5 * (kernel + kernel.T)
    return kernel


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
