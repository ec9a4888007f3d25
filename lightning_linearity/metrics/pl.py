"""The PL* condition through the NTK spectrum (docs/math.md 2.2; 004 Section 4, Eq. 15-16).

For the square loss L(w) = 1/2 sum_i ||f(w; x_i) - y_i||^2 on the probe set, with r = f(w; X) - Y flattened
in the NTK's index order i*k + a,

    ||grad L(w)||^2 = r^T K(w) r  >=  lambda_min(K(w)) ||r||^2 = 2 lambda_min(K(w)) L(w),

so mu = lambda_min(K) is a PL* constant on the probe set. If n*k exceeds the number of parameters, K has
rank below n*k and lambda_min = 0 (the bound is then vacuous, not violated).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_linearity.metrics._functional import (
    check_differentiable,
    check_finite,
    check_probes,
    evaluate,
    functional_model,
    trainable_parameters,
)

__all__ = ["KernelSpectrum", "kernel_spectrum", "pl_ratio", "square_loss_targets"]


def square_loss_targets(y: Tensor, out: Tensor) -> Tensor:
    """Targets Y of the square loss 1/2 ||f(w; X) - Y||^2 (docs/math.md 2.2) for outputs ``out`` (n, k).

    Float targets are taken as they are (reshaped to (n, k)); integer class labels become one-hot rows
    (k > 1) or +/-1 (k = 1, two classes labelled 0 and 1).

    Raises:
        ValueError: labels that do not fit the outputs, targets of another size than the outputs, boolean
            or complex targets, NaN or inf targets, or ``out`` that is not an (n, k) tensor.
    """
    for name, value in (("y", y), ("out", out)):
        if not isinstance(value, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(value).__name__}")
    if out.dim() != 2:
        raise ValueError(f"out must be the model output of shape (n, k), got shape {tuple(out.shape)}")
    if y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"y has dtype {y.dtype}; use integer class labels or real (float) regression values")
    if y.dtype.is_floating_point:
        if y.numel() != out.numel():
            raise ValueError(
                f"targets of shape {tuple(y.shape)} do not match outputs of shape {tuple(out.shape)}"
            )
        if not torch.isfinite(y).all():
            bad = int((~torch.isfinite(y)).sum())
            raise ValueError(f"y has {bad} NaN or inf targets; drop those points or impute their targets")
        return y.reshape(out.shape).to(out.dtype)
    if y.numel() != out.shape[0]:
        raise ValueError(f"class labels of shape {tuple(y.shape)} for outputs of shape {tuple(out.shape)}")
    y = y.reshape(-1)
    if out.shape[1] == 1:
        if y.numel() and (y.min() < 0 or y.max() > 1):
            raise ValueError("a model with one output needs two classes labelled 0 and 1")
        return (2.0 * y.to(out.dtype) - 1.0).reshape(-1, 1)
    if y.numel() and (y.min() < 0 or y.max() >= out.shape[1]):
        labels = f"{int(y.min())}..{int(y.max())}"
        raise ValueError(f"labels {labels} do not fit a model with {out.shape[1]} outputs")
    return torch.nn.functional.one_hot(y.long(), out.shape[1]).to(out.dtype)


@dataclass(frozen=True)
class KernelSpectrum:
    """Summary of the spectrum of an NTK K (docs/math.md 2.2).

    Attributes:
        lambda_min: smallest eigenvalue, the PL* constant mu (0 up to rounding when n*k > #parameters).
        lambda_max: largest eigenvalue.
        condition_number: lambda_max / lambda_min; ``inf`` when lambda_min <= 0.
        trace: sum of the eigenvalues, i.e. sum_i ||grad f(x_i)||^2.
    """

    lambda_min: float
    lambda_max: float
    condition_number: float
    trace: float


def kernel_spectrum(kernel: Tensor) -> KernelSpectrum:
    """Eigenvalue summary of a symmetric kernel matrix (``torch.linalg.eigvalsh`` in float64).

    Raises:
        ValueError: ``kernel`` is not a real floating-point square matrix, is empty, or is not symmetric
            (up to rounding).
        FloatingPointError: it holds NaN or inf.
    """
    if not isinstance(kernel, Tensor) or kernel.dim() != 2 or kernel.shape[0] != kernel.shape[1]:
        shape = tuple(kernel.shape) if isinstance(kernel, Tensor) else type(kernel).__name__
        raise ValueError(f"the kernel must be a square matrix, got shape {shape}")
    if not kernel.is_floating_point():
        raise ValueError(f"the kernel must be a real floating-point matrix, got dtype {kernel.dtype}")
    if kernel.shape[0] == 0:
        raise ValueError("the kernel is empty (no probe points)")
    check_finite(kernel, "the kernel")
    k64 = kernel.detach().to(torch.float64)
    scale = k64.abs().max()
    if (k64 - k64.T).abs().max() > 1e-5 * scale:
        raise ValueError("the kernel is not symmetric; pass the full NTK K(x, x), not a cross kernel")
    eigenvalues = torch.linalg.eigvalsh(k64)
    lambda_min, lambda_max = eigenvalues[0].item(), eigenvalues[-1].item()
    return KernelSpectrum(
        lambda_min=lambda_min,
        lambda_max=lambda_max,
        condition_number=lambda_max / lambda_min if lambda_min > 0 else math.inf,
        trace=torch.trace(k64).item(),
    )


def pl_ratio(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The realised PL ratio ||grad L(w)||^2 / (2 L(w)) of the square loss on a batch (docs/math.md 2.2).

    L(w) = 1/2 sum_i ||f(w; x_i) - y_i||^2 and grad L is the gradient with respect to every trainable
    parameter, computed directly by autograd (independently of K). Since ||grad L||^2 = r^T K r, the ratio
    is the Rayleigh quotient of K at the residual r, so it is always >= lambda_min(K) (up to rounding), and
    lambda_min = 0 by rank when n*k > #parameters. Neither the parameters nor their ``.grad`` change.

    Args:
        model: maps (n, ...) to (n, k).
        x: probe inputs, shape (n, ...).
        y: targets shaped like the output, (n, k); (n,) is accepted when k = 1.

    Returns:
        A scalar tensor in the output's dtype.

    Raises:
        ValueError: no trainable parameters, inputs the model cannot take, ``y`` of the wrong shape, or
            L(w) = 0 (the model interpolates y and the ratio is 0/0).
        FloatingPointError: NaN or inf in the output, the targets or the gradient.
    """
    check_probes(x)
    out = evaluate(model, x)
    column = out.shape[1] == 1 and isinstance(y, Tensor) and y.shape == out.shape[:1]
    if not isinstance(y, Tensor) or (y.shape != out.shape and not column):
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"y must be shaped like the model output {tuple(out.shape)}, got {shape}")
    target = check_finite(y, "the targets y").reshape(out.shape).to(dtype=out.dtype, device=out.device)
    check_differentiable(model, x)
    params = {name: p.requires_grad_() for name, p in trainable_parameters(model).items()}
    with torch.enable_grad():
        residual = functional_model(model)(params, x) - target
        loss = 0.5 * residual.pow(2).sum()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True, materialize_grads=True)
    loss = loss.detach()
    if loss == 0:
        raise ValueError("L(w) = 0: the model fits y exactly on the probe set; the ratio is undefined (0/0)")
    grad_norm_sq = check_finite(sum(g.pow(2).sum() for g in grads), "the gradient of the square loss")
    return grad_norm_sq / (2.0 * loss)
