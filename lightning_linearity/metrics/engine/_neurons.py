"""The Gram matrices of the parameter gradients of a layer's neurons, per probe point (docs/math.md 2.5, 2.7).

For the neurons r of a layer (the entries of one sample's output of a module, flattened: an output feature
of a Linear, an output channel at one position of a convolution) and a probe point x_i,

    G[i,r,s] = < d z[r](x_i)/dw , d z[s](x_i)/dw >
             = sum over modules m of < d z[r](x_i)/d theta_m , d z[s](x_i)/d theta_m >,

which is the engine's per-module kernel block K_m[(i,r),(i,s)] with the sampled neurons in place of the k
outputs of f, on the blocks of single probe points only. One forward pass records each module's inputs;
one backward pass, seeded at the layer's output with the one-hot vectors of the sampled neurons
(:class:`~._trace.NeuronTarget`), gives D_m[i,r] = d z[r](x_i) / d y_m for every module called before the
layer; each rule contracts its factors into its (n, s, s) block (:meth:`~._base.Rule.diagonal`). The
layer's own parameters are one more module, whose D is the one-hot seed itself; for a Linear or a
convolution its block has a closed form (:meth:`~._linear.AffineRule.seeded_diagonal`): a Linear on 2-d
inputs adds (c_i . c_i + 1) delta_rs (row r of W and b[r] are private to neuron r), a convolution the
inner product of the input patches at the two neurons' positions (+ 1) when they share a channel.

Not taken (:class:`UnsupportedModel`): what :func:`~._plan.ntk_plan` refuses, a layer inside a module
whose own parameters act in the same call (its gradient is not at a module output before the layer), and a
model whose Gram matrix of the first probe disagrees with autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_linearity.metrics._functional import trainable_parameters
from lightning_linearity.metrics._linalg import chunk_slices
from lightning_linearity.metrics.engine._base import DEFAULT_CHUNK_ELEMENTS, Call, Rule
from lightning_linearity.metrics.engine._linear import AffineRule
from lightning_linearity.metrics.engine._plan import (
    UnsupportedModel,
    _check_batch_first,
    _check_sample_wise,
    _sites,
    batched_backward,
    check_against_autograd,
    random_direction,
)
from lightning_linearity.metrics.engine._trace import NeuronTarget, record


def neuron_gram(
    model: nn.Module, x: Tensor, layer: str, neurons: Tensor, *, chunk_size: int | None = None
) -> Tensor:
    """G[i,a,b] = < d z[neurons[a]](x_i)/dw , d z[neurons[b]](x_i)/dw >, shape (n, s, s), s = len(neurons).

    ``layer`` is the qualified name of the submodule whose output z (per sample, flattened) holds the
    neurons; w every trainable parameter. ``chunk_size``: probe points per forward/backward pass (``None``:
    sized so that the recorded deltas stay near ``DEFAULT_CHUNK_ELEMENTS``).

    Raises:
        UnsupportedModel: (a ``ValueError``) the engine cannot take the model; the message says why.
        ValueError: the model cannot be evaluated on ``x``, has no trainable parameters, or the layer does
            not run exactly once in a forward pass.
    """
    trainable_parameters(model)  # raises if there are none
    _check_sample_wise(model, x)
    planning = x[:2]
    sites = _sites(model, planning)
    _check_layer_outside_sites(sites, layer)
    target = NeuronTarget(model.get_submodule(layer), neurons)
    batched = batched_backward(sites)
    s = len(neurons)
    probe = NeuronTarget(target.module, neurons[:2])  # the planning trace needs two neurons only
    _, calls = record(model, planning, [site.module for site in sites], batched, probe)
    with torch.no_grad():
        for site in sites:
            _check_batch_first(site, calls[site.module], planning.shape[0])
            site.choose_route(calls[site.module], x.shape[0], s, diagonal=True)
        gram, elements = _gram(sites, calls, probe, chunk_size)
    _self_check(model, probe, planning[:1], gram[0])
    per_probe = elements * s // (len(probe.neurons) * planning.shape[0])  # deltas and factors grow with s
    chunk = chunk_size or max(1, DEFAULT_CHUNK_ELEMENTS // max(1, per_probe))
    grams = []
    for rows in chunk_slices(x.shape[0], chunk):
        xs = x[rows]
        _, calls = record(model, xs, [site.module for site in sites], batched, target)
        with torch.no_grad():
            for site in sites:
                _check_batch_first(site, calls[site.module], xs.shape[0])
            grams.append(_gram(sites, calls, target, chunk_size)[0])
    return torch.cat(grams)


def _gram(
    sites: list[Rule], calls: dict[nn.Module, list[Call]], target: NeuronTarget, chunk: int | None
) -> tuple[Tensor, int]:
    """The sum of the per-probe blocks of the sites called before the layer, and the number of elements
    their deltas and factors held. The layer's own Linear or convolution takes its closed form
    (:meth:`~._linear.AffineRule.seeded_diagonal`); every other site its :meth:`~._base.Rule.diagonal`."""
    gram, elements = None, 0
    for site in sites:
        site_calls = calls[site.module]
        if not site_calls:  # called after the layer only: no gradient
            continue
        if site.module is target.module and isinstance(site, AffineRule):
            block = site.seeded_diagonal(site_calls[0], target.neurons)
        else:
            parts = site.factors(site_calls, len(target.neurons))
            deltas = sum(g.numel() for call in site_calls for g in call.grads if g is not None)
            elements += deltas + sum(p.numel() for p in parts)
            block = site.diagonal(parts, chunk)
        gram = block if gram is None else gram.add_(block)
    return gram, elements  # record() has raised if no site was called before the layer


def _check_layer_outside_sites(sites: list[Rule], layer: str) -> None:
    """A site containing the layer would have its parameters act inside the call that produces z; the
    engine takes a module's gradients at its output, after z."""
    for site in sites:
        if site.name == "" or layer.startswith(site.name + "."):
            raise UnsupportedModel(
                f"layer {layer!r} lies inside {site.name or '<model>'} ({type(site.module).__name__}), "
                f"whose own parameters act in the same call; the engine takes gradients at module outputs"
            )


def _self_check(model: nn.Module, target: NeuronTarget, x: Tensor, gram: Tensor) -> None:
    """u . G u of the first probe against ||d (u . z[neurons](x_1)) / dw||^2 from autograd, u random."""
    u = random_direction(len(target.neurons), gram)
    captured: list[Tensor] = []
    handle = target.module.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.enable_grad(), torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            model(x)
            value = captured[0].reshape(1, -1)[0, target.neurons.to(x.device)] @ u
    finally:
        handle.remove()
    check_against_autograd(model, u @ gram @ u, value, "neuron-gradient Gram matrix")
