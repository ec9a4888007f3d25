"""Hessian-vector products of layered networks in closed form, on a small subspace.

A layered network (docs/math.md section 1) computes z_l = s_l∘(W̃_l c_l + b_l), h_l = sigma_l(z_l), where c_l
concatenates the h_j (and x) that layer l reads. The package's networks have s_l = deg_l^(-1/2), masked
weights W̃_l = M_l ⊙ W_l and one sigma; a user's chain of ``nn.Linear`` layers and elementwise activations
(:mod:`~lightning_linearity.metrics._chain`) has s_l = 1, no mask, c_l = h_{l-1} and its own sigma_l per
layer. :class:`LayerForm` and :class:`LayeredPass` are what the products read from either.

For one probe point x and one function F = seed . z_top(w; x) (an output f_a with top = L+1 and seed e_a,
or a hidden pre-activation z_l[r] with top = l and seed e_r), the gradient with respect to layer l's weights
is a masked rank-one matrix (docs/math.md section 1 and 2.4),

    dF/dW_l = M_l ⊙ (s_l∘delta_l) c_l^T,   dF/db_l = s_l∘delta_l,   delta_l = dF/dz_l,

so the Hessian-vector product along a tangent V is, with the tangents ċ_l and δ̇_l of c_l and delta_l,

    (H V)_l = M_l ⊙ (s_l∘δ̇_l c_l^T + s_l∘delta_l ċ_l^T),   bias part s_l∘δ̇_l.

Every H V therefore lies in the image of

    E(u, y) = ( M_l ⊙ (s_l∘u_l c_l^T + q_l y_l^T),  bias s_l∘u_l )_{l <= top},   q_l = s_l∘delta_l,

with u_l in R^{m_l} and y_l in R^{n_l}: R = sum_l (m_l + n_l) coordinates (about 2 L m) instead of
P (about L m^2) parameters, and so does every eigenvector of H with a non-zero eigenvalue. Lanczos runs on
these coordinates: the operator is (u, y) -> (δ̇, ċ) for V = E(u, y), and the inner product is that of
parameter space, <E a, E b> = a . G b, with p_l = s_l∘u_l and

    G(u, y) = ( s_l∘X_l , Y_l )_l,    X_l = p_l∘(M_l c_l^2 [+ 1 with a bias]) + q_l∘M_l (c_l∘y_l),
                                      Y_l = c_l∘M_l^T (p_l∘q_l) + y_l∘M_l^T q_l^2.

X_l and Y_l are also what V feeds into the two passes ((M⊙V_l) c_l + V_b,l = X_l and (M⊙V_l)^T q_l = Y_l):

    forward,  l < top:   ż_l = s_l∘(X_l + W̃_l ċ_l),   ḣ_l = sigma_l'(z_l)∘ż_l,   ċ_l from the ḣ it reads
    backward, l <= top:  δ̇_top = 0,   δ̇_l = sigma_l''(z_l)∘ż_l∘g_l + sigma_l'(z_l)∘ġ_l,
                         ġ_j += (Y_l + W̃_l^T (s_l∘δ̇_l))[columns of h_j in c_l]

where W̃_l = M_l ⊙ W_l and g_j = dF/dh_j. A step costs two products with each weight matrix (plus two with
each mask) for all (probe, output) pairs at once, and the Krylov vectors have R entries, not P: no
parameter-sized vector is ever formed. Without a mask the mask products are sums (M c^2 = ||c||^2, ...).

Frozen parameters are not part of w: H is the Hessian with respect to the trainable ones, and E keeps only
their parts. A frozen weight W_l drops the term M_l ⊙ (...) of E (c_l and q_l are taken as 0 in the
formulas above, so X_l and Y_l hold the bias alone), a frozen bias the bias part s_l∘u_l (no +1 in G). The
tangents still pass through the frozen layer (ż_l = s_l∘(X_l + W̃_l ċ_l), δ̇_l as above); coordinates
that E maps to 0 span the null space of G, which Lanczos never sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_linearity.metrics._layered import (
    backpropagate_with_posts,
    source_columns,
    trace_net,
    trainable_flags,
)
from lightning_linearity.nets.network import LayeredNTKNet


@dataclass(frozen=True)
class LayerForm:
    """Layer l of a layered network as the products read it: z_l = s_l∘(W̃_l c_l + b_l)."""

    weight: Tensor  # W̃_l = M_l ⊙ W_l, (m, n)
    scale: Tensor | float  # s_l, (m,), or 1.0
    mask: Tensor | None  # M_l, (m, n); None when fully connected
    bias: bool  # whether the layer has a trainable bias b_l
    sources: list[tuple[int, slice]]  # (j, columns of c_l holding h_j), j >= 1
    trainable_weight: bool = True  # whether W_l is part of w (frozen: the tangent directions leave it out)


@dataclass(frozen=True)
class LayeredPass:
    """One forward and one backward pass of the functions F_a = seed[a] . z_top on the probes x_i.

    ``inputs[l-1]`` is c_l (n, n_l) for l = 1..top; ``deltas[l-1]`` is dF_a/dz_l (n, q, m_l); for the hidden
    layers l < top, ``posts[l-1]`` is dF_a/dh_l (n, q, m_l) and ``slopes`` / ``curvatures`` are sigma_l'(z_l)
    and sigma_l''(z_l) (n, m_l).
    """

    inputs: list[Tensor]
    deltas: list[Tensor]
    posts: list[Tensor]
    slopes: list[Tensor]
    curvatures: list[Tensor]


def coordinate_count(forms: Sequence[LayerForm]) -> int:
    """R = sum_l (m_l + n_l): the coordinates (u_l, y_l) of the subspace the products live in."""
    return sum(sum(form.weight.shape) for form in forms)


def net_forms(net: LayeredNTKNet, top: int) -> list[LayerForm]:
    """Layers 1..``top`` of the package's network: s_l = deg_l^(-1/2), its masks and connectivity, and which
    of its weights and biases are trainable."""
    return [
        LayerForm(
            layer.effective_weight(),
            layer.in_degree.rsqrt(),
            layer.mask,
            trainable_flags(layer)[1],
            [(j, cols) for j, cols in source_columns(net, l) if j >= 1],
            trainable_flags(layer)[0],
        )
        for l, layer in enumerate(net.layers[:top], start=1)
    ]


def net_pass(net: LayeredNTKNet, x: Tensor, top: int, seed: Tensor) -> LayeredPass:
    """The :class:`LayeredPass` of the package's network (its trace and closed-form backpropagation)."""
    trace = trace_net(net, x)
    deltas, posts = backpropagate_with_posts(net, trace, top, seed)
    with torch.no_grad():
        z = trace.preactivations[: top - 1]
        slopes = [net.activation.derivative(t) for t in z]
        curvatures = [net.activation.second_derivative(t) for t in z]
    return LayeredPass(trace.inputs[:top], deltas, posts, slopes, curvatures)


@dataclass(frozen=True)
class _Layer:
    """Constants of layer l; ``rows`` holds those of the batch elements (probe, function), one row each."""

    weight: Tensor  # W̃_l = M_l ⊙ W_l, (m, n)
    scale: Tensor | float  # s_l, (m,) or 1.0
    mask: Tensor | None  # M_l, (m, n); None when fully connected
    sources: list[tuple[int, slice]]  # (j, columns of c_l holding h_j), j >= 1
    bias: bool  # whether b_l is trainable
    rows: _Rows


@dataclass(frozen=True)
class _Rows:
    """Per-element constants of one layer (rows = batch elements)."""

    c: Tensor  # c_l, (B, n); 0 when W_l is frozen (V_l's weight part is then 0)
    q: Tensor  # s_l∘delta_l, (B, m); 0 when W_l is frozen
    c_energy: Tensor  # M_l c_l^2 (+1 with a bias), (B, m) or (B, 1) without a mask
    q_energy: Tensor  # M_l^T q_l^2, (B, n) or (B, 1) without a mask
    slope: Tensor | None  # sigma'(z_l) for l < top, (B, m)
    curvature: Tensor | None  # sigma''(z_l) for l < top, (B, m)
    post: Tensor | None  # g_l = dF/dh_l for l < top, (B, m)

    def select(self, active: Tensor) -> _Rows:
        return _Rows(*(None if t is None else t[active] for t in vars(self).values()))


class StructuredHessian:
    """The Hessians d^2 F_b / dw^2 of the batch elements b = (probe i, function a) as Lanczos operators.

    Element b = i * q + a is the Hessian of ``seed[a] . z_top(w; x_i)``, for the layers ``forms`` (1..top)
    and the ``passed`` forward/backward pass of those functions. :meth:`matvec` and :meth:`gram` are
    batched operators in the sense of :mod:`~lightning_linearity.metrics._linalg` on the ``dim`` coordinates
    described in the module docstring; pass both to :func:`~lightning_linearity.metrics._linalg.lanczos`.
    """

    def __init__(self, forms: Sequence[LayerForm], passed: LayeredPass):
        top = len(forms)
        repeat = passed.deltas[0].shape[1]
        self.top, self.layers = top, []
        with torch.no_grad():
            for l, form in enumerate(forms, start=1):
                delta = passed.deltas[l - 1].flatten(0, 1)
                c, q = passed.inputs[l - 1].repeat_interleave(repeat, dim=0), delta * form.scale
                if not form.trainable_weight:  # E(u, y) keeps the bias part s∘u alone
                    c, q = torch.zeros_like(c), torch.zeros_like(q)
                mask = None if form.mask is None else form.mask.to(c.dtype)
                bias = 1.0 if form.bias else 0.0
                if mask is None:
                    c_energy = (c * c).sum(dim=1, keepdim=True) + bias
                    q_energy = (q * q).sum(dim=1, keepdim=True)
                else:
                    c_energy = (c * c) @ mask.T + bias
                    q_energy = (q * q) @ mask
                slope = curvature = post = None
                if l < top:
                    slope = passed.slopes[l - 1].repeat_interleave(repeat, dim=0)
                    curvature = passed.curvatures[l - 1].repeat_interleave(repeat, dim=0)
                    post = passed.posts[l - 1].flatten(0, 1)
                rows = _Rows(c, q, c_energy, q_energy, slope, curvature, post)
                self.layers.append(_Layer(form.weight, form.scale, mask, form.sources, form.bias, rows))
        self.sizes = [size for form in forms for size in form.weight.shape]
        self.dim = coordinate_count(forms)
        self.batch = passed.deltas[0].shape[0] * repeat
        self._selected: tuple[Tensor, list[_Rows]] | None = None

    def _rows(self, active: Tensor) -> list[_Rows]:
        """Each layer's rows of the ``active`` elements (cached: Lanczos passes one tensor per active set)."""
        if active.numel() == self.batch:
            return [layer.rows for layer in self.layers]
        if self._selected is None or self._selected[0] is not active:
            self._selected = (active, [layer.rows.select(active) for layer in self.layers])
        return self._selected[1]

    # ------------------------------------------------------------------------------ the two operators
    def _split(self, v: Tensor) -> list[tuple[Tensor, Tensor]]:
        parts = v.split(self.sizes, dim=1)
        return list(zip(parts[0::2], parts[1::2], strict=True))

    @staticmethod
    def _xy(layer: _Layer, rows: _Rows, u: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """X_l and Y_l of the module docstring for the coordinates (u_l, y_l)."""
        c, q = rows.c, rows.q
        p = u * layer.scale
        if layer.mask is None:
            x_part = p * rows.c_energy + q * (c * y).sum(dim=1, keepdim=True)
            y_part = c * (p * q).sum(dim=1, keepdim=True) + y * rows.q_energy
        else:
            x_part = p * rows.c_energy + q * ((c * y) @ layer.mask.T)
            y_part = c * ((p * q) @ layer.mask) + y * rows.q_energy
        return x_part, y_part

    def gram(self, v: Tensor, active: Tensor) -> Tensor:
        """G v: <E a, E v> = a . G v, the parameter-space inner product in coordinates."""
        out = []
        with torch.no_grad():
            for layer, rows, (u, y) in zip(self.layers, self._rows(active), self._split(v), strict=True):
                x_part, y_part = self._xy(layer, rows, u, y)
                out += [layer.scale * x_part, y_part]
        return torch.cat(out, dim=1)

    def matvec(self, v: Tensor, active: Tensor) -> Tensor:
        """The coordinates (δ̇_l, ċ_l)_l of H E(v): one forward and one backward tangent pass."""
        rows = self._rows(active)
        with torch.no_grad():
            parts = [
                self._xy(layer, r, u, y)
                for layer, r, (u, y) in zip(self.layers, rows, self._split(v), strict=True)
            ]
            c_dots, z_dots, h_dots = [], [], []
            for l, (layer, (x_part, _)) in enumerate(zip(self.layers, parts, strict=True), start=1):
                c_dot = v.new_zeros(v.shape[0], layer.weight.shape[1])
                for j, cols in layer.sources:
                    c_dot[:, cols] = h_dots[j - 1]
                c_dots.append(c_dot)
                if l < self.top:
                    z_dot = x_part if not layer.sources else x_part + c_dot @ layer.weight.T
                    z_dots.append(layer.scale * z_dot)
                    h_dots.append(rows[l - 1].slope * z_dots[-1])
            post_dots = [torch.zeros_like(h) for h in h_dots]
            delta_dots: list[Tensor] = []
            for l in range(self.top, 0, -1):
                layer, r, (_, y_part) = self.layers[l - 1], rows[l - 1], parts[l - 1]
                if l == self.top:  # the seed is constant
                    delta_dot = v.new_zeros(v.shape[0], layer.weight.shape[0])
                else:
                    delta_dot = r.curvature * z_dots[l - 1] * r.post + r.slope * post_dots[l - 1]
                delta_dots.append(delta_dot)
                if layer.sources:
                    pulled = y_part if l == self.top else y_part + (layer.scale * delta_dot) @ layer.weight
                    for j, cols in layer.sources:
                        post_dots[j - 1] += pulled[:, cols]
            delta_dots.reverse()
        return torch.cat([t for pair in zip(delta_dots, c_dots, strict=True) for t in pair], dim=1)

    def energies(self, v: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Squared norms of the parameter-space vector V = E(v) (all batch elements), per layer l:
        ``(rows, columns)`` with rows[b, r] = ||V_l[r, :]||^2 + V_{b,l}[r]^2 (the row's weights and its bias)
        and columns[b, s] = ||V_l[:, s]||^2 (the weights reading c_l[s]). With p = s_l∘u_l and q_l, and
        V_l = M_l ⊙ (p c_l^T + q_l y_l^T):

            rows    = p^2 ∘ (M c^2 [+ 1]) + 2 p∘q ∘ M (c∘y) + q^2 ∘ M y^2,
            columns = c^2 ∘ M^T p^2 + 2 c∘y ∘ M^T (p∘q) + y^2 ∘ M^T q^2.

        No parameter-sized tensor is formed.
        """
        out = []
        with torch.no_grad():
            for layer, (u, y) in zip(self.layers, self._split(v), strict=True):
                r = layer.rows
                p, q, c = u * layer.scale, r.q, r.c
                if layer.mask is None:
                    rows = p * p * r.c_energy + 2 * p * q * (c * y).sum(1, keepdim=True)
                    rows = rows + q * q * (y * y).sum(1, keepdim=True)
                    cols = c * c * (p * p).sum(1, keepdim=True) + 2 * c * y * (p * q).sum(1, keepdim=True)
                    cols = cols + y * y * r.q_energy
                else:
                    mask = layer.mask
                    rows = p * p * r.c_energy + 2 * p * q * ((c * y) @ mask.T) + q * q * ((y * y) @ mask.T)
                    cols = c * c * ((p * p) @ mask) + 2 * c * y * ((p * q) @ mask) + y * y * r.q_energy
                out.append((rows, cols))
        return out

    def tangents(self, v: Tensor) -> list[tuple[Tensor, Tensor]]:
        """The parameter-space vectors V = E(v) of all batch elements, per layer l: the weight part
        M_l ⊙ (p c_l^T + q_l y_l^T), shape (B, m, n), and the bias part p, (B, m), with p = s_l∘u_l.

        Forms P numbers per batch element: for checks against autograd, not for the products.
        """
        out = []
        with torch.no_grad():
            for layer, (u, y) in zip(self.layers, self._split(v), strict=True):
                p, r = u * layer.scale, layer.rows
                weight = p.unsqueeze(2) * r.c.unsqueeze(1) + r.q.unsqueeze(2) * y.unsqueeze(1)
                weight = weight if layer.mask is None else weight * layer.mask
                out.append((weight, p if layer.bias else torch.zeros_like(p)))
        return out
