"""What every derivative rule of the engine shares: the record of one module call, the rule interface, and
the two ways a block of the kernel is contracted (docs/math.md section 2.1).

A module m with trainable parameters theta_m contributes

    K_m[(i,a),(j,b)] = < d f_a(x_i)/d theta_m , d f_b(x_j)/d theta_m >,

and d f_a(x_i)/d theta_m = sum over the calls of m of (d y/d theta_m)^T D[i,a], with y the call's output
and D[i,a] = d f_a(x_i)/d y its gradient. A rule turns the recorded inputs and D of its module into
*factors*: tensors with one row per probe point, which it later contracts into its block of K. Two shapes
of factors recur:

* per-sample gradients G[i,a] = d f_a(x_i)/d theta_m, shape (n, k, P_m): K_m = G1 G2^T
  (:func:`gradient_kernel`);
* inputs and output gradients of an affine map over positions t (sequence positions, conv patches):
  K_m = sum_g sum_{t,s} (C_g[i,t] . C_g[j,s] + [bias]) (D_g[i,a,t] . D_g[j,b,s]) (:func:`gram_kernel`).

The "outputs" a..b need not be those of f: seeded at a layer's output instead, they are the layer's sampled
neurons, and the blocks K_m[(i,a),(i,b)] of one probe point summed over the modules are the neuron-gradient
Gram matrices of docs/math.md 2.5 (:meth:`Rule.diagonal`, :func:`gradient_diagonal`, :func:`gram_diagonal`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_linearity.metrics._linalg import chunk_slices

#: Elements in the largest intermediate a chunk may create when ``chunk_size`` is None
#: (2**27 elements = 512 MiB in float32).
DEFAULT_CHUNK_ELEMENTS = 2**27


@dataclass
class Call:
    """One call of a module in the forward pass: its arguments, its output tensors (the autograd handles
    the gradients are taken with respect to) and, after the backward pass, the gradients
    D = d f / d output of shape (n, k, *output.shape[1:]); ``None`` marks an output that is not a
    floating-point tensor."""

    args: tuple
    kwargs: dict
    outputs: list[Tensor | None]
    grads: list[Tensor] = field(default_factory=list)

    def input(self) -> Tensor:
        """The first positional argument, detached."""
        return self.args[0].detach()

    def grad(self, index: int = 0) -> Tensor:
        """D of output ``index`` (zeros where the output does not reach f)."""
        return self.grads[index]


class Rule:
    """The derivative rule of one module (one *site* of the engine).

    Subclasses set :attr:`kind` and implement :meth:`choose_route`, :meth:`factors`, :meth:`kernel` and
    :meth:`diagonal`.
    """

    kind = "rule"

    def __init__(self, name: str, module: nn.Module, params: dict[str, nn.Parameter]):
        self.name = name
        self.module = module
        self.params = params  # the trainable parameters this rule accounts for, by local name
        self.route = "gradient"
        self.costs: dict[str, float] = {}

    def choose_route(self, calls: list[Call], n: int, k: int, diagonal: bool = False) -> None:
        """Set :attr:`costs` (flop estimate of each route this rule offers, for ``n`` probe points and ``k``
        outputs; ``calls`` are those of one probe point) and pick the cheapest as :attr:`route`.
        ``diagonal``: the costs of :meth:`diagonal` (the n blocks of one probe each) instead of
        :meth:`kernel`."""

    def factors(self, calls: list[Call], k: int) -> list[Tensor]:
        """The factors of the probe points of ``calls``, each of shape (n, ...)."""
        raise NotImplementedError

    def kernel(
        self, parts1: list[Tensor], parts2: list[Tensor], symmetric: bool, chunk: int | None
    ) -> Tensor:
        """This module's block of K, shape (n1, k, n2, k)."""
        raise NotImplementedError

    def diagonal(self, parts: list[Tensor], chunk: int | None) -> Tensor:
        """K_m[(i,a),(i,b)] for every probe point i: the Gram matrix of the gradients of the k outputs of
        one probe with respect to this module's parameters, shape (n, k, k)."""
        raise NotImplementedError

    def describe(self) -> str:
        costs = ", ".join(f"{route} {cost:.2g}" for route, cost in self.costs.items())
        return f"{self.name or '<model>'} ({type(self.module).__name__}): {self.kind}, route {self.route}" + (
            f" (flops: {costs})" if costs else ""
        )


def gradient_kernel(g1: Tensor, g2: Tensor, symmetric: bool = False) -> Tensor:
    """K = G1 G2^T for per-sample gradients of shape (n, k, P): shape (n1, k, n2, k).

    ``symmetric`` (G2 is G1): for large blocks only the blocks on and above the diagonal of a 4 x 4 grid of
    row blocks are multiplied (10/16 of the flops), the others are their transposes.
    """
    n1, k = g1.shape[:2]
    n2 = g2.shape[0]
    a, b = g1.reshape(n1 * k, -1), g2.reshape(n2 * k, -1)
    if not symmetric or n1 < 8 or a.shape[0] * a.shape[1] < 2**20:
        return (a @ b.T).view(n1, k, n2, k)
    kernel = a.new_empty(n1 * k, n1 * k)
    edges = [round(i * n1 / 4) * k for i in range(5)]
    blocks = [slice(edges[i], edges[i + 1]) for i in range(4)]
    for i, rows in enumerate(blocks):
        cols = slice(rows.start, n1 * k)
        kernel[rows, cols] = a[rows] @ a[cols].T
        for later in blocks[i + 1 :]:
            kernel[later, rows] = kernel[rows, later].T
    return kernel.view(n1, k, n2, k)


def gradient_diagonal(g: Tensor) -> Tensor:
    """G_i G_i^T for per-sample gradients of shape (n, k, P): shape (n, k, k)."""
    return torch.bmm(g, g.transpose(1, 2))


def gram_kernel(
    inputs_gram: Callable[[slice, slice], Tensor],
    d1: Tensor,
    d2: Tensor,
    symmetric: bool,
    chunk: int | None,
) -> Tensor:
    """K[i,a,j,b] = sum_g sum_{t,s} Q_g[i,t,j,s] (D1_g[i,a,t] . D2_g[j,b,s]), shape (n1, k, n2, k).

    ``d1``: (n1, k, G, T1, m), ``d2``: (n2, k, G, T2, m) (G groups, T positions); ``inputs_gram(rows, cols)``
    gives Q for the probe points ``rows`` of the first set against ``cols`` of the second, shape
    (G, b1, T1, b2, T2) (the input Gram matrix, + 1 with a bias). With T1 = T2 = G = 1 this is
    Q ⊙ (D1 D2^T) broadcast over the outputs. Otherwise blocks of rows are contracted through the
    (b1*k*T1, n2*k*T2) Gram matrix of the deltas; ``symmetric`` (the second set is the first) computes the
    blocks on and above the diagonal only and fills the rest by transposition.
    """
    n1, k, groups, t1, m = d1.shape
    n2, _, _, t2, _ = d2.shape
    if groups == 1 and t1 == 1 and t2 == 1:
        deltas_gram = d1.reshape(n1 * k, m) @ d2.reshape(n2 * k, m).T
        q = inputs_gram(slice(0, n1), slice(0, n2)).reshape(n1, n2)
        return deltas_gram.view(n1, k, n2, k) * q[:, None, :, None]
    kernel = d1.new_zeros(n1, k, n2, k)
    per_row = groups * k * t1 * n2 * k * t2
    rows_per_chunk = chunk or max(1, DEFAULT_CHUNK_ELEMENTS // per_row)
    if symmetric:
        rows_per_chunk = min(rows_per_chunk, max(1, -(-n1 // 4)))
    flat2 = d2.permute(2, 0, 1, 3, 4).reshape(groups, n2 * k * t2, m)
    for rows in chunk_slices(n1, rows_per_chunk):
        cols = slice(rows.start if symmetric else 0, n2)
        b1, b2 = rows.stop - rows.start, cols.stop - cols.start
        flat1 = d1[rows].permute(2, 0, 1, 3, 4).reshape(groups, b1 * k * t1, m)
        other = flat2.view(groups, n2, k * t2, m)[:, cols].reshape(groups, b2 * k * t2, m)
        deltas_gram = torch.bmm(flat1, other.transpose(1, 2)).view(groups, b1, k, t1, b2, k, t2)
        block = torch.einsum("gitjs,giatjbs->iajb", inputs_gram(rows, cols), deltas_gram)
        kernel[rows, :, cols] += block
        if symmetric:  # K[j, b, i, a] = K[i, a, j, b] for the probes j past this chunk
            kernel[rows.stop :, :, rows] += block[:, :, b1:].permute(2, 3, 0, 1)
    return kernel


def gram_diagonal(inputs_gram: Callable[[slice], Tensor], d: Tensor, chunk: int | None) -> Tensor:
    """K[i,a,i,b] = sum_g sum_{t,s} Q_g[i,t,s] (D_g[i,a,t] . D_g[i,b,s]), shape (n, k, k).

    The diagonal blocks of :func:`gram_kernel`: ``d`` is (n, k, G, T, m), ``inputs_gram(rows)`` gives the
    input Gram matrix of each probe point of ``rows`` with itself, shape (b, G, T, T). Per chunk of probe
    points Q is applied to the deltas first, E[i,b,g,t] = sum_s Q_g[i,t,s] D_g[i,b,s], then
    K[i,a,i,b] = sum_{g,t} D_g[i,a,t] . E[i,b,g,t]: about G (T^2 d + k T^2 m + k^2 T m) flops per probe.
    """
    n, k, groups, positions, m = d.shape
    if groups == 1 and positions == 1:
        flat = d.reshape(n, k, m)
        return inputs_gram(slice(0, n)).reshape(n, 1, 1) * torch.bmm(flat, flat.transpose(1, 2))
    per_probe = groups * positions * (positions + k * m)
    result = d.new_empty(n, k, k)
    for rows in chunk_slices(n, chunk or max(1, DEFAULT_CHUNK_ELEMENTS // per_probe)):
        q, block = inputs_gram(rows), d[rows]
        weighted = torch.einsum("igts,ibgsm->ibgtm", q, block)
        result[rows] = torch.einsum("iagtm,ibgtm->iab", block, weighted)
    return result


def self_product_gram(c: Tensor, weight: bool, bias: bool) -> Callable[[slice], Tensor]:
    """Q_g[i,t,s] = [weight] C_g[i,t] . C_g[i,s] + [bias] for inputs of shape (n, G, T, d): (b, G, T, T)."""

    def q(rows: slice) -> Tensor:
        a = c[rows]
        gram = a @ a.transpose(2, 3) if weight else a.new_zeros(*a.shape[:3], a.shape[2])
        return gram + 1.0 if bias else gram

    return q


def product_gram(c1: Tensor, c2: Tensor, weight: bool, bias: bool) -> Callable[[slice, slice], Tensor]:
    """Q_g[i,t,j,s] = [weight] C1_g[i,t] . C2_g[j,s] + [bias] for inputs of shape (n, G, T, d)."""

    def q(rows: slice, cols: slice) -> Tensor:
        a, b = c1[rows], c2[cols]
        groups, b1, t1, b2, t2 = a.shape[1], a.shape[0], a.shape[2], b.shape[0], b.shape[2]
        if weight:
            flat_a = a.permute(1, 0, 2, 3).reshape(groups, b1 * t1, -1)
            flat_b = b.permute(1, 0, 2, 3).reshape(groups, b2 * t2, -1)
            gram = torch.bmm(flat_a, flat_b.transpose(1, 2)).view(groups, b1, t1, b2, t2)
        else:
            gram = a.new_zeros(groups, b1, t1, b2, t2)
        return gram + 1.0 if bias else gram

    return q
