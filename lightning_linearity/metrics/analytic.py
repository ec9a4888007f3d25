"""Infinite-width kernels of the package's networks: the NNGP Sigma and the NTK Theta (docs/math.md 2.8).

The limit taken: every hidden width m_1..m_L -> infinity with their proportions m_j / m held fixed, at
fixed input dimension d, in the NTK parameterisation of docs/math.md section 1 (weights N(0, 1), each neuron
scaled by 1/sqrt(in-degree)). Then every output's pre-activation is a Gaussian process with covariance
Sigma = Sigma_{L+1}, and the empirical NTK (docs/math.md 2.1) converges to kron(Theta, I_k) with
Theta = Theta_{L+1} (outputs decouple).

Layer 1 reads x only: with an optional bias (a N(0, 1) weight on a constant-1 input, counted in the
fan-in; b = 1 with a bias, 0 without)

    Sigma_1(x, x') = (x . x' + b) / (d + b),        Theta_1 = Sigma_1.

Layer l >= 2 (hidden or output) reads the hidden layers j in S_l (FCN: j = l-1; DenseNet: j = 1..l-1, and
x, whose d columns are a vanishing share of a fan-in that grows with m; a bias is one column of it and
vanishes too) with the fan-in shares rho_lj = m_j / sum_{i in S_l} m_i:

    Sigma_l = sum_j rho_lj E[sigma(u_j) sigma(v_j)],
    Theta_l = Sigma_l + sum_j rho_lj Theta_j E[sigma'(u_j) sigma'(v_j)],
    (u_j, v_j) ~ N(0, [[Sigma_j(x, x), Sigma_j(x, x')], [Sigma_j(x, x'), Sigma_j(x', x')]]).

For the FCN this is docs/math.md 2.8's recursion. A layer whose weight is frozen (``requires_grad=False``)
drops its own term Sigma_l from Theta_l (and a frozen first-layer bias its 1/(d + b) share), since the
empirical NTK sums over the trainable parameters only.

Random-mask DAGs (``MaskedDAGNet`` with ``drop_prob``; 004's experiment): neuron r of layer l reads a random
subset of its DenseNet sources and is scaled by 1/sqrt(deg_l[r]). For l >= 2 the subset keeps the same
fraction 1 - p of every wide source layer, so the shares rho_lj are those of the unmasked DenseNet. Layer
1 is different at fixed d: neuron r reads only the inputs S_r it kept, so its covariance is

    Sigma_1^(r)(x, x') = (x_{S_r} . x'_{S_r} + b) / (|S_r| + b),

which varies from neuron to neuron, and a layer reading h_1 averages the Gaussian expectations over the
neurons, E_r[E[sigma(u_r) sigma(v_r)]] (and likewise E_r[Theta_1^(r) E[sigma' sigma']]) -- not the
expectation at the average covariance x . x' / d. The limit of a random mask is the average over the mask
distribution; here it is taken over the network's own first-layer masks (its m_1 draws from that
distribution, so the average converges to the limit as m_1 grows, at the 1/sqrt(m_1) rate at which the
empirical kernel itself fluctuates). The tests show that wide masked networks converge to this kernel and
not to the unmasked DenseNet's: with d = 4 and p = 1/2 the two differ by about 10 %; with d = 64 (the
digits) by about 1 % (0.65 % in spectral norm for one mask at m_1 = 1024, tanh), less than a width-1024
network's own distance from either. DAGs from an edge list have no
width to send to infinity and are refused.

The Gaussian expectations are in closed form for relu (the arc-cosine kernels), erf and identity, and
by two-dimensional quadrature for tanh, softplus, gelu and sigmoid (:func:`gaussian_moments`).

Cost: O(n n1) Gaussian expectations per hidden layer, each ~3000 activation evaluations by quadrature
(n = 32, three tanh layers: 0.2 s on one CPU thread). A random-mask DAG's first layer needs one per distinct
mask row, up to m_1 times more (d = 64, m_1 = 1024, tanh: 9 s for n = 10, 65 s for n = 32 on one CPU
thread); the kernel depends only on the probes and the architecture, so compute it once per probe set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_linearity._text import short_repr
from lightning_linearity.metrics._functional import check_probes
from lightning_linearity.metrics._layered import source_columns, structured_net, trainable_flags
from lightning_linearity.nets.activations import get_activation
from lightning_linearity.nets.network import LayeredNTKNet

__all__ = ["analytic_nngp", "analytic_ntk", "gaussian_moments"]

MomentMethod = Literal["auto", "closed_form", "quadrature"]
FanIn = Literal["limit", "network"]

_CLOSED_FORMS = ("relu", "erf", "identity")

#: Half-width of the quadrature grid in standard deviations (the Gaussian weight e^{-z^2/2} is 2e-16 there).
_QUADRATURE_RANGE = 8.5
#: Step of the quadrature grid is _QUADRATURE_STEP / max(s, 1) with s the largest standard deviation.
_QUADRATURE_STEP = 0.3
#: Evaluations of sigma per quadrature chunk (bounds the memory: 2**23 float64 = 64 MiB per tensor).
_QUADRATURE_ELEMENTS = 2**23


# ------------------------------------------------------------------------------- Gaussian expectations
def gaussian_moments(
    activation: str,
    var1: Tensor,
    cov: Tensor,
    var2: Tensor,
    *,
    method: MomentMethod = "auto",
    derivative: bool = True,
    step: float | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``(E[sigma(u) sigma(v)], E[sigma'(u) sigma'(v)])`` for (u, v) ~ N(0, [[var1, cov], [cov, var2]]).

    Elementwise over the broadcast shapes of ``var1``, ``cov``, ``var2`` (computed in float64, returned in
    float64). ``method="closed_form"`` exists for relu (arc-cosine kernels, with theta = arccos(rho) and
    rho = cov / sqrt(var1 var2): sqrt(var1 var2) (sin theta + (pi - theta) cos theta) / (2 pi) and
    (pi - theta) / (2 pi)), erf ((2/pi) arcsin(2 cov / sqrt((1 + 2 var1)(1 + 2 var2))) and
    (4/pi) / sqrt((1 + 2 var1)(1 + 2 var2) - 4 cov^2)) and identity (cov and 1).

    ``method="quadrature"`` works for every activation: with u = sqrt(var1) z1 and
    v = sqrt(var2) (rho z1 + sqrt(1 - rho^2) z2), z1, z2 i.i.d. N(0, 1), the expectation is the
    trapezoidal rule on the grid z = k h, |z| <= 8.5, in both variables, with h = 0.3 / max(s, 1) and
    s the largest standard deviation. Gauss-Hermite nodes lose accuracy when s grows (tanh at var = 10:
    6e-5 with 128 nodes), because sigma' is a bump of width ~1/s in z; the trapezoidal rule converges
    geometrically in 1/h for integrands analytic in a strip (tanh's poles lie at u = i pi / 2), and this
    step keeps its absolute error near or below 1e-10 for tanh, softplus, gelu, sigmoid and erf at
    variances from 0.01 to 100 and every correlation (measured against a grid three times finer and the
    erf closed form). Relu's kink makes the value second order in h and the jump of relu' first order.
    ``"auto"`` takes the closed form where one exists.

    Args:
        activation: a name of :mod:`lightning_linearity.nets.activations`.
        var1, cov, var2: the covariance entries (var1, var2 >= 0, cov^2 <= var1 var2 up to rounding).
        method: ``"auto"``, ``"closed_form"`` or ``"quadrature"``.
        derivative: also compute E[sigma'(u) sigma'(v)] (else the second entry is ``None``).
        step: the quadrature step h in z (default as above); a finer one for non-smooth activations.
    """
    act = get_activation(activation)
    if method not in ("auto", "closed_form", "quadrature"):
        raise ValueError(f"method must be 'auto', 'closed_form' or 'quadrature', got {short_repr(method)}")
    if method == "closed_form" and act.name not in _CLOSED_FORMS:
        raise ValueError(
            f"no closed form for activation {act.name!r} (only {list(_CLOSED_FORMS)}); "
            f"use method='quadrature'"
        )
    var1, cov, var2 = torch.broadcast_tensors(*(torch.as_tensor(t).double() for t in (var1, cov, var2)))
    if method == "quadrature" or act.name not in _CLOSED_FORMS:
        return _quadrature_moments(act.name, var1, cov, var2, derivative, step)
    return _closed_form_moments(act.name, var1, cov, var2, derivative)


def _correlation(var1: Tensor, cov: Tensor, var2: Tensor) -> tuple[Tensor, Tensor]:
    """(sqrt(var1 var2), rho) with rho clamped to [-1, 1] (0 where a variance vanishes)."""
    scale = (var1.clamp_min(0.0) * var2.clamp_min(0.0)).sqrt()
    rho = torch.where(scale > 0, cov / torch.where(scale > 0, scale, 1.0), 0.0).clamp(-1.0, 1.0)
    return scale, rho


def _closed_form_moments(
    name: str, var1: Tensor, cov: Tensor, var2: Tensor, derivative: bool
) -> tuple[Tensor, Tensor | None]:
    if name == "identity":
        return cov.clone(), torch.ones_like(cov) if derivative else None
    if name == "erf":
        a, c = 1.0 + 2.0 * var1, 1.0 + 2.0 * var2
        value = (2.0 / math.pi) * torch.asin((2.0 * cov / (a * c).sqrt()).clamp(-1.0, 1.0))
        slope = (4.0 / math.pi) * (a * c - 4.0 * cov * cov).clamp_min(0.0).rsqrt() if derivative else None
        return value, slope
    # relu: the arc-cosine kernels of degree 1 and 0 (a zero variance makes u = 0, where relu' is 0);
    # theta = atan2(sqrt(var1 var2 - cov^2), cov) is arccos(rho) without its ill-conditioning at rho = 1
    scale = (var1.clamp_min(0.0) * var2.clamp_min(0.0)).sqrt()
    theta = torch.atan2((var1 * var2 - cov * cov).clamp_min(0.0).sqrt(), cov)
    value = (torch.sin(theta) * scale + (math.pi - theta) * cov) / (2.0 * math.pi)
    slope = torch.where(scale > 0, (math.pi - theta) / (2.0 * math.pi), 0.0) if derivative else None
    return value, slope


def _quadrature_moments(
    name: str, var1: Tensor, cov: Tensor, var2: Tensor, derivative: bool, step: float | None
) -> tuple[Tensor, Tensor | None]:
    act = get_activation(name)
    shape = var1.shape
    var1, cov, var2 = var1.reshape(-1), cov.reshape(-1), var2.reshape(-1)
    if step is not None and (
        isinstance(step, bool) or not isinstance(step, int | float) or not 0.0 < step <= 1.0
    ):
        raise ValueError(f"step must be a number in (0, 1], got {short_repr(step)}")
    scale1, scale2 = var1.clamp_min(0.0).sqrt(), var2.clamp_min(0.0).sqrt()
    _, rho = _correlation(var1, cov, var2)
    orth = (1.0 - rho * rho).clamp_min(0.0).sqrt()
    # elements in ascending order of their largest standard deviation: each chunk takes the step its
    # largest one needs, so a few wide elements do not refine the grid of all the others
    largest, order = torch.maximum(scale1, scale2).sort()
    value = torch.empty_like(var1)
    slope = torch.empty_like(var1) if derivative else None
    start = 0
    while start < var1.numel():
        chunk = var1.numel() - start
        while True:  # the largest chunk whose own grid fits the element budget
            h = step if step is not None else _QUADRATURE_STEP / max(float(largest[start + chunk - 1]), 1.0)
            points = (2 * math.ceil(_QUADRATURE_RANGE / h) + 1) ** 2
            if chunk * points <= _QUADRATURE_ELEMENTS or chunk == 1:
                break
            chunk = max(1, _QUADRATURE_ELEMENTS // points)
        half = math.ceil(_QUADRATURE_RANGE / h)
        z = torch.arange(-half, half + 1, dtype=torch.float64, device=var1.device) * h
        w = h * torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        part = order[start : start + chunk]
        u = scale1[part, None] * z  # (b, N): sigma(u) is needed at N points only
        v = scale2[part, None, None] * (rho[part, None, None] * z[:, None] + orth[part, None, None] * z)
        # sum over z2 first (a matrix-vector product with the weights), then over z1
        value[part] = ((act.fn(v) @ w) * act.fn(u) * w).sum(dim=-1)
        if derivative:
            slope[part] = ((act.derivative(v) @ w) * act.derivative(u) * w).sum(dim=-1)
        start += chunk
    return value.view(shape), None if slope is None else slope.view(shape)


# ------------------------------------------------------------------------------- the layer recursion
@dataclass(frozen=True)
class _Covariance:
    """A kernel between the probe sets: ``cross`` (n, n1), diagonals ``diag1`` (n,), ``diag2`` (n1,)."""

    cross: Tensor
    diag1: Tensor
    diag2: Tensor

    def scaled(self, factor: float) -> _Covariance:
        return _Covariance(self.cross * factor, self.diag1 * factor, self.diag2 * factor)

    def __add__(self, other: _Covariance) -> _Covariance:
        return _Covariance(self.cross + other.cross, self.diag1 + other.diag1, self.diag2 + other.diag2)


@dataclass(frozen=True)
class _HiddenMoments:
    """What the layers reading hidden layer j need: E[sigma sigma], E[sigma' sigma'] Theta_j."""

    post: _Covariance
    tangent: Tensor  # (n, n1)


def _resolve_net(model: nn.Module, what: str) -> LayeredNTKNet:
    net = structured_net(model, required=False)
    if net is None:
        raise ValueError(
            f"{what} needs one of the package's networks (NTKFCN, NTKDenseNet, a random-mask MaskedDAGNet, "
            f"or their LayeredNTKNet with unmodified forward and only NTKLinear layers); "
            f"{type(model).__name__} is not one, and a foreign model has no infinite-width limit defined here"
        )
    if getattr(net, "layout", None) is not None or net.output_distance is not None:
        raise ValueError(
            f"{what} is undefined for a DAG built from an edge list: its layers have fixed sizes, so there "
            f"is no width to send to infinity; use a random-mask MaskedDAGNet (drop_prob) or NTKDenseNet"
        )
    return net


def _check_inputs(net: LayeredNTKNet, x: Tensor, x2: Tensor | None) -> None:
    check_probes(x, x2)
    for name, probes in (("x", x), ("x2", x2)):
        if probes is not None and (probes.dim() != 2 or probes.shape[1] != net.in_features):
            raise ValueError(
                f"{name} has shape {tuple(probes.shape)}, but the network expects (n, in_features="
                f"{net.in_features}); flatten the inputs or match in_features"
            )
        if probes is not None and not torch.isfinite(probes).all():
            raise ValueError(f"{name} holds NaN or inf; the kernels need finite probe inputs")


def _first_layer(net: LayeredNTKNet, x: Tensor, x2: Tensor) -> tuple[_Covariance, Tensor, Tensor]:
    """Layer 1's neuron types: Sigma_1 and the own NTK Theta_1 of each type (leading dimension U), and
    each type's share of the neurons (U,).

    One type without a mask; with one, one type per distinct mask row (the network's own rows, counted).
    """
    layer = net.layers[0]
    weight_trainable, bias_trainable = trainable_flags(layer)
    bias = 1.0 if layer.bias is not None else 0.0
    if layer.mask is None:
        rows = torch.ones(1, net.in_features, dtype=torch.float64, device=x.device)
        shares = torch.ones(1, dtype=torch.float64, device=x.device)
    else:
        rows, count = torch.unique(
            layer.mask.to(device=x.device, dtype=torch.float64), dim=0, return_counts=True
        )
        shares = count.double() / count.sum()
    degree = rows.sum(dim=1) + bias  # (U,)
    gram = torch.einsum("is,us,js->uij", x, rows, x2)
    d1, d2 = (x * x) @ rows.T, (x2 * x2) @ rows.T  # (n, U), (n1, U)
    sigma = _Covariance(
        (gram + bias) / degree[:, None, None], ((d1 + bias) / degree).T, ((d2 + bias) / degree).T
    )
    theta = (gram * float(weight_trainable) + float(bias_trainable)) / degree[:, None, None]
    return sigma, theta, shares


def _hidden_moments(
    activation: str, sigma: _Covariance, theta: Tensor, shares: Tensor, need_tangent: bool, symmetric: bool
) -> _HiddenMoments:
    """Mean over neuron types (leading dimension, weights ``shares``) of E[sigma(u) sigma(v)] and of
    Theta E[sigma'(u) sigma'(v)]. ``symmetric``: x2 is x, so only the pairs i <= j are integrated."""
    n, n1 = sigma.cross.shape[-2:]
    rows, cols = torch.triu_indices(n, n1, device=sigma.cross.device) if symmetric else (slice(None),) * 2
    var1 = sigma.diag1[:, :, None].expand(-1, -1, n1)[:, rows, cols]
    var2 = sigma.diag2[:, None, :].expand(-1, n, -1)[:, rows, cols]
    cross, slope = gaussian_moments(
        activation, var1, sigma.cross[:, rows, cols], var2, derivative=need_tangent
    )
    d1, _ = gaussian_moments(activation, sigma.diag1, sigma.diag1, sigma.diag1, derivative=False)
    d2 = (
        d1
        if symmetric
        else gaussian_moments(activation, sigma.diag2, sigma.diag2, sigma.diag2, derivative=False)[0]
    )

    def mean_over_types(values: Tensor) -> Tensor:
        mean = torch.tensordot(shares, values, dims=1)
        if not symmetric:
            return mean
        full = mean.new_zeros(n, n1)
        full[rows, cols] = mean
        full[cols, rows] = mean
        return full

    post = _Covariance(
        mean_over_types(cross), torch.tensordot(shares, d1, dims=1), torch.tensordot(shares, d2, dims=1)
    )
    if not need_tangent:
        return _HiddenMoments(post, torch.zeros_like(post.cross))
    return _HiddenMoments(post, mean_over_types(theta[:, rows, cols] * slope))


def limit_kernels(
    net: LayeredNTKNet, x: Tensor, x2: Tensor | None, need_ntk: bool, fan_in: FanIn = "limit"
) -> tuple[Tensor, Tensor]:
    """(Sigma, Theta) of the output layer in float64 (Theta is zeros when ``need_ntk`` is False)."""
    if fan_in not in ("limit", "network"):
        raise ValueError(f"fan_in must be 'limit' or 'network', got {short_repr(fan_in)}")
    symmetric = x2 is None
    x = x.detach().to(torch.float64)
    x2 = x.clone() if x2 is None else x2.detach().to(device=x.device, dtype=torch.float64)
    inputs = _Covariance(x @ x2.T, (x * x).sum(dim=1), (x2 * x2).sum(dim=1))
    name = net.activation.name
    hidden: list[_HiddenMoments] = []
    for l, layer in enumerate(net.layers, start=1):
        if l == 1:  # a hidden layer: the output layer is L+1 >= 2
            types = _first_layer(net, x, x2)
        else:
            sources = [j for j, _ in source_columns(net, l)]
            weight_trainable, bias_trainable = trainable_flags(layer)
            sizes = {j: net.hidden_widths[j - 1] for j in sources if j >= 1}
            bias = 1.0 if layer.bias is not None and fan_in == "network" else 0.0
            extra = float(net.in_features if 0 in sources else 0) + bias if fan_in == "network" else 0.0
            total = sum(sizes.values()) + extra
            sigma, tangent = None, 0.0
            for j, size in sizes.items():
                part = hidden[j - 1].post.scaled(size / total)
                sigma = part if sigma is None else sigma + part
                tangent = tangent + size / total * hidden[j - 1].tangent
            theta = sigma.cross if weight_trainable else 0.0
            if extra:  # the input columns (DenseNet) and the bias column, each a share 1/total
                own = inputs if 0 in sources else inputs.scaled(0.0)
                sigma = sigma + _Covariance(own.cross + bias, own.diag1 + bias, own.diag2 + bias).scaled(
                    1 / total
                )
                theta = (
                    theta
                    + ((own.cross if weight_trainable else 0.0) + (bias if bias_trainable else 0.0)) / total
                )
            theta = theta + tangent
            one = torch.ones(1, dtype=torch.float64, device=x.device)
            types = (
                _Covariance(sigma.cross[None], sigma.diag1[None], sigma.diag2[None]),
                theta * one[:, None, None],
                one,
            )
        if l <= net.depth:
            hidden.append(_hidden_moments(name, *types, need_ntk, symmetric))
    return sigma.cross, theta if need_ntk else torch.zeros_like(sigma.cross)


def _output_kernel(
    model: nn.Module, x: Tensor, x2: Tensor | None, what: str, ntk: bool, fan_in: FanIn
) -> Tensor:
    net = _resolve_net(model, what)
    _check_inputs(net, x, x2)
    nngp, theta = limit_kernels(net, x, x2, need_ntk=ntk, fan_in=fan_in)
    kernel = theta if ntk else nngp
    if x2 is None:
        kernel = 0.5 * (kernel + kernel.T)  # exact symmetry (quadrature rounds the two triangles apart)
    parameter = net.layers[0].weight
    return kernel.to(device=parameter.device, dtype=parameter.dtype)


def analytic_ntk(model: nn.Module, x: Tensor, x2: Tensor | None = None, *, fan_in: FanIn = "limit") -> Tensor:
    """The infinite-width NTK Theta(x_i, x2_j) of the package's network ``model`` (docs/math.md 2.8).

    The limit and the recursion are in the module docstring: hidden widths -> infinity in fixed
    proportions at fixed input dimension d; ``empirical_ntk(model, x)`` converges to kron(Theta, I_k)
    (index i*k + a, every output the same kernel, outputs uncorrelated). Frozen layers are left out as
    the empirical NTK leaves them out.

    Args:
        model: an ``NTKFCN``, ``NTKDenseNet``, a random-mask ``MaskedDAGNet`` or their ``LayeredNTKNet``.
        x: probe inputs (n, d).
        x2: optional second probe set (n1, d); default ``x``.
        fan_in: ``"limit"`` (default): the limit of the module docstring, in which a DenseNet's input
            columns and every bias past layer 1 are a vanishing share of the fan-in. ``"network"``: layers
            l >= 2 weight each source by its actual share of the network's fan-in, the input columns
            (x . x' / N_l) and a bias (1 / N_l) included -- the limit in which d grows with m in the
            network's proportions, closer to a DenseNet whose width is not large against d.

    Returns:
        Theta of shape (n, n1) in the dtype and on the device of the model's parameters; symmetric positive
        semi-definite when ``x2`` is None.

    Raises:
        ValueError: a foreign model, a DAG built from an edge list, inputs not of shape (n, d), or an unknown
            ``fan_in``.
    """
    return _output_kernel(model, x, x2, "analytic_ntk", ntk=True, fan_in=fan_in)


def analytic_nngp(
    model: nn.Module, x: Tensor, x2: Tensor | None = None, *, fan_in: FanIn = "limit"
) -> Tensor:
    """The infinite-width NNGP kernel Sigma(x_i, x2_j) = lim E[f_a(x_i) f_a(x2_j)] at initialisation.

    The output covariance of the network over its random initial weights, in the limit of
    :func:`analytic_ntk` (docs/math.md 2.8): Sigma = Sigma_{L+1} of the recursion in the module docstring,
    the same for every output a, outputs independent. Arguments, shape and errors as for :func:`analytic_ntk`.
    """
    return _output_kernel(model, x, x2, "analytic_nngp", ntk=False, fan_in=fan_in)
