"""Cosines between the parameter gradients of the neurons of one layer (docs/math.md 2.5; 000 Thm 3, Eq. 22).

For hidden layer l and probe x, g_r = d z_l[r](w; x) / dw over all trainable parameters and

    cos_rs = <g_r, g_s> / (||g_r|| ||g_s||),     metric = mean over probes and pairs r != s of |cos_rs|.

Everything follows from the neuron-gradient Gram matrix G_l[r,s] = <g_r, g_s> of each probe.

Structured path (the package's :class:`LayeredNTKNet`), no per-neuron backward pass. A parameter of layer
k <= l reaches z_l only through z_k, and W_k[q,t] only through z_k[q], with
d z_k[q] / d W_k[q,t] = M_k[q,t] c_k[t] / sqrt(deg_k[q]) (and 1 / sqrt(deg_k[q]) for the bias b_k[q]). With
J_{l,k} = d z_l / d z_k (J_{l,l} = I) the chain rule gives

    <g_r, g_s> = sum_{k<=l} sum_q J_{l,k}[r,q] J_{l,k}[s,q] * g_k[q],
    g_k[q]     = ( sum_t M_k[q,t] c_k[t]^2  [+ 1 with a bias] ) / deg_k[q],

i.e. G_l = sum_{k<=l} J_{l,k} diag(g_k) J_{l,k}^T. For an FCN (no mask, deg_k = fan_k, no bias) g_k is the
constant ||c_k||^2 / fan_k and this is the formula of docs/math.md section 3; the mask and the per-neuron
in-degrees of DenseNets and DAGs only change g_k. The rows of J_{l,k} for the (sampled) neurons come from
one batched backward recursion (see :func:`~lightning_linearity.metrics._layered.backpropagate`), so the cost
is that of backpropagating ``num_neurons`` vectors through layers l..1, for all probes at once.

Engine path (any other model made of standard layers, the layer named by its submodule whose output is the
pre-activation; docs/math.md 2.7 and 3): the per-module rules of :mod:`lightning_linearity.metrics.engine`
with the sampled neurons in place of the outputs of f. One forward pass records each module's inputs, one
backward pass seeded at the layer's output with the one-hot vectors of the sampled neurons gives
D_m[i,r] = d z_l[r](x_i) / d y_m for every module m before the layer, and

    G_l[i,r,s] = sum_m < d z_l[r](x_i)/d theta_m , d z_l[s](x_i)/d theta_m >,

each module's term its rule's contraction of its inputs and D (for a Linear, (C C^T + 1) ⊙ (D D^T) per
probe), the layer's own parameters included (its D is the one-hot seed). Models the engine refuses
(:class:`~lightning_linearity.metrics.engine.UnsupportedModel`) take the generic path under ``"auto"``.

Generic path (any ``nn.Module``): per-probe Jacobians of the sampled neurons, ``vmap(jacrev)``, contracted
to G per probe; the reference for the other two.

Remark 4 of 000: neurons of the first hidden layer depend on private parameters only (row r of W_1), so
their gradients are exactly orthogonal and the metric is 0 for layer 1 at any width.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import jacrev, vmap

from lightning_linearity._text import short_repr
from lightning_linearity.metrics._functional import (
    Params,
    as_layered_net,
    check_chunk_size,
    check_finite,
    check_probes,
    evaluate,
    layer_output_model,
    num_parameters,
    resolve_layer,
    trainable_parameters,
)
from lightning_linearity.metrics._layered import (
    ENGINE_METHODS,
    EngineMethod,
    backpropagate,
    check_method,
    structured_net,
    trace_net,
    trainable_flags,
)
from lightning_linearity.metrics._linalg import chunk_slices
from lightning_linearity.metrics.engine import neuron_gram, unless_unsupported
from lightning_linearity.metrics.engine._ntk_linear import private_gradient_energy
from lightning_linearity.metrics.ntk import DEFAULT_CHUNK_ELEMENTS, blocked_jacobian_gram
from lightning_linearity.nets.network import LayeredNTKNet

__all__ = ["PREACTIVATION_MODULES", "hidden_layers", "neuron_gradient_cosines"]

Reduction = Literal["mean", "none"]
CosineMethod = EngineMethod

#: Module types whose output is a pre-activation (an affine map of the module's input): on a foreign model,
#: a neuron is one output entry of such a module (docs/math.md 2.7).
PREACTIVATION_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def hidden_layers(model: nn.Module, max_layers: int = 4) -> list[int | str]:
    """The hidden layers whose neuron-gradient cosines are measured when none are named.

    The package's networks: every hidden layer 1..L. Any other model: the submodules of type
    :data:`PREACTIVATION_MODULES` that have trainable parameters, in registration order, without the last
    one (taken as the output layer); more than ``max_layers`` of them are thinned to ``max_layers`` evenly
    spaced ones (the first and the last hidden kept), since each layer costs a backward pass of the sampled
    neurons (a per-neuron Jacobian on the generic path). Returns ``[]`` when the model has no such hidden
    layer.
    """
    net = as_layered_net(model)
    if net is not None:
        return list(range(1, net.depth + 1))
    hidden = [
        name
        for name, module in model.named_modules()
        if isinstance(module, PREACTIVATION_MODULES) and any(p.requires_grad for p in module.parameters())
    ][:-1]
    if len(hidden) <= max_layers:
        return list(hidden)
    picks = sorted({round(i * (len(hidden) - 1) / (max_layers - 1)) for i in range(max_layers)})
    return [hidden[i] for i in picks]


def neuron_gradient_cosines(
    model: nn.Module,
    x: Tensor,
    layer: int | str,
    *,
    num_neurons: int | None = None,
    generator: torch.Generator | None = None,
    method: CosineMethod = "auto",
    reduction: Reduction = "mean",
    chunk_size: int | None = None,
) -> Tensor:
    """Mean |cos| between the parameter gradients of the neurons of ``layer`` (docs/math.md 2.5).

    Args:
        model: any ``nn.Module``; for the package's networks ``layer`` is a hidden layer 1..L (or
            ``"layer_l"``); for other models, the name of the submodule whose output is the pre-activation.
        x: probe inputs, shape (n, ...).
        layer: the layer whose neurons z_l[r] are compared.
        num_neurons: compare only a uniformly random subset of this many neurons (an unbiased estimate of
            the mean over all pairs); ``None`` or at least the layer width means all neurons. The subset is
            ``torch.randperm(width, generator=generator)[:num_neurons]``, the same for every probe.
        generator: the source of the subset; ``None`` means a fixed seed (0), so the same neurons are
            followed across calls (and ranks) and torch's global random state is never touched.
        method: ``"structured"`` (the package's networks; ``ValueError`` otherwise), ``"engine"``
            (per-module rules, any model made of standard layers; ``ValueError`` for a model it cannot
            take), ``"generic"`` (``torch.func``, any module) or ``"auto"`` (structured for the package's
            networks, else the engine, else generic).
        reduction: ``"mean"``: a scalar, the mean over probes; ``"none"``: the per-probe mean over pairs,
            shape (n,) (e.g. for probes split across DDP ranks, averaged afterwards).
        chunk_size: probe points processed at once; ``None`` bounds the largest intermediate by
            ``DEFAULT_CHUNK_ELEMENTS``.

    Returns:
        A scalar tensor (``reduction="mean"``) or shape (n,), dtype and device of the model output.

    Raises:
        ValueError: bad arguments, unknown layer, fewer than two neurons compared, no trainable parameters,
            inputs the model cannot take, a neuron whose gradient vanishes (its cosine is undefined), a layer
            that does not run exactly once per forward pass, or ``method="structured"``/``"engine"`` on a
            model it cannot handle.
        FloatingPointError: NaN or inf in the model output or the gradients.
    """
    check_method(method, ENGINE_METHODS)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {short_repr(reduction)}")
    if num_neurons is not None and (
        isinstance(num_neurons, bool) or not isinstance(num_neurons, int) or num_neurons < 2
    ):
        raise ValueError(
            f"num_neurons must be None or an integer >= 2 (a pair), got {short_repr(num_neurons)}"
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    check_chunk_size(chunk_size)
    check_probes(x)
    params = trainable_parameters(model)
    net = structured_net(model, required=method == "structured") if method in ("auto", "structured") else None
    if net is not None:
        index = net.resolve_hidden_layer(layer)
        neurons = _neuron_subset(net.hidden_widths[index - 1], num_neurons, generator, x.device)
        gram = _structured_gram(net, x, index, neurons, chunk_size)
    else:
        evaluate(model, x)  # clear errors for bad inputs and a non-finite output
        pre_activation = layer_output_model(model, layer)
        with torch.no_grad():
            width = pre_activation(params, x[:1]).shape[1]
        neurons = _neuron_subset(width, num_neurons, generator, x.device)
        gram = None
        if method in ("auto", "engine"):
            gram = _engine_gram(model, x, layer, neurons, chunk_size, required=method == "engine")
        if gram is None:
            gram = _generic_gram(params, x, pre_activation, neurons, chunk_size)
    per_probe = _mean_abs_cosine(check_finite(gram, f"the neuron-gradient Gram matrix of layer {layer!r}"))
    return per_probe.mean() if reduction == "mean" else per_probe


def _neuron_subset(
    width: int, num_neurons: int | None, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    if width < 2:
        raise ValueError(f"the layer has {width} neuron; cosines need at least two")
    if num_neurons is None or num_neurons >= width:
        return torch.arange(width, device=device)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    return torch.randperm(width, generator=generator, device=generator.device)[:num_neurons].to(device)


def _mean_abs_cosine(gram: Tensor) -> Tensor:
    """Per probe, the mean of |G_rs| / sqrt(G_rr G_ss) over pairs r != s; ``gram`` has shape (n, s, s)."""
    energy = torch.diagonal(gram, dim1=1, dim2=2)
    if (energy <= 0).any():
        probe, neuron = (energy <= 0).nonzero()[0].tolist()
        raise ValueError(
            f"the gradient of neuron {neuron} (of those compared) vanishes at probe {probe}; its cosine with "
            f"other neurons is undefined"
        )
    norms = energy.sqrt()
    cosines = (gram / (norms.unsqueeze(2) * norms.unsqueeze(1))).abs()
    torch.diagonal(cosines, dim1=1, dim2=2).zero_()  # only pairs r != s count
    s = gram.shape[1]
    return cosines.sum(dim=(1, 2)) / (s * (s - 1))


def _structured_gram(
    net: LayeredNTKNet, x: Tensor, index: int, neurons: Tensor, chunk_size: int | None
) -> Tensor:
    """G_l = sum_{k<=l} J_{l,k} diag(g_k) J_{l,k}^T for the rows ``neurons`` of J, per probe: (n, s, s)."""
    per_probe = len(neurons) * sum(net.hidden_widths[:index])  # the rows of J_{l,k}, k = 1..l
    grams = []
    for probes in chunk_slices(x.shape[0], chunk_size or max(1, DEFAULT_CHUNK_ELEMENTS // per_probe)):
        trace = trace_net(net, x[probes])
        seed = torch.eye(net.hidden_widths[index - 1], dtype=trace.output.dtype, device=trace.output.device)
        jacobians = backpropagate(net, trace, index, seed[neurons])  # J_{l,k}[neurons], k = 1..l
        gram = trace.output.new_zeros(trace.output.shape[0], len(neurons), len(neurons))
        with torch.no_grad():
            for layer, c, jac in zip(net.layers[:index], trace.inputs[:index], jacobians, strict=True):
                weight, bias = trainable_flags(layer)
                if weight or bias:
                    private = private_gradient_energy(layer, c, weight, bias)  # g_k, (b, m_k)
                    gram += (jac * private.unsqueeze(1)) @ jac.transpose(1, 2)
        grams.append(gram)
    return torch.cat(grams)


def _engine_gram(
    model: nn.Module, x: Tensor, layer: int | str, neurons: Tensor, chunk_size: int | None, required: bool
) -> Tensor | None:
    """<g_r, g_s> per probe by the engine's per-module rules: (n, s, s); ``None`` if the engine cannot take
    the model and ``required`` is False."""
    qualified, _ = resolve_layer(model, layer)
    return unless_unsupported(
        lambda: neuron_gram(model, x, qualified, neurons, chunk_size=chunk_size), required=required
    )


def _generic_gram(
    params: Params,
    x: Tensor,
    pre_activation: Callable[[Params, Tensor], Tensor],
    neurons: Tensor,
    chunk_size: int | None,
) -> Tensor:
    """<g_r, g_s> per probe from ``vmap(jacrev)`` of the sampled pre-activations: (n, s, s).

    The per-probe Jacobian of the s sampled neurons (s-by-P) is built in blocks of neurons that keep two
    blocks of a probe chunk within ``DEFAULT_CHUNK_ELEMENTS``, contracted block by block.
    """
    size = num_parameters(params)
    block = min(len(neurons), max(1, DEFAULT_CHUNK_ELEMENTS // (2 * size)))  # neurons per Jacobian block
    chunk = chunk_size or max(1, DEFAULT_CHUNK_ELEMENTS // (2 * block * size))  # probes at once
    grams = []
    for probes in chunk_slices(x.shape[0], chunk):

        def rows(part: slice, xs: Tensor = x[probes]) -> Params:  # name -> (b, |part|, numel)
            def sampled(p: Params, xi: Tensor) -> Tensor:
                return pre_activation(p, xi.unsqueeze(0))[0, neurons[part]]

            jac = vmap(jacrev(sampled), in_dims=(None, 0))(params, xs)
            return {name: j.flatten(2) for name, j in jac.items()}

        grams.append(blocked_jacobian_gram(rows, len(neurons), block))
    return torch.cat(grams)
