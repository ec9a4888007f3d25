"""Shared plumbing for the metrics: functional forward passes, structure detection, input checks.

Every metric sees the model as a pure function ``f(w, x) -> (n, k)`` of its trainable parameters ``w``
(docs/math.md section 2: "w means every trainable parameter of the model"). ``torch.func.functional_call``
evaluates the model at detached copies of ``w``, so no metric touches ``.grad``, the parameters, the
train/eval mode or torch's global random state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _NormBase

from lightning_linearity._text import short_repr
from lightning_linearity.nets.network import LayeredNTKNet

Params = dict[str, Tensor]


def trainable_parameters(model: nn.Module) -> Params:
    """Detached copies (same storage, no autograd history) of every parameter with ``requires_grad``."""
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters (none with requires_grad=True); "
            f"the linearity metrics are derivatives with respect to them"
        )
    return params


def num_parameters(params: Params) -> int:
    return sum(p.numel() for p in params.values())


def as_2d_output(out: Tensor, n: int) -> Tensor:
    """View a model output as (n, k): (n,) becomes (n, 1); trailing dimensions are flattened."""
    if not isinstance(out, Tensor):
        raise ValueError(
            f"the model returned a {type(out).__name__}, not one tensor; the metrics need f(w; x) of shape "
            f"(n, k): pick it with LinearityMonitor(output_transform=...), e.g. lambda out: out[0]"
        )
    if out.dim() == 0 or out.shape[0] != n:
        raise ValueError(
            f"the model maps a batch of {n} inputs to an output of shape {tuple(out.shape)}; "
            f"the metrics need a model mapping (n, ...) to (n, k)"
        )
    return out.reshape(n, -1)


def model_buffers(model: nn.Module) -> dict[str, Tensor | None]:
    """The buffers a functional forward pass reads.

    A normalisation layer in training mode normalises by the statistics of the batch it is given and would
    update its running statistics in place: its running statistics are passed as ``None``, so it still
    normalises by the batch, and no metric changes the model's state or updates a tensor in place inside a
    ``torch.func`` transform.
    """
    buffers: dict[str, Tensor | None] = dict(model.named_buffers())
    for prefix, module in model.named_modules():
        if isinstance(module, _NormBase) and module.training:
            for name, _ in module.named_buffers(prefix=prefix):
                buffers[name] = None
    return buffers


def tied_names(model: nn.Module) -> dict[str, str]:
    """A name for every slot holding a parameter or buffer, mapped to the tensor's first name.

    A parameter shared by two modules (tied weights) fills two slots and has two names; a module used twice
    is one set of slots (``named_modules`` lists it once). First names are those of ``named_parameters``.
    """
    first: dict[int, str] = {}
    names: dict[str, str] = {}
    for prefix, module in model.named_modules():
        for attr, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None:
                name = f"{prefix}.{attr}" if prefix else attr
                names[name] = first.setdefault(id(tensor), name)
    return names


def model_call(model: nn.Module, aliases: dict[str, str], tensors: Params, x: Tensor) -> Tensor:
    """``model(x)`` with ``tensors`` (first names) in place of its own; ``aliases`` is
    :func:`tied_names` of the model, taken once by the caller (not in every forward pass).

    Every alias of a tied tensor gets the replacement, and ``functional_call`` runs with
    ``tie_weights=False``: with True, a module used twice keeps a plain tensor for its weight afterwards.
    """
    every = {alias: tensors[name] for alias, name in aliases.items() if name in tensors}
    return functional_call(model, every, (x,), tie_weights=False)


def functional_model(model: nn.Module) -> Callable[[Params, Tensor], Tensor]:
    """``f(params, x) -> (n, k)``: the model evaluated at ``params`` (see :func:`model_buffers`)."""
    buffers, aliases = model_buffers(model), tied_names(model)

    def f(params: Params, x: Tensor) -> Tensor:
        return as_2d_output(model_call(model, aliases, {**buffers, **params}, x), x.shape[0])

    return f


def single_input_model(model: nn.Module) -> Callable[[Params, Tensor], Tensor]:
    """``f(params, x_i) -> (k,)`` for one probe point, for ``vmap`` over probe points."""
    f = functional_model(model)
    return lambda params, xi: f(params, xi.unsqueeze(0)).squeeze(0)


def as_layered_net(model: nn.Module) -> LayeredNTKNet | None:
    """The package's own network behind ``model`` (for the structured fast paths), else ``None``.

    A module qualifies if it is a :class:`LayeredNTKNet`, or exposes one as ``layered_net`` and promises
    ``model(x) == model.layered_net(x)`` (the package's LightningModules do).
    """
    if isinstance(model, LayeredNTKNet):
        return model
    net = getattr(model, "layered_net", None)
    return net if isinstance(net, LayeredNTKNet) else None


def check_finite(value: Tensor, what: str) -> Tensor:
    """Raise ``FloatingPointError`` naming ``what`` if ``value`` holds NaN or inf."""
    if not torch.isfinite(value).all():
        bad = int((~torch.isfinite(value)).sum().item())
        raise FloatingPointError(f"{what} has {bad} non-finite entries (NaN or inf)")
    return value


def check_output(model: nn.Module, x: Tensor, out: Tensor) -> Tensor:
    """``out = f(w; x)``, or a ``FloatingPointError`` that says where its NaN or inf comes from: the probe
    inputs, a parameter (the model diverged), or the forward pass itself (it overflows on these inputs)."""
    if torch.isfinite(out).all():
        return out
    bad = int((~torch.isfinite(out)).sum().item())
    if x.is_floating_point() and not torch.isfinite(x).all():
        cause = f"the probe inputs hold {int((~torch.isfinite(x)).sum().item())} NaN or inf entries"
    else:
        params = trainable_parameters(model)
        diverged = [name for name, p in params.items() if not torch.isfinite(p).all()]
        cause = (
            f"the parameter {diverged[0]!r} is non-finite ({len(diverged)} of {len(params)} are): the model "
            f"has diverged"
            if diverged
            else "the inputs and parameters are finite: the forward pass overflows on these inputs"
        )
    raise FloatingPointError(f"the model output on the probe inputs has {bad} non-finite entries; {cause}")


def evaluate(model: nn.Module, x: Tensor) -> Tensor:
    """``f(w; x)`` as (n, k), without autograd.

    Raises clear errors for a wrong input shape or a non-finite output.
    """
    params = trainable_parameters(model)
    try:
        with torch.no_grad():
            out = functional_model(model)(params, x)
    except (RuntimeError, ValueError) as err:
        raise evaluation_error(model, x, err) from err
    return check_output(model, x, out)


def evaluation_error(model: nn.Module, x: Tensor, err: Exception) -> ValueError:
    """The one-line error for a forward pass that failed on the probe inputs, with the likely fix."""
    hint = ""
    if not x.is_floating_point() and "dtype" in str(err):
        hint = f" (the probe inputs are {x.dtype}: cast them to the model's dtype unless it reads indices)"
    message = (
        f"{type(model).__name__} could not be evaluated on probe inputs of shape {tuple(x.shape)}: {err}"
    )
    return ValueError(" ".join(f"{message}{hint}".split()))


def check_differentiable(model: nn.Module, x: Tensor) -> None:
    """Raise ``ValueError`` if the output does not depend differentiably on the trainable parameters."""
    params = {name: p.requires_grad_() for name, p in trainable_parameters(model).items()}
    with torch.enable_grad():
        out = functional_model(model)(params, x[:1])
    if out.grad_fn is None:
        raise ValueError(
            f"the output of {type(model).__name__} does not depend differentiably on its trainable "
            f"parameters (no autograd graph: detach(), argmax or integer ops in forward?)"
        )


def resolve_layer(model: nn.Module, layer: int | str) -> tuple[str, str]:
    """Find the submodule whose output is the pre-activation of ``layer``.

    For the package's networks ``layer`` is a hidden-layer index 1..L, ``"layer_l"`` or a module name; for
    any other model it is the name of a submodule (as in ``model.named_modules()``) whose output is the
    pre-activation of interest. Returns ``(qualified module name, display name)``.
    """
    net = as_layered_net(model)
    if net is not None:
        index = net.resolve_hidden_layer(layer)
        prefix = next(name for name, module in model.named_modules() if module is net)
        qualified = f"{prefix}.layers.{index - 1}" if prefix else f"layers.{index - 1}"
        return qualified, f"layer_{index}"
    names = [name for name, _ in model.named_modules() if name]
    if not isinstance(layer, str) or layer not in names:
        raise ValueError(f"unknown layer {layer!r} of {type(model).__name__}; valid submodule names: {names}")
    return layer, layer


def layer_output_model(model: nn.Module, layer: int | str) -> Callable[[Params, Tensor], Tensor]:
    """``g(params, x) -> (n, m_l)``: the output of the resolved layer (its pre-activations), functionally.

    The output is captured by a forward hook during ``functional_call``, so it works under ``vmap`` and
    ``torch.func`` transforms; the hook is removed before returning.
    """
    qualified, _ = resolve_layer(model, layer)
    module = model.get_submodule(qualified)
    buffers, aliases = model_buffers(model), tied_names(model)

    def g(params: Params, x: Tensor) -> Tensor:
        captured: list[Tensor] = []
        handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            model_call(model, aliases, {**buffers, **params}, x)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise ValueError(
                f"layer {qualified!r} ran {len(captured)} times in one forward pass; expected once"
            )
        return as_2d_output(captured[0], x.shape[0])

    return g


def check_chunk_size(chunk_size: int | None) -> None:
    """Raise ``ValueError`` unless ``chunk_size`` is ``None`` or a positive integer."""
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or a positive integer, got {short_repr(chunk_size)}")


def check_probes(x: Tensor, x2: Tensor | None = None) -> None:
    """``x`` (and ``x2``) must hold at least one probe point; ``x2`` must be shaped like ``x`` past dim 0."""
    for name, probes in (("x", x), ("x2", x2)):
        if probes is None:
            continue
        if not isinstance(probes, Tensor) or probes.dim() < 1 or probes.shape[0] < 1:
            shape = tuple(probes.shape) if isinstance(probes, Tensor) else type(probes).__name__
            raise ValueError(f"{name} must be a tensor of shape (n, ...) with n >= 1 probes, got {shape}")
    if x2 is not None and x2.shape[1:] != x.shape[1:]:
        raise ValueError(
            f"x2 has shape {tuple(x2.shape)} but x has {tuple(x.shape)}: both need the same trailing shape"
        )
