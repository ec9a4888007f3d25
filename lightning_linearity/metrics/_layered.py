"""The package's layered networks seen by the structured metric paths (docs/math.md section 3).

:func:`structured_net` decides whether a model qualifies, :func:`trace_net` runs its forward pass without
autograd, :func:`source_columns` says which columns of c_l hold which h_j, and :func:`backpropagate` gives
the deltas d(seed . z_top)/dz_l in closed form (plain matmuls with the effective weights, sigma' from
:mod:`lightning_linearity.nets.activations`). The NTK, the neuron-gradient cosines and the Hessian norm
build on them.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from lightning_linearity._text import short_repr
from lightning_linearity.metrics._functional import as_layered_net, check_output, evaluation_error
from lightning_linearity.nets.dag import dense_source_sizes
from lightning_linearity.nets.layers import NTKLinear
from lightning_linearity.nets.network import LayeredNTKNet, NetworkTrace

Method = Literal["auto", "structured", "generic"]
EngineMethod = Literal["auto", "structured", "engine", "generic"]  # metrics with a per-module engine route
METHODS: tuple[str, ...] = ("auto", "structured", "generic")
ENGINE_METHODS: tuple[str, ...] = ("auto", "structured", "engine", "generic")

_STRUCTURED_SUBMODULES = (nn.ModuleList, NTKLinear)


def check_method(method: str, allowed: tuple[str, ...] = METHODS) -> None:
    """Raise ``ValueError`` unless ``method`` is one of ``allowed`` (:data:`METHODS`, or
    :data:`ENGINE_METHODS` for the metrics with an engine route: the NTK and the neuron cosines)."""
    if not isinstance(method, str) or method not in allowed:
        names = ", ".join(repr(name) for name in allowed[:-1]) + f" or {allowed[-1]!r}"
        raise ValueError(f"method must be {names}, got {short_repr(method)}")


def structured_net(model: nn.Module, *, required: bool) -> LayeredNTKNet | None:
    """The :class:`LayeredNTKNet` behind ``model`` if the structured formulas apply to it, else ``None``.

    With ``required=True`` the reason is raised as ``ValueError`` instead of returning ``None``: the model
    is not one of the package's networks, its class overrides ``forward``/``trace``, or it contains a module
    other than :class:`NTKLinear` layers (BatchNorm, dropout, a custom layer: the factorisation assumes
    NTK-linear layers acting on every probe independently).
    """
    net = as_layered_net(model)
    if net is None:
        reason = (
            f"{type(model).__name__} is not one of the package's networks (a LayeredNTKNet, or a module "
            f"exposing one as `layered_net`)"
        )
    elif type(net).forward is not LayeredNTKNet.forward or type(net).trace is not LayeredNTKNet.trace:
        reason = f"{type(net).__name__} overrides forward/trace of LayeredNTKNet"
    else:
        foreign = [
            f"{name} ({type(module).__name__})"
            for name, module in net.named_modules()
            if module is not net and type(module) not in _STRUCTURED_SUBMODULES
        ]
        reason = (
            f"the network contains modules other than NTKLinear layers: {', '.join(foreign)}; the per-layer "
            f"factorisation needs NTK-linear layers acting on each probe independently (no BatchNorm)"
            if foreign
            else None
        )
    if reason is None:
        return net
    if required:
        raise ValueError(f"method='structured' cannot handle this model: {reason}. Use method='generic'.")
    return None


def trace_net(net: LayeredNTKNet, x: Tensor) -> NetworkTrace:
    """``net.trace(x)`` without autograd; a bad input shape or dtype raises ValueError, NaN/inf an error."""
    try:
        with torch.no_grad():
            trace = net.trace(x)
    except (RuntimeError, ValueError) as err:
        raise evaluation_error(net, x, err) from err
    check_output(net, x, trace.output)
    return trace


def source_columns(net: LayeredNTKNet, layer: int) -> list[tuple[int, slice]]:
    """What layer ``layer`` (1-based) reads: ``(j, columns of c_l)`` per source h_j, with j = 0 for x."""
    if net.connectivity == "chain":
        return [(layer - 1, slice(0, net.layers[layer - 1].in_features))]
    sizes = dense_source_sizes(net.in_features, net.hidden_widths, layer)  # h_{l-1}, ..., h_1, x
    columns, start = [], 0
    for j, size in zip(range(layer - 1, -1, -1), sizes, strict=True):
        columns.append((j, slice(start, start + size)))
        start += size
    return columns


def backpropagate(net: LayeredNTKNet, trace: NetworkTrace, top: int, seed: Tensor) -> list[Tensor]:
    """Deltas of the q functions ``seed @ z_top`` with respect to the pre-activations of layers 1..top.

    ``seed`` has shape (q, m_top); returns D_1..D_top with D_l[i, p, r] = d (seed[p] . z_top(x_i)) / d z_l[r],
    shape (n, q, m_l), by the chain rule through the effective weights A_l = M_l ⊙ W_l / sqrt(deg_l):

        dF/dh_j = sum_{l reads h_j} D_l A_l[:, cols(j)],        D_j = dF/dh_j ⊙ sigma'(z_j).

    ``top = L+1`` with the identity seed gives d f_a / d z_l for the NTK; ``top = l`` with rows of the
    identity gives the neuron Jacobians J_{l,k} = d z_l / d z_k of the cosine Gram (docs/math.md section 3).
    """
    return _backpropagate(net, trace, top, seed, keep_posts=False)[0]


def backpropagate_with_posts(
    net: LayeredNTKNet, trace: NetworkTrace, top: int, seed: Tensor
) -> tuple[list[Tensor], list[Tensor]]:
    """:func:`backpropagate`'s deltas D_1..D_top and the gradients G_j = dF/dh_j of the post-activations of
    the hidden layers j = 1..top-1 it passes through (shape (n, q, m_j)), which the recursion forms anyway."""
    return _backpropagate(net, trace, top, seed, keep_posts=True)


def _backpropagate(
    net: LayeredNTKNet, trace: NetworkTrace, top: int, seed: Tensor, keep_posts: bool
) -> tuple[list[Tensor], list[Tensor]]:
    n = trace.inputs[0].shape[0]
    deltas: dict[int, Tensor] = {top: seed.expand(n, *seed.shape)}
    grad_post: dict[int, Tensor] = {}
    posts: list[Tensor] = []
    with torch.no_grad():
        for l in range(top, 0, -1):
            if l < top:
                z = trace.preactivations[l - 1]
                post = grad_post.pop(l)
                deltas[l] = post * net.activation.derivative(z).unsqueeze(1)
                if keep_posts:
                    posts.append(post)
            layer = net.layers[l - 1]
            scaled = layer.effective_weight() * layer.in_degree.rsqrt().to(seed.dtype).unsqueeze(1)
            for j, cols in source_columns(net, l):
                if j == 0:
                    continue
                contribution = deltas[l] @ scaled[:, cols]
                grad_post[j] = grad_post[j] + contribution if j in grad_post else contribution
    return [deltas[l] for l in range(1, top + 1)], posts[::-1]


def trainable_flags(layer: NTKLinear) -> tuple[bool, bool]:
    """Whether the layer's weight and its bias count as parameters w (``requires_grad``)."""
    return layer.weight.requires_grad, layer.bias is not None and layer.bias.requires_grad
