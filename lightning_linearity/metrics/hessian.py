"""Spectral norm of the Hessian of each network output (or hidden pre-activation) w.r.t. the weights.

docs/math.md 2.4 (004 Theorem 3.6 and 3.8; 000 Theorem 1 and 4): for probe point x_i and output a,

    ||H_{f_a}(w; x_i)||_2 = max_j |lambda_j( d^2 f_a(w; x_i) / dw^2 )|,

predicted to be O~(1/sqrt(m)) in the width m. The Hessian is never formed: Lanczos (largest magnitude,
:func:`~lightning_linearity.metrics._linalg.lanczos`) runs on Hessian-vector products, batched over all
(probe, output) pairs of a chunk of probes, on one of two paths:

* ``"structured"`` (the package's :class:`LayeredNTKNet`, and any model whose forward pass is a chain of
  ``nn.Linear`` layers and elementwise activations, :mod:`~lightning_linearity.metrics._chain`): every H v
  lies in a subspace of about 2 L m dimensions spanned by masked rank-one matrices per layer, and Lanczos
  runs in its coordinates with closed-form products
  (:mod:`~lightning_linearity.metrics._structured_hessian`): no vector of P entries is formed, and a step
  costs about two products with each weight matrix. A chain has per-layer scaling 1 and its own
  activations' sigma', sigma'' (a ReLU chain: sigma'' = 0, the pure cross term; at a pre-activation of
  exactly 0, sigma'(0) = 0 as in autograd, likewise for the other kinks); it is recognised from the
  modules one forward pass calls and checked against autograd on the first probe point.
* ``"generic"`` (any ``nn.Module``): forward-over-reverse products H v = d/de grad_w f_a(w + e v; x_i)
  with ``torch.func``, vmap-ed, on vectors of P entries. A normalisation layer in training mode normalises
  by the statistics of the one probe point and leaves its running statistics untouched.

Both compute the same eigenvalue to the tolerance (from different random start vectors); the tests check
both against dense Hessians.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

from lightning_linearity._text import short_repr
from lightning_linearity.metrics._chain import LinearChain, linear_chain
from lightning_linearity.metrics._functional import (
    Params,
    as_layered_net,
    check_differentiable,
    check_finite,
    evaluate,
    functional_model,
    layer_output_model,
    num_parameters,
    resolve_layer,
    trainable_parameters,
)
from lightning_linearity.metrics._layered import Method, check_method, source_columns, structured_net
from lightning_linearity.metrics._linalg import (
    BatchedMatvec,
    ConvergenceWarning,
    EigenResult,
    check_solver_options,
    chunk_slices,
    lanczos,
    random_unit_vectors,
)
from lightning_linearity.metrics._structured_hessian import (
    LayeredPass,
    LayerForm,
    StructuredHessian,
    coordinate_count,
    net_forms,
    net_pass,
)
from lightning_linearity.nets.network import LayeredNTKNet

Reduction = Literal["none", "max", "mean"]
_REDUCTIONS = ("none", "max", "mean")


#: Krylov-basis entries a batched Lanczos run may hold when ``chunk_size`` is None
#: (2**28 entries = 1 GiB in float32).
DEFAULT_KRYLOV_ELEMENTS = 2**28


@dataclass(frozen=True)
class HessianInfo:
    """How :func:`hessian_spectral_norm` got its values.

    Attributes:
        num_hvps: Hessian-vector products spent in total (over probes, outputs and Lanczos steps).
        converged: (n, q) bool, one per value before the reduction; ``False`` marks a lower bound.
        max_iter: the Lanczos step limit per value.
        tol: the relative residual tolerance.
        layer: display name of the hidden layer (``None`` for the network output).
        neurons: indices of the sampled neurons of that layer, in column order (``None`` for the output).
        method: ``"structured"`` or ``"generic"``, the path taken (``"structured"`` also for a foreign chain
            of ``nn.Linear`` layers and elementwise activations).
        share_names: with ``eigenvector_shares``, the parameter groups of ``layer_shares``: ``layer_1`` ..
            ``layer_L``, ``output`` for the package's networks, module names for other models.
        layer_shares: (n, q, groups), the share ||v_g||^2 of each group's parameters in the unit top
            eigenvector v of each Hessian (the eigenvector of the reported eigenvalue); rows sum to 1.
        neuron_share: (n, q), the largest share of one hidden neuron (package's networks only; see
            :func:`hessian_spectral_norm`).
        top_neuron: (n, q, 2), that neuron as (hidden layer 1..L, index in the layer).
    """

    num_hvps: int
    converged: Tensor
    max_iter: int
    tol: float
    layer: str | None = None
    neurons: Tensor | None = None
    method: str = "generic"
    share_names: tuple[str, ...] | None = None
    layer_shares: Tensor | None = None
    neuron_share: Tensor | None = None
    top_neuron: Tensor | None = None


def hessian_spectral_norm(
    model: nn.Module,
    x: Tensor,
    *,
    layer: int | str | None = None,
    num_neurons: int | None = None,
    generator: torch.Generator | None = None,
    tol: float = 1e-6,
    max_iter: int = 100,
    reduction: Reduction = "none",
    chunk_size: int | None = None,
    method: Method = "auto",
    columns: Sequence[int] | None = None,
    return_info: bool = False,
    eigenvector_shares: bool = False,
) -> Tensor | tuple[Tensor, HessianInfo]:
    """||d^2 f_a(w; x_i) / dw^2||_2 for every probe point x_i and output a (docs/math.md 2.4).

    w is every trainable parameter of ``model`` (any ``nn.Module`` mapping (n, ...) to (n, k)). With
    ``layer`` the same norm is computed for the hidden pre-activations z_l[r](w; x_i) of that layer
    (004 Theorem 3.8) on ``num_neurons`` neurons r sampled without replacement (all if ``None``).

    Each norm is |theta| for the largest-magnitude Ritz value theta of Lanczos on Hessian-vector products,
    stopped when its residual is at most ``tol * |theta|``: an eigenvalue of the Hessian then lies within
    ``tol * |theta|`` of theta (from a random start, the extreme one). Ritz values never exceed the spectrum,
    so a value that has not converged after ``max_iter`` steps is a lower bound; it is flagged in
    ``info.converged`` and announced with a :class:`~lightning_linearity.metrics._linalg.ConvergenceWarning`.

    The model's parameters, their ``.grad``, its train/eval mode and torch's global random state are left
    untouched (the function evaluates detached parameter copies with ``torch.func``; randomness comes from
    ``generator``).

    Args:
        model: the network.
        x: probe inputs, shape (n, ...), on the model's device.
        layer: a hidden layer (for the package's nets ``2``, ``"layer_2"`` or ``"layers.1"``; for other
            models the name of the submodule whose output is the pre-activation), or ``None`` for f.
        num_neurons: how many neurons of ``layer`` to sample (all if ``None``).
        generator: source of the neuron sample and the Lanczos start vectors; default: a local CPU
            generator seeded with 0 (reproducible).
        tol: relative residual tolerance of Lanczos (> 0).
        max_iter: Lanczos steps (Hessian-vector products) per value, at most.
        reduction: ``"none"`` -> (n, q) with q = k outputs, ``num_neurons`` or ``len(columns)``;
            ``"max"`` / ``"mean"`` over all of them -> scalar.
        chunk_size: probe points per batched Lanczos run. Memory grows like
            ``chunk_size * q * (Krylov size) * D`` numbers, D = P parameters on the generic path and
            2 R coordinates (R about 2 L m) on the structured one; ``None`` picks the largest chunk whose
            Krylov bases fit :data:`DEFAULT_KRYLOV_ELEMENTS` (at least one probe).
        method: ``"structured"`` (the package's networks, frozen layers included; or a chain of
            ``nn.Linear`` layers and elementwise activations such as ``nn.Sequential(nn.Linear, nn.ReLU, ...,
            nn.Linear)`` with every weight and bias trainable; a one-line ``ValueError`` saying why not
            otherwise),
            ``"generic"`` (any module; the independent reference) or ``"auto"`` (structured when possible,
            else generic). On a chain, ``layer`` naming one of its ``nn.Linear`` modules, ``columns``,
            ``chunk_size``, ``return_info`` and ``eigenvector_shares`` take the structured path too; a
            ``layer`` naming any other module (e.g. an activation) takes the generic one.
        columns: compute only these of the q columns (output indices, or positions in the neuron sample),
            in this order. Each column keeps the Lanczos start vector it has in the full computation, so
            its value does not depend on the other columns: a DDP rank computes its share of the
            (probe, output) pairs and gets what one process computing all of them gets.
        return_info: also return a :class:`HessianInfo`.
        eigenvector_shares: where the top eigenvector v (unit, of the eigenvalue reported) lives: its share
            ||v_g||^2 per layer's weights (and biases) and the largest single-neuron share, in the info
            (use with ``return_info=True``; only for the network output, ``layer=None``). Neuron r of hidden
            layer l owns row r of W_l (and b_l[r]) and every column of a later layer's weight that reads
            h_l[r] (FCN: column r of W_{l+1}; DenseNet / masked DAG: that column in every later layer,
            output included); its share is the sum of the squared entries of v on those weights. The
            shares of all neurons and of the output rows sum to more than 1 (a weight from h_j to h_l
            belongs to a neuron of both layers).

    Returns:
        The norms (shape per ``reduction``, the parameters' dtype), and with ``return_info`` also the info.
    """
    if eigenvector_shares and layer is not None:
        raise ValueError("eigenvector_shares is only defined for the network output; pass layer=None")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {short_repr(reduction)}")
    check_solver_options(tol, max_iter)
    check_method(method)
    params = trainable_parameters(model)
    n, q = evaluate(model, x).shape
    check_differentiable(model, x)
    first = next(iter(params.values()))
    dtype, device = first.dtype, first.device
    if generator is None:
        generator = torch.Generator().manual_seed(0)

    layer_name, neurons = None, None
    if layer is not None:
        _, layer_name = resolve_layer(model, layer)
    route = _structured_route(model, x, layer, method)
    if route is not None:
        q = route.width
        seed = torch.eye(q, dtype=dtype, device=device)
        if layer is not None:
            neurons = _sample_neurons(q, num_neurons, generator).to(device)
            seed, q = seed[neurons], len(neurons)
        selected = _check_columns(columns, q).to(device)

        def problem(probes: Tensor) -> tuple[BatchedMatvec, BatchedMatvec | None, int, Callable]:
            operator = StructuredHessian(route.forms, route.run(probes, route.top, seed[selected]))

            def energies(vectors: Tensor) -> LayerEnergies | dict[str, Tensor]:
                return route.energies(operator.energies(vectors))

            return operator.matvec, operator.gram, operator.dim, energies

        dim = 2 * coordinate_count(route.forms)  # Lanczos keeps Q and G Q
    else:
        if layer is None:
            g = functional_model(model)
        else:
            g = layer_output_model(model, layer)
            with torch.no_grad():
                layer_width = check_finite(g(params, x), f"the pre-activations of {layer_name}").shape[1]
            neurons = _sample_neurons(layer_width, num_neurons, generator).to(device)
            q = len(neurons)
        selected = _check_columns(columns, q).to(device)
        picked = selected if neurons is None else neurons[selected]

        def f(p: Params, xi: Tensor) -> Tensor:
            return g(p, xi.unsqueeze(0)).squeeze(0)[picked]

        def problem(probes: Tensor) -> tuple[BatchedMatvec, BatchedMatvec | None, int, Callable]:
            energies = partial(_flat_energies, model, params)
            return hessian_operator(f, params, probes, len(picked)), None, num_parameters(params), energies

        dim = num_parameters(params)

    def solve(probes: Tensor) -> tuple[EigenResult, list | dict | None]:
        matvec, gram, size, energies = problem(probes)
        # the start vectors of all q functions, of which the selected ones: a value does not depend on
        # which other columns are computed with it
        b = probes.shape[0]
        start = random_unit_vectors(b * total, size, generator=generator, dtype=dtype, device=device)
        start = start.view(b, total, size)[:, selected].reshape(-1, size)
        result = lanczos(
            matvec,
            start.shape[0],
            size,
            generator=generator,
            dtype=dtype,
            device=device,
            tol=tol,
            max_iter=max_iter,
            gram=gram,
            start=start,
            return_vectors=eigenvector_shares,
        )
        return result, energies(result.vectors) if eigenvector_shares else None

    total, q = q, len(selected)
    if chunk_size is None:
        chunk_size = default_chunk_size(q, dim, max_iter)
    values, converged, num_hvps, shares = [], [], 0, []
    for chunk in chunk_slices(n, chunk_size):
        try:
            result, energy = solve(x[chunk])
        except FloatingPointError as err:
            raise FloatingPointError(
                f"a Hessian-vector product of {type(model).__name__} on probes {chunk.start}.."
                f"{chunk.stop - 1} is non-finite: its second derivatives overflow or are undefined here"
            ) from err
        values.append(result.eigenvalue.abs().view(-1, q))
        converged.append(result.converged.view(-1, q))
        num_hvps += result.num_matvecs
        if eigenvector_shares:
            shares.append(_eigenvector_shares(as_layered_net(model), energy))
    values, converged = torch.cat(values), torch.cat(converged)

    failed = int((~converged).sum())
    if failed:
        what = "outputs" if layer_name is None else f"neurons of {layer_name}"
        warnings.warn(
            f"{failed} of {converged.numel()} Hessian spectral norms (probes x {what}) did not converge to "
            f"tol={tol} within max_iter={max_iter} Lanczos steps; they are lower bounds (see "
            f"info.converged with return_info=True, or raise max_iter)",
            ConvergenceWarning,
            stacklevel=2,
        )
    if reduction == "max":
        values = values.max()
    elif reduction == "mean":
        values = values.mean()
    if not return_info:
        return values
    path = "generic" if route is None else "structured"
    info = HessianInfo(num_hvps, converged, max_iter, float(tol), layer_name, neurons, path)
    if eigenvector_shares:
        names = shares[0][0]
        layer_shares = torch.cat([s[1] for s in shares]).view(n, q, len(names))
        neuron = None if shares[0][2] is None else torch.cat([s[2] for s in shares]).view(n, q)
        where = None if shares[0][3] is None else torch.cat([s[3] for s in shares]).view(n, q, 2)
        info = replace(
            info, share_names=names, layer_shares=layer_shares, neuron_share=neuron, top_neuron=where
        )
    return values, info


LayerEnergies = list[tuple[Tensor, Tensor]]


def _flat_energies(model: nn.Module, params: Params, vectors: Tensor) -> LayerEnergies | dict[str, Tensor]:
    """Squared entries of flat parameter-space vectors (B, P) grouped as :func:`_eigenvector_shares` needs:
    per layer of the package's network (row and column sums of its weight, the bias added to the rows;
    zeros for frozen parameters), else per module name."""
    numels = [p.numel() for p in params.values()]
    parts = dict(zip(params, (t.pow(2) for t in vectors.split(numels, dim=1)), strict=True))
    net = as_layered_net(model)
    if net is None:
        return _module_energies({name: part.sum(dim=1) for name, part in parts.items()})
    names = {id(p): name for name, p in model.named_parameters()}
    energies = []
    for layer in net.layers:
        weight = parts.get(names[id(layer.weight)])
        b = vectors.shape[0]
        if weight is None:
            rows, cols = vectors.new_zeros(b, layer.out_features), vectors.new_zeros(b, layer.in_features)
        else:
            weight = weight.view(b, layer.out_features, layer.in_features)
            rows, cols = weight.sum(dim=2), weight.sum(dim=1)
        if layer.bias is not None and names[id(layer.bias)] in parts:
            rows = rows + parts[names[id(layer.bias)]]
        energies.append((rows, cols))
    return energies


def _module_energies(parameter_energies: dict[str, Tensor]) -> dict[str, Tensor]:
    """Squared norms (B,) per parameter, summed per module name (a root parameter is its own group)."""
    groups: dict[str, Tensor] = {}
    for name, energy in parameter_energies.items():
        module = name.rpartition(".")[0] or name
        groups[module] = groups.get(module, 0.0) + energy
    return groups


def _chain_energies(chain: LinearChain, params: Params, energies: LayerEnergies) -> dict[str, Tensor]:
    """:func:`_module_energies` of the chain's layers from their (rows, columns) energies: the weight's
    squared norm is the sum of its columns', the bias's what the rows hold beyond it."""
    per_parameter = {}
    for name, linear, (rows, cols) in zip(chain.names, chain.linears, energies, strict=True):
        prefix = f"{name}." if name else ""
        weight = cols.sum(dim=1)
        per_parameter[prefix + "weight"] = weight
        if linear.bias is not None:
            per_parameter[prefix + "bias"] = (rows.sum(dim=1) - weight).clamp(min=0)
    return _module_energies({name: per_parameter[name] for name in params})


def _eigenvector_shares(
    net: LayeredNTKNet | None, energies: LayerEnergies | dict[str, Tensor]
) -> tuple[tuple[str, ...], Tensor, Tensor | None, Tensor | None]:
    """(group names, (B, groups) shares, (B,) largest hidden-neuron share, (B, 2) its (layer, index))."""
    if isinstance(energies, dict):
        stacked = torch.stack(list(energies.values()), dim=1)
        return tuple(energies), stacked / stacked.sum(dim=1, keepdim=True), None, None
    per_layer = torch.stack([rows.sum(dim=1) for rows, _ in energies], dim=1)
    total = per_layer.sum(dim=1, keepdim=True)
    owned = [rows.clone() for rows, _ in energies[:-1]]  # hidden neurons: own rows ...
    for l in range(2, net.depth + 2):  # ... and the columns of later layers reading them
        for j, cols in source_columns(net, l):
            if j >= 1:
                owned[j - 1] += energies[l - 1][1][:, cols]
    best = torch.stack([o.max(dim=1).values for o in owned], dim=1)  # (B, L)
    layer_index = best.argmax(dim=1)
    index = torch.stack([owned[int(l)][b].argmax() for b, l in enumerate(layer_index)])
    names = (*net.hidden_layer_names, "output")
    where = torch.stack([layer_index + 1, index.to(layer_index.device)], dim=1)
    return names, per_layer / total, best.max(dim=1).values / total[:, 0], where


@dataclass(frozen=True)
class _Route:
    """The structured products of a model: its layers 1..top, their pass on a chunk of probes for a seed
    (``run(probes, top, seed)``), the number q of functions of z_top, and the eigenvector energies in the
    grouping :func:`_eigenvector_shares` needs."""

    forms: list[LayerForm]
    run: Callable[[Tensor, int, Tensor], LayeredPass]
    top: int
    width: int
    energies: Callable[[LayerEnergies], LayerEnergies | dict[str, Tensor]]


def _structured_route(model: nn.Module, x: Tensor, layer: int | str | None, method: Method) -> _Route | None:
    """The structured products for ``model`` (the package's network, or a chain of ``nn.Linear`` layers and
    elementwise activations), or ``None`` for the generic path (see ``method``)."""
    if method == "generic":
        return None
    if as_layered_net(model) is not None:
        net = structured_net(model, required=method == "structured")
        if net is None:
            return None
        top = net.depth + 1 if layer is None else net.resolve_hidden_layer(layer)
        width = net.out_features if layer is None else net.hidden_widths[top - 1]
        return _Route(net_forms(net, top), partial(net_pass, net), top, width, lambda energies: energies)
    else:
        chain = linear_chain(model, x)
        if isinstance(chain, str):
            reason = (
                f"{type(model).__name__} is not one of the package's networks, nor a chain of nn.Linear "
                f"layers and elementwise activations: {chain}"
            )
        else:
            top = chain.depth + 1 if layer is None else chain.layer_index(resolve_layer(model, layer)[0])
            reason = None if top is not None else f"layer {layer!r} is not one of its nn.Linear layers"
        if reason is None:
            energies = partial(_chain_energies, chain, trainable_parameters(model))
            return _Route(chain.forms(top), chain.hessian_pass, top, chain.width(top), energies)
    if method == "structured":
        raise ValueError(f"method='structured' cannot handle this model: {reason}. Use method='generic'.")
    return None


def default_chunk_size(num_outputs: int, num_params: int, max_iter: int) -> int:
    """Probe points per Lanczos batch so that the Krylov bases hold at most ``DEFAULT_KRYLOV_ELEMENTS``.

    Each of the ``chunk * num_outputs`` Lanczos runs keeps up to ``min(max_iter, 64)`` basis vectors of
    ``num_params`` entries (64: the usual iteration count stays well below it; the basis grows on demand).
    """
    per_probe = num_outputs * min(max_iter, 64) * num_params
    return max(1, DEFAULT_KRYLOV_ELEMENTS // per_probe)


def hessian_operator(
    f: Callable[[Params, Tensor], Tensor], params: Params, x: Tensor, num_outputs: int
) -> BatchedMatvec:
    """The batched operator (see :mod:`~lightning_linearity.metrics._linalg`) of the Hessians of ``f``.

    ``f(params, x_i) -> (q,)`` is a single-probe function (``q = num_outputs``); batch element b is the
    Hessian d^2 f_a(w; x_i) / dw^2 of probe i = b // q and output a = b % q, as a P x P operator on flat
    vectors (parameters concatenated in ``params`` order). Its products are forward-over-reverse,

        H v = jvp(grad_w <f(w; x_i), e_a>, w, v),

    vmap-ed over the active elements.
    """
    shapes = {name: p.shape for name, p in params.items()}
    numels = [p.numel() for p in params.values()]

    def hvp(xi: Tensor, selector: Tensor, v: Tensor) -> Tensor:
        tangent = {name: t.view(shapes[name]) for name, t in zip(shapes, v.split(numels), strict=True)}
        gradient = grad(lambda p: (f(p, xi) * selector).sum())
        return torch.cat([t.reshape(-1) for t in jvp(gradient, (params,), (tangent,))[1].values()])

    batched_hvp = vmap(hvp)
    xs = x.repeat_interleave(num_outputs, dim=0)
    dtype = next(iter(params.values())).dtype
    selectors = torch.eye(num_outputs, dtype=dtype, device=x.device).repeat(x.shape[0], 1)

    def matvec(v: Tensor, active: Tensor) -> Tensor:
        return batched_hvp(xs[active], selectors[active], v)

    return matvec


def _check_columns(columns: Sequence[int] | None, q: int) -> Tensor:
    """The selected columns as a long tensor (all q if ``None``); distinct integers in 0..q-1."""
    if columns is None:
        return torch.arange(q)
    picked = list(columns)
    if (
        not picked
        or any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < q for c in picked)
        or len(set(picked)) != len(picked)
    ):
        raise ValueError(f"columns must be distinct integers in 0..{q - 1}, got {short_repr(columns)}")
    return torch.tensor(picked, dtype=torch.long)


def _sample_neurons(size: int, num_neurons: int | None, generator: torch.Generator) -> Tensor:
    """Sorted indices of ``num_neurons`` of the layer's neurons drawn without replacement (all if None)."""
    if num_neurons is None:
        return torch.arange(size)
    if isinstance(num_neurons, bool) or not isinstance(num_neurons, int) or not 0 < num_neurons <= size:
        raise ValueError(
            f"num_neurons must be an integer in 1..{size} (the layer size), got {short_repr(num_neurons)}"
        )
    sample = torch.randperm(size, generator=generator, device=generator.device)[:num_neurons]
    return sample.sort().values
