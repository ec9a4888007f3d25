"""Linearisation error around the initial weights and the distance travelled from them.

docs/math.md 2.6 (004 Eq. 9, Corollary 3.7): with w_0 the parameters at initialisation,

    f_lin(w; x) = f(w_0; x) + < df(w_0; x)/dw , w - w_0 >,        R = ||w - w_0||_2,

and the linearisation error |f(w; x) - f_lin(w; x)| is predicted to be O~(R^2 / sqrt(m)). f(w_0; x) and the
directional derivative come from one forward-mode ``jvp`` at w_0 along w - w_0; no Jacobian is formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import jvp

from lightning_linearity.metrics._functional import (
    Params,
    check_finite,
    check_probes,
    evaluate,
    functional_model,
    trainable_parameters,
)


@dataclass(frozen=True)
class LinearizationError:
    """Summary of |f(w; x) - f_lin(w; x)| over the probe set (all entries are 0-dim tensors).

    Attributes:
        mean_abs: mean over probes i and outputs a of |f_a(w; x_i) - f_lin,a(w; x_i)|.
        max_abs: the maximum of the same.
        relative: mean_abs / mean_{i,a} |f_a(w; x_i) - f_a(w_0; x_i)|, with 0/0 := 0 (w = w_0) and
            e/0 := inf for e > 0.
        distance: R = ||w - w_0||_2 over all trainable parameters.
    """

    mean_abs: Tensor
    max_abs: Tensor
    relative: Tensor
    distance: Tensor


def _initial_parameters(model: nn.Module, params_0: dict[str, Tensor]) -> tuple[Params, Params]:
    """The model's trainable parameters w and the matching w_0 from ``params_0`` (on w's device and dtype).

    ``params_0`` must hold every trainable parameter under its ``named_parameters`` name with the same
    shape; entries for frozen parameters (``requires_grad=False``) are ignored, any other extra name is an
    error. Entries must be real tensors (``TypeError`` / ``ValueError`` otherwise) without NaN or inf
    (``FloatingPointError``).
    """
    params = trainable_parameters(model)
    if not isinstance(params_0, dict):
        raise TypeError(f"params_0 must be a dict name -> tensor, got {type(params_0).__name__}")
    for name, value in params_0.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"params_0[{name!r}] must be a tensor, got {type(value).__name__}")
        if value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"params_0[{name!r}] must hold real numbers, got dtype {value.dtype}")
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    missing = sorted(set(params) - set(params_0))
    unexpected = sorted(set(params_0) - set(params) - frozen)
    mismatched = [
        f"{name}: {tuple(params_0[name].shape)} != {tuple(p.shape)}"
        for name, p in params.items()
        if name in params_0 and tuple(params_0[name].shape) != tuple(p.shape)
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"params_0 does not match the trainable parameters of {type(model).__name__}: "
            f"missing {missing}, unexpected {unexpected}, shape mismatch (params_0 != model) {mismatched}; "
            f"take it as {{n: p.detach().clone() for n, p in model.named_parameters()}}"
        )
    initial = {name: params_0[name].detach().to(p) for name, p in params.items()}
    for name, value in initial.items():
        check_finite(value, f"the entry {name!r} at params_0")
    return params, initial


def _distance(params: Params, params_0: Params) -> Tensor:
    squares = [torch.sum((params[name] - params_0[name]) ** 2) for name in params]
    return torch.stack(squares).sum().sqrt()


def distance_from_init(model: nn.Module, params_0: dict[str, Tensor]) -> Tensor:
    """R = ||w - w_0||_2 over all trainable parameters (docs/math.md 2.6), a 0-dim tensor.

    ``params_0`` is a dict name -> tensor as from ``{n: p.detach().clone() for n, p in
    model.named_parameters()}``; names and shapes are checked against the trainable parameters.
    """
    return _distance(*_initial_parameters(model, params_0))


def linearization_error(model: nn.Module, params_0: dict[str, Tensor], x: Tensor) -> LinearizationError:
    """|f(w; x) - f_lin(w; x)| on the probe set, with f_lin linearised at w_0 (docs/math.md 2.6).

        f_lin(w; x_i) = f(w_0; x_i) + < df(w_0; x_i)/dw , w - w_0 >

    computed as ``jvp(w -> f(w; x), w_0, w - w_0)`` (one forward-mode pass). See
    :class:`LinearizationError` for the summaries; ``relative`` divides by the mean change of the output
    since initialisation.

    Args:
        model: the network at its current parameters w (any ``nn.Module`` mapping (n, ...) to (n, k)).
        params_0: w_0, a dict name -> tensor as from ``{n: p.detach().clone() for n, p in
            model.named_parameters()}`` (moved to each parameter's device and dtype).
        x: probe inputs, shape (n, ...).

    The model's parameters, ``.grad``, train/eval mode and the global random state are not changed.
    """
    check_probes(x)
    params, params_0 = _initial_parameters(model, params_0)
    f_w = evaluate(model, x)
    f = functional_model(model)
    displacement = {name: params[name] - params_0[name] for name in params}
    f_w0, directional = jvp(lambda p: f(p, x), (params_0,), (displacement,))
    f_w0 = check_finite(f_w0.detach(), "the model output at params_0")
    f_lin = f_w0 + check_finite(directional.detach(), "the directional derivative <df(w_0)/dw, w - w_0>")
    error = (f_w - f_lin).abs()
    mean_abs, change = error.mean(), (f_w - f_w0).abs().mean()
    relative = torch.where(change > 0, mean_abs / change, torch.where(mean_abs > 0, torch.inf, 0.0))
    return LinearizationError(mean_abs, error.max(), relative, _distance(params, params_0))
