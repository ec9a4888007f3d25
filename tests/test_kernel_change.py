"""Relative kernel change (docs/math.md 2.3) on closed-form cases."""

import math

import pytest
import torch

from lightning_linearity.metrics.kernel_change import relative_kernel_change


def random_psd(n, seed):
    a = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return a @ a.T


@pytest.mark.parametrize("ord", ["spectral", "fro"])
@pytest.mark.parametrize("eps", [0.0, 1e-3, 0.25, -0.5])
def test_scaled_kernel_changes_by_eps(ord, eps):
    kernel_0 = random_psd(6, 0)
    change = relative_kernel_change((1 + eps) * kernel_0, kernel_0, ord=ord)
    assert change.item() == pytest.approx(abs(eps), rel=1e-12, abs=1e-15)


def test_spectral_and_frobenius_on_a_diagonal_example():
    kernel_0 = torch.diag(torch.tensor([4.0, 3.0, 0.0], dtype=torch.float64))
    kernel_t = kernel_0 + torch.diag(torch.tensor([1.0, -2.0, 2.0], dtype=torch.float64))
    # ||diag(1, -2, 2)||_2 = 2, ||.||_F = 3; ||K_0||_2 = 4, ||K_0||_F = 5
    assert relative_kernel_change(kernel_t, kernel_0).item() == pytest.approx(2 / 4, rel=1e-14)
    assert relative_kernel_change(kernel_t, kernel_0, ord="fro").item() == pytest.approx(3 / 5, rel=1e-14)


def test_spectral_is_largest_singular_value_for_indefinite_change():
    kernel_0 = torch.eye(2, dtype=torch.float64)
    delta = torch.tensor([[0.0, 3.0], [3.0, 0.0]], dtype=torch.float64)  # eigenvalues +3 and -3
    assert relative_kernel_change(kernel_0 + delta, kernel_0).item() == pytest.approx(3.0, rel=1e-14)
    assert relative_kernel_change(kernel_0 + delta, kernel_0, "fro").item() == pytest.approx(
        math.sqrt(18) / math.sqrt(2), rel=1e-14
    )


def test_spectral_norm_of_symmetric_and_general_matrices_equals_the_svd():
    # symmetric kernels take eigvalsh, anything else the SVD: both equal the largest singular value
    kernel_0, kernel_t = random_psd(7, 2), random_psd(7, 3)
    general = kernel_t + torch.triu(torch.ones(7, 7, dtype=torch.float64))  # not symmetric
    for k_t in (kernel_t, general):
        expected = torch.linalg.svdvals(k_t - kernel_0)[0] / torch.linalg.svdvals(kernel_0)[0]
        assert relative_kernel_change(k_t, kernel_0).item() == pytest.approx(expected.item(), rel=1e-12)


def test_result_follows_dtype_of_kernel_t():
    kernel_0 = random_psd(4, 1).float()
    change = relative_kernel_change(1.5 * kernel_0, kernel_0)
    assert change.dtype == torch.float32 and change.dim() == 0
    assert change.item() == pytest.approx(0.5, rel=1e-6)


@pytest.mark.parametrize(
    ("kernel_t", "kernel_0", "kwargs", "match"),
    [(torch.eye(3), torch.eye(3), dict(ord="nuc"), "ord"),
     (torch.eye(3), torch.eye(2), {}, "same probe points"),
     (torch.ones(3), torch.ones(3), {}, "2-D"),
     (torch.eye(2), torch.zeros(2, 2), {}, "zero matrix")],
)  # fmt: skip
def test_bad_input(kernel_t, kernel_0, kwargs, match):
    with pytest.raises(ValueError, match=match):
        relative_kernel_change(kernel_t, kernel_0, **kwargs)


def test_non_finite_kernel():
    with pytest.raises(FloatingPointError, match="kernel_t"):
        relative_kernel_change(torch.full((2, 2), float("nan")), torch.eye(2))
