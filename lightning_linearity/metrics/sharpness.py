"""Loss sharpness: the largest eigenvalues of the Hessian of the training loss (docs/math.md 2.9).

For a batch (X, Y) and the loss

    "mse":            L(w) = c * 1/2 * sum_i ||f(w; x_i) - y_i||^2                      (docs/math.md 2.2)
    "cross_entropy":  L(w) = c * sum_i ell(f(w; x_i), y_i),  ell = softmax cross-entropy (k > 1 outputs) or
                      binary cross-entropy with logits (k = 1, labels 0/1)

with c = 1 for ``reduction="sum"`` and c = 1/n for ``"mean"``, the sharpness is lambda_max(d^2 L / dw^2),
and gradient descent with step eta is stable only while eta * sharpness < 2 (edge of stability at
eta * sharpness / 2 = 1). The Hessian splits into the Gauss-Newton part and a residual-weighted part,

    d^2 L / dw^2 = c sum_i J_i^T (d^2 ell / df^2) J_i  +  c sum_i sum_a (d ell / d f_a) d^2 f_a(x_i) / dw^2,

J_i = d f(w; x_i) / dw. For the square loss d^2 ell / df^2 = I, so the Gauss-Newton part is c J^T J, whose
non-zero eigenvalues are those of c K with K = J J^T the empirical NTK of the batch (docs/math.md 2.1): its
top eigenvalue is c * lambda_max(K), the catapult indicator (eta * lambda_max(K_0) > 2 at initialisation).
Far from a minimum the second part makes the Hessian indefinite; its largest eigenvalue still comes from
Lanczos (which, unlike power iteration, does not need it to dominate in magnitude).

Both come from :func:`~lightning_linearity.metrics._linalg.lanczos_largest` on matrix-free products with
``torch.func``: Hessian-vector products forward-over-reverse (jvp of the gradient of L), Gauss-Newton
products as J^T (d^2 ell / df^2) J v (a jvp, a Hessian-vector product of ell in output space, a vjp). The
model is evaluated on the whole batch at detached copies of its parameters: parameters, ``.grad``, train/eval
mode and torch's global random state are left untouched.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, jvp, vjp

from lightning_linearity._text import short_repr
from lightning_linearity.metrics._functional import (
    Params,
    check_differentiable,
    check_probes,
    evaluate,
    functional_model,
    num_parameters,
    trainable_parameters,
)
from lightning_linearity.metrics._linalg import ConvergenceWarning, TopEigen, lanczos_largest
from lightning_linearity.metrics.pl import square_loss_targets

__all__ = ["Sharpness", "loss_sharpness"]

LossName = Literal["mse", "cross_entropy"]
ReductionName = Literal["sum", "mean"]


@dataclass(frozen=True)
class Sharpness:
    """What :func:`loss_sharpness` measured.

    Attributes:
        eigenvalues: (k,) the k largest eigenvalues of d^2 L / dw^2, descending (``eigenvalues[0]`` is the
            sharpness; may be negative far from a minimum).
        gauss_newton_max: scalar, lambda_max of the Gauss-Newton part (for ``"mse"``: c * lambda_max(K));
            NaN when not computed.
        converged: (k,) bool, ``False`` marks a Ritz value that missed the tolerance (eigenvalues[0] is then
            a lower bound).
        gauss_newton_converged: whether ``gauss_newton_max`` met the tolerance (``False`` if not computed).
        num_hvps: Hessian- and Gauss-Newton-vector products spent.
        loss, reduction: the loss and its reduction (c = 1 for "sum", 1/n for "mean").
    """

    eigenvalues: Tensor
    gauss_newton_max: Tensor
    converged: Tensor
    gauss_newton_converged: bool
    num_hvps: int
    loss: str
    reduction: str


def _flat_tools(params: Params) -> tuple[Callable[[Tensor], Params], Callable[[Params], Tensor]]:
    shapes = {name: p.shape for name, p in params.items()}
    numels = [p.numel() for p in params.values()]

    def unflatten(v: Tensor) -> Params:
        return {name: t.view(shapes[name]) for name, t in zip(shapes, v.split(numels), strict=True)}

    def flatten(tree: Params) -> Tensor:
        return torch.cat([t.reshape(-1) for t in tree.values()])

    return unflatten, flatten


def _output_loss(loss: str, y: Tensor, out: Tensor, scale: float) -> Callable[[Tensor], Tensor]:
    """``ell(out)`` summed over the batch and times c, as a function of the outputs (n, k)."""
    if loss == "mse":
        targets = square_loss_targets(y, out)
        return lambda o: scale * 0.5 * (o - targets).pow(2).sum()
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"y must hold integer class labels for loss='cross_entropy', got dtype {y.dtype}")
    labels = y.reshape(-1)
    if labels.numel() != out.shape[0]:
        raise ValueError(f"y has {labels.numel()} labels for {out.shape[0]} inputs; give one label per input")
    k = out.shape[1]
    top = 2 if k == 1 else k
    if labels.numel() and (labels.min() < 0 or labels.max() >= top):
        raise ValueError(
            f"y holds labels {int(labels.min())}..{int(labels.max())}; a model with {k} outputs needs "
            f"0..{top - 1}"
        )
    if k == 1:
        binary = labels.to(out.dtype)
        return lambda o: scale * F.binary_cross_entropy_with_logits(o[:, 0], binary, reduction="sum")
    classes = labels.long()
    return lambda o: scale * F.cross_entropy(o, classes, reduction="sum")


def loss_sharpness(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    loss: LossName = "mse",
    k: int = 1,
    reduction: ReductionName | None = None,
    gauss_newton: bool = True,
    generator: torch.Generator | None = None,
    tol: float = 1e-6,
    max_iter: int = 100,
) -> Sharpness:
    """The k largest eigenvalues of the loss Hessian on the batch ``(x, y)`` (docs/math.md 2.9).

    See the module docstring for the losses and the Gauss-Newton part. The defaults match the package's
    LightningModules: ``"mse"`` is the summed 1/2 ||f - y||^2 of docs/math.md 2.2 (c = 1, the NTK identity
    holds as it stands), ``"cross_entropy"`` the batch mean (c = 1/n) as in ``F.cross_entropy``.

    Args:
        model: any ``nn.Module`` mapping (n, ...) to (n, k_out); w = every parameter with ``requires_grad``.
        x: the batch inputs (n, ...).
        y: targets: for ``"mse"`` floats shaped like the output, or integer class labels (one-hot for
            k_out > 1, +/-1 for k_out = 1, as the package's models encode them); for ``"cross_entropy"``
            integer labels (n,) in 0..k_out-1 (0/1 with one output: binary cross-entropy with logits).
        loss: ``"mse"`` or ``"cross_entropy"``.
        k: how many of the largest eigenvalues (1 <= k <= number of parameters).
        reduction: ``"sum"`` or ``"mean"`` over the batch; default ``"sum"`` for mse and ``"mean"`` for
            cross-entropy.
        gauss_newton: also compute the Gauss-Newton part's top eigenvalue.
        generator: source of the Lanczos start vectors (default: a CPU generator seeded with 0).
        tol, max_iter: Lanczos tolerance (relative to the spectrum's scale) and step limit.

    Returns:
        A :class:`Sharpness` (values in the parameters' dtype, on their device).

    Raises:
        ValueError: an unknown loss or reduction, a bad ``k``, ``y`` not matching the outputs, inputs the
            model cannot take, or a model with no trainable parameters.
    """
    if loss not in ("mse", "cross_entropy"):
        raise ValueError(f"loss must be 'mse' or 'cross_entropy', got {short_repr(loss)}")
    if reduction is None:
        reduction = "sum" if loss == "mse" else "mean"
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {short_repr(reduction)}")
    if not isinstance(y, Tensor):
        raise ValueError(f"y must be a tensor of targets, got {type(y).__name__}")
    check_probes(x)
    params = trainable_parameters(model)
    size = num_parameters(params)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= size:
        raise ValueError(
            f"k must be an integer in 1..{size} (the number of trainable parameters), got {short_repr(k)}"
        )
    out = evaluate(model, x)
    if y.shape[0] != out.shape[0]:
        raise ValueError(
            f"y has {y.shape[0]} rows but x has {out.shape[0]} inputs; give one target per input"
        )
    check_differentiable(model, x)
    first = next(iter(params.values()))
    dtype, device = first.dtype, first.device
    y = y.to(device)
    ell = _output_loss(loss, y, out, 1.0 if reduction == "sum" else 1.0 / out.shape[0])
    f = functional_model(model)
    unflatten, flatten = _flat_tools(params)
    if generator is None:
        generator = torch.Generator().manual_seed(0)

    loss_gradient = grad(lambda p: ell(f(p, x)))

    def hessian_vector(v: Tensor) -> Tensor:
        return flatten(jvp(loss_gradient, (params,), (unflatten(v),))[1])

    def solve(matvec: Callable[[Tensor], Tensor], count: int, what: str) -> TopEigen:
        try:
            return lanczos_largest(
                matvec,
                size,
                count,
                generator=generator,
                dtype=dtype,
                device=device,
                tol=tol,
                max_iter=max_iter,
            )
        except FloatingPointError as err:
            raise FloatingPointError(
                f"a {what}-vector product of {type(model).__name__} is non-finite: the loss's second "
                f"derivatives overflow or are undefined at these parameters"
            ) from err

    hessian = solve(hessian_vector, k, "Hessian")
    eigenvalues = torch.full((k,), float("nan"), dtype=dtype, device=device)
    converged = torch.zeros(k, dtype=torch.bool, device=device)
    eigenvalues[: len(hessian.eigenvalues)] = hessian.eigenvalues
    converged[: len(hessian.converged)] = hessian.converged
    num_hvps = hessian.num_matvecs

    gn_max, gn_converged = torch.tensor(float("nan"), dtype=dtype, device=device), False
    if gauss_newton:
        _, pullback = vjp(lambda p: f(p, x), params)
        output_gradient = grad(ell)

        def gauss_newton_vector(v: Tensor) -> Tensor:
            jv = jvp(lambda p: f(p, x), (params,), (unflatten(v),))[1]
            curvature = jvp(output_gradient, (out,), (jv,))[1]
            return flatten(pullback(curvature)[0])

        top = solve(gauss_newton_vector, 1, "Gauss-Newton")
        gn_max, gn_converged, num_hvps = (
            top.eigenvalues[0],
            bool(top.converged[0]),
            num_hvps + top.num_matvecs,
        )

    if not bool(converged.all()) or (gauss_newton and not gn_converged):
        warnings.warn(
            f"loss_sharpness: Lanczos did not reach tol={tol} within max_iter={max_iter} steps; the values "
            f"are lower bounds (see .converged, or raise max_iter)",
            ConvergenceWarning,
            stacklevel=2,
        )
    return Sharpness(eigenvalues, gn_max, converged, gn_converged, num_hvps, loss, reduction)
