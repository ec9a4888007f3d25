"""Rules for ``nn.Linear`` and ``nn.Embedding`` (docs/math.md section 2.1).

``nn.Linear`` on inputs (n, ..., d): the positions t of the leading dimensions (a sequence; every call of a
module used more than once counts as more positions) share W and b, so with C[i,t] the inputs and
D[i,a,t] = d f_a(x_i) / d y[i,t]

    d f_a(x_i)/dW = sum_t D[i,a,t] C[i,t]^T,     d f_a(x_i)/db = sum_t D[i,a,t],
    K = sum_{t,s} (C[i,t] . C[j,s] + 1) (D[i,a,t] . D[j,b,s]).

Two routes give it: *gram* (the last line; with one position it is (C C^T + 1) ⊙ (D D^T)) at about
n^2 T^2 (d + k^2 m) flops, and *gradient* (form the per-sample gradients, then G G^T) at about
n k T m d + n^2 k^2 m d. The cheaper one by this count is taken. For the blocks of single probe points
only (i = j, the neuron-gradient Gram of docs/math.md 2.5) the counts are n T^2 (d + k m) + n k^2 T m and
n k T m d + n k^2 m d.

``nn.Embedding`` is a linear map of one-hot inputs: C[i,t] . C[j,s] = [idx[i,t] == idx[j,s]], gram route
only. Positions holding ``padding_idx`` get no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_linearity.metrics.engine._base import (
    Call,
    Rule,
    gradient_diagonal,
    gradient_kernel,
    gram_diagonal,
    gram_kernel,
    product_gram,
    self_product_gram,
)


def affine_costs(
    n: int,
    k: int,
    groups: int,
    positions: int,
    d: int,
    m: int,
    weight: bool,
    bias: bool,
    diagonal: bool = False,
) -> dict[str, float]:
    """Flop estimates of the two routes for an affine map of ``groups`` blocks of (m, d) over positions;
    ``diagonal``: of the n blocks of one probe point each (:func:`gram_diagonal`) instead of all n^2."""
    t2 = positions * positions
    pairs = n if diagonal else n * n
    if diagonal:
        gram = n * groups * (t2 * d * weight + k * t2 * m + k * k * positions * m)
    else:
        gram = pairs * groups * (t2 * d * weight + k * k * t2 * m + k * k * t2)
    gradient = n * k * groups * positions * m * d * weight + pairs * k * k * groups * m * (d * weight + bias)
    if not weight:  # only the bias: its per-sample gradients sum_t D are as small as D itself
        return {"gradient": float(gradient)}
    return {"gram": float(gram), "gradient": float(gradient)}


def cheapest(costs: dict[str, float]) -> str:
    return min(costs, key=costs.__getitem__)


class AffineRule(Rule):
    """An affine map of grouped inputs over positions (``nn.Linear``, convolutions): its factors are
    either [C (n, G, T, d), D (n, k, G, T, m)] (route *gram*) or the per-sample gradients (route
    *gradient*)."""

    def __init__(self, name: str, module: nn.Module, params: dict[str, nn.Parameter]):
        super().__init__(name, module, params)
        self.weight, self.bias = "weight" in params, "bias" in params

    def kernel(
        self, parts1: list[Tensor], parts2: list[Tensor], symmetric: bool, chunk: int | None
    ) -> Tensor:
        if self.route == "gram":
            (c1, d1), (c2, d2) = parts1, parts2
            return gram_kernel(product_gram(c1, c2, self.weight, self.bias), d1, d2, symmetric, chunk)
        return gradient_kernel(parts1[0], parts2[0], symmetric)

    def diagonal(self, parts: list[Tensor], chunk: int | None) -> Tensor:
        if self.route == "gram":
            c, d = parts
            return gram_diagonal(self_product_gram(c, self.weight, self.bias), d, chunk)
        return gradient_diagonal(parts[0])

    def seeded_diagonal(self, call: Call, neurons: Tensor) -> Tensor:
        """:meth:`diagonal` for the layer whose own output holds the neurons (D their one-hot seeds), in
        closed form: neuron (o, t), output unit o at position t, has the gradient u_t ⊗ e_o (and e_o for
        the bias) on this module, u_t its input (patch) at t, so

            K[i,a,i,b] = [o_a = o_b] ([weight] u_{i,t_a} . u_{i,t_b} + [bias]),       shape (n, s, s).

        ``call``: the module's only call; ``neurons``: flat indices into one sample's output."""
        units, inputs = self._seeded_inputs(call, neurons)  # (s,), (n, s, d)
        same_unit = (units[:, None] == units[None, :]).to(inputs.dtype)
        gram = (
            inputs @ inputs.transpose(1, 2)
            if self.weight
            else inputs.new_zeros(*inputs.shape[:2], len(units))
        )
        return (gram + 1.0 if self.bias else gram) * same_unit

    def _seeded_inputs(self, call: Call, neurons: Tensor) -> tuple[Tensor, Tensor]:
        """The output unit of each neuron (s,) and its input at the neuron's position (n, s, d)."""
        raise NotImplementedError


class LinearRule(AffineRule):
    """``nn.Linear`` with or without bias, on inputs (n, d) or (n, ..., d)."""

    kind = "linear"

    def _inputs_and_deltas(self, calls: list[Call]) -> tuple[Tensor, Tensor]:
        """C (n, 1, T, d) and D (n, k, 1, T, m) over all positions of all calls."""
        inputs, deltas = [], []
        for call in calls:
            c, g = call.input(), call.grad()
            n, k = g.shape[:2]
            inputs.append(c.reshape(n, -1, c.shape[-1]))
            deltas.append(g.reshape(n, k, -1, g.shape[-1]))
        return torch.cat(inputs, 1).unsqueeze(1), torch.cat(deltas, 2).unsqueeze(2)

    def _seeded_inputs(self, call: Call, neurons: Tensor) -> tuple[Tensor, Tensor]:
        c = call.input()
        inputs = c.reshape(c.shape[0], -1, c.shape[-1])  # (n, T, d); neuron t * m + o
        neurons = neurons.to(c.device)
        return neurons % self.module.out_features, inputs[:, neurons // self.module.out_features]

    def choose_route(self, calls: list[Call], n: int, k: int, diagonal: bool = False) -> None:
        positions = sum(call.input()[0].numel() // self.module.in_features for call in calls)
        m, d = self.module.out_features, self.module.in_features
        self.costs = affine_costs(n, k, 1, positions, d, m, self.weight, self.bias, diagonal)
        self.route = "gram" if positions == 1 and self.weight else cheapest(self.costs)

    def factors(self, calls: list[Call], k: int) -> list[Tensor]:
        c, d = self._inputs_and_deltas(calls)
        if self.route == "gram":
            return [c, d]
        return [affine_gradients(c, d, self.weight, self.bias)]


def affine_gradients(c: Tensor, d: Tensor, weight: bool, bias: bool) -> Tensor:
    """Per-sample gradients of an affine map: [sum_t D_t ⊗ C_t, sum_t D_t] per group, shape (n, k, F).

    ``c``: (n, G, T, d_g), ``d``: (n, k, G, T, m_g); the weight of group g is (m_g, d_g).
    """
    n, k = d.shape[:2]
    parts = []
    if weight:
        parts.append(torch.einsum("iagtm,igtc->iagmc", d, c).reshape(n, k, -1))
    if bias:
        parts.append(d.sum(dim=3).reshape(n, k, -1))
    return torch.cat(parts, dim=2)


class EmbeddingRule(Rule):
    """``nn.Embedding`` (gram route: index equality times the Gram matrix of the deltas)."""

    kind = "embedding"

    def __init__(self, name: str, module: nn.Module, params: dict[str, nn.Parameter]):
        super().__init__(name, module, params)
        self.route = "gram"

    def choose_route(self, calls: list[Call], n: int, k: int, diagonal: bool = False) -> None:
        positions = sum(call.input()[0].numel() for call in calls)
        m = self.module.embedding_dim
        pairs = n if diagonal else n * n
        self.costs = {"gram": float(pairs * k * k * positions * positions * (m + 1))}

    def factors(self, calls: list[Call], k: int) -> list[Tensor]:
        indices, deltas = [], []
        for call in calls:
            idx, g = call.input(), call.grad()
            n = g.shape[0]
            idx = idx.reshape(n, -1)
            g = g.reshape(n, k, idx.shape[1], -1)
            if self.module.padding_idx is not None:
                g = g * (idx != self.module.padding_idx)[:, None, :, None].to(g.dtype)
            indices.append(idx.to(g.dtype))
            deltas.append(g)
        return [torch.cat(indices, 1), torch.cat(deltas, 2).unsqueeze(2)]

    def kernel(
        self, parts1: list[Tensor], parts2: list[Tensor], symmetric: bool, chunk: int | None
    ) -> Tensor:
        (idx1, d1), (idx2, d2) = parts1, parts2

        def same_index(rows: slice, cols: slice) -> Tensor:
            equal = idx1[rows][:, :, None, None] == idx2[cols][None, None, :, :]
            return equal.to(d1.dtype).unsqueeze(0)

        return gram_kernel(same_index, d1, d2, symmetric, chunk)

    def diagonal(self, parts: list[Tensor], chunk: int | None) -> Tensor:
        idx, d = parts

        def same_index(rows: slice) -> Tensor:
            return (idx[rows][:, :, None] == idx[rows][:, None, :]).to(d.dtype).unsqueeze(1)

        return gram_diagonal(same_index, d, chunk)


def exact_index_limit(dtype: torch.dtype) -> int:
    """Integers up to this size are exact in ``dtype`` (indices travel in the factor rows)."""
    return int(2 / torch.finfo(dtype).eps)
