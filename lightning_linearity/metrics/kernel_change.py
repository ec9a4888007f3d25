"""Relative change of the NTK during training (docs/math.md 2.3; 004 Figure 2).

    kernel_change = ||K(w_t) - K(w_0)|| / ||K(w_0)||

with the spectral norm (largest singular value; the papers' matrix norm) by default, or the Frobenius norm.
K(w_0) is the kernel before the first optimiser step, kept by the caller; 004 Figure 2 reports the
maximum of this quantity over training steps.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightning_linearity._text import short_repr
from lightning_linearity.metrics._functional import check_finite

__all__ = ["relative_kernel_change"]

Norm = Literal["spectral", "fro"]
_MATRIX_NORM_ORD = {"spectral": 2, "fro": "fro"}


def relative_kernel_change(kernel_t: Tensor, kernel_0: Tensor, ord: Norm = "spectral") -> Tensor:
    """``||K_t - K_0|| / ||K_0||`` in the spectral (default) or Frobenius norm (docs/math.md 2.3).

    Args:
        kernel_t: the kernel K(w_t) at the current parameters.
        kernel_0: the reference kernel K(w_0), same shape, on the same probe points.
        ord: ``"spectral"`` (largest singular value) or ``"fro"``.

    Returns:
        A scalar tensor, computed in float64 and returned in ``kernel_t``'s dtype.

    Raises:
        ValueError: unknown ``ord``, matrices that are not 2-D, empty, not real floating point, of
            different shapes, or K_0 = 0.
        FloatingPointError: NaN or inf in either kernel.
    """
    if not isinstance(ord, str) or ord not in _MATRIX_NORM_ORD:
        raise ValueError(f"ord must be 'spectral' or 'fro', got {short_repr(ord)}")
    for name, kernel in (("kernel_t", kernel_t), ("kernel_0", kernel_0)):
        if not isinstance(kernel, Tensor) or kernel.dim() != 2:
            shape = tuple(kernel.shape) if isinstance(kernel, Tensor) else type(kernel).__name__
            raise ValueError(f"{name} must be a 2-D kernel matrix, got shape {shape}")
        if not kernel.is_floating_point():
            raise ValueError(f"{name} must be a real floating-point matrix, got dtype {kernel.dtype}")
        if kernel.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(kernel.shape)}); it needs a probe point or more")
        check_finite(kernel, name)
    if kernel_t.shape != kernel_0.shape:
        raise ValueError(
            f"kernel_t has shape {tuple(kernel_t.shape)} but kernel_0 has {tuple(kernel_0.shape)}; "
            f"compute both on the same probe points"
        )
    k_t = kernel_t.detach().to(dtype=torch.float64, device=kernel_0.device)
    k_0 = kernel_0.detach().to(torch.float64)
    reference = _matrix_norm(k_0, ord)
    if reference == 0:
        raise ValueError("kernel_0 is the zero matrix; the relative change is undefined")
    change = _matrix_norm(k_t - k_0, ord) / reference
    return change.to(dtype=kernel_t.dtype, device=kernel_t.device)


def _matrix_norm(matrix: Tensor, ord: Norm) -> Tensor:
    """The norm of a float64 matrix; the spectral norm of a symmetric one (every NTK, every difference of
    two) is max |eigenvalue|, from ``eigvalsh`` (about 3x faster than the SVD the general case needs)."""
    if ord == "spectral" and matrix.shape[0] == matrix.shape[1] and torch.equal(matrix, matrix.T):
        return torch.linalg.eigvalsh(matrix).abs().max()
    return torch.linalg.matrix_norm(matrix, ord=_MATRIX_NORM_ORD[ord])
