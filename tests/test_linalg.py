"""Batched Lanczos and power iteration against dense eigendecompositions (torch.linalg.eigvalsh)."""

from __future__ import annotations

import pytest
import torch

from lightning_linearity.metrics._linalg import (
    chunk_slices,
    lanczos,
    power_iteration,
    random_unit_vectors,
)

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def dense_operator(matrices: torch.Tensor, calls: list[list[int]] | None = None):
    """The batched matvec of a stack of dense matrices, optionally recording which elements were asked for."""

    def matvec(v: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append(active.tolist())
        return torch.einsum("bij,bj->bi", matrices[active], v)

    return matvec


def largest_magnitude(matrices: torch.Tensor) -> torch.Tensor:
    eigenvalues = torch.linalg.eigvalsh(matrices)
    return eigenvalues.gather(-1, eigenvalues.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)


def random_symmetric(batch: int, dim: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    a = torch.randn(batch, dim, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return (a + a.transpose(1, 2)) / 2


def symmetric_with_spectrum(spectra: torch.Tensor, seed: int) -> torch.Tensor:
    """U diag(spectrum) U^T with a random orthogonal U, one per row of ``spectra``."""
    batch, dim = spectra.shape
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(batch, dim, dim, generator=gen, dtype=spectra.dtype))
    return u @ torch.diag_embed(spectra) @ u.transpose(1, 2)


def solve(solver, matrices, tol=1e-10, max_iter=500, seed=0, calls=None):
    batch, dim, _ = matrices.shape
    return solver(
        dense_operator(matrices, calls),
        batch,
        dim,
        generator=torch.Generator().manual_seed(seed),
        dtype=matrices.dtype,
        device=CPU,
        tol=tol,
        max_iter=max_iter,
    )


def test_lanczos_matches_dense_eigenvalues():
    matrices = random_symmetric(4, 60, seed=1)
    result = solve(lanczos, matrices)
    assert result.converged.all()
    torch.testing.assert_close(result.eigenvalue, largest_magnitude(matrices), rtol=1e-9, atol=0)
    assert (result.residual <= 1e-10 * result.eigenvalue.abs()).all()
    assert result.num_matvecs == int(result.iterations.sum())
    assert (result.iterations <= 60).all()


def test_lanczos_float32():
    matrices = random_symmetric(3, 80, seed=2, dtype=torch.float32)
    result = solve(lanczos, matrices, tol=1e-5)
    assert result.converged.all() and result.eigenvalue.dtype == torch.float32
    torch.testing.assert_close(
        result.eigenvalue, largest_magnitude(matrices.double()).float(), rtol=1e-5, atol=0
    )


def test_symmetric_extremes_lanczos_converges_power_iteration_does_not():
    # spectrum {+5, -5, a bulk in (-4, 4)}: the extremes have equal magnitude
    bulk = torch.linspace(-4, 4, 58, dtype=torch.float64)
    spectra = torch.cat([torch.tensor([5.0, -5.0], dtype=torch.float64), bulk]).expand(3, -1)
    matrices = symmetric_with_spectrum(spectra, seed=3)
    lz = solve(lanczos, matrices, tol=1e-8, max_iter=60)
    assert lz.converged.all()
    torch.testing.assert_close(
        lz.eigenvalue.abs(), torch.full((3,), 5.0, dtype=torch.float64), rtol=1e-8, atol=0
    )
    power = solve(power_iteration, matrices, tol=1e-8, max_iter=60)
    assert not power.converged.any()
    assert (power.iterations == 60).all()
    # its Rayleigh quotient is stuck strictly inside (-5, 5)
    assert (power.eigenvalue.abs() < 5.0 - 1e-3).all()


def test_lanczos_waits_for_both_ends_of_a_nearly_symmetric_spectrum():
    # +1 converges first (the start vector is rich in it); -1.03, barely present at the start, emerges later.
    # Stopping on the larger Ritz value alone would report 1.0 as the largest magnitude.
    bulk = torch.linspace(-0.6, 0.6, 60, dtype=torch.float64)
    spectrum = torch.cat([torch.tensor([1.0, -1.03], dtype=torch.float64), bulk])
    matrix = torch.diag(spectrum).unsqueeze(0)
    start = torch.cat([torch.tensor([1.0, 1e-4], dtype=torch.float64), torch.full((60,), 0.1)]).unsqueeze(0)
    result = lanczos(
        dense_operator(matrix), 1, 62, generator=torch.Generator(), dtype=torch.float64, device=CPU,
        tol=1e-3, max_iter=62, start=start,
    )  # fmt: skip
    assert result.converged.all()
    torch.testing.assert_close(
        result.eigenvalue, torch.tensor([-1.03], dtype=torch.float64), rtol=1e-3, atol=0
    )


def test_start_vectors_and_a_gram_operator():
    # A = G^-1 S with S symmetric is self-adjoint in <a, b> = a . G b; with G = R R^T (Cholesky) its
    # eigenvalues are those of the symmetric R^-1 S R^-T
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(6, 6, dtype=torch.float64, generator=gen) + 3 * torch.eye(6, dtype=torch.float64)
    gram_matrix = c.T @ c
    symmetric = random_symmetric(1, 6, seed=4)[0]
    operator = torch.linalg.solve(gram_matrix, symmetric)
    root = torch.linalg.cholesky(gram_matrix)
    similar = torch.linalg.solve_triangular(
        root, torch.linalg.solve_triangular(root, symmetric, upper=False).T, upper=False
    )
    expected = largest_magnitude(similar.unsqueeze(0))
    result = lanczos(
        dense_operator(operator.unsqueeze(0)), 1, 6, generator=torch.Generator().manual_seed(1),
        dtype=torch.float64, device=CPU, tol=1e-10, max_iter=6, gram=dense_operator(gram_matrix.unsqueeze(0)),
    )  # fmt: skip
    torch.testing.assert_close(result.eigenvalue, expected, rtol=1e-8, atol=0)
    with pytest.raises(ValueError, match="start must have shape"):
        lanczos(
            dense_operator(operator.unsqueeze(0)), 1, 6, generator=torch.Generator(), dtype=torch.float64,
            device=CPU, start=torch.ones(2, 6, dtype=torch.float64),
        )  # fmt: skip


def test_power_iteration_converges_with_a_spectral_gap():
    spectra = torch.cat([torch.tensor([-6.0]), torch.linspace(-3, 3, 39)]).double().expand(2, -1)
    matrices = symmetric_with_spectrum(spectra, seed=4)
    result = solve(power_iteration, matrices, tol=1e-9, max_iter=500)
    assert result.converged.all()
    torch.testing.assert_close(
        result.eigenvalue, torch.full((2,), -6.0, dtype=torch.float64), rtol=1e-8, atol=0
    )


def test_converged_elements_leave_the_batch():
    # element 0 has rank 1 (converges in <= 2 steps), element 1 needs many more
    spectra = torch.zeros(2, 50, dtype=torch.float64)
    spectra[0, 0] = 2.0
    spectra[1] = torch.linspace(-1, 3, 50, dtype=torch.float64)
    calls: list[list[int]] = []
    result = solve(lanczos, symmetric_with_spectrum(spectra, seed=5), calls=calls)
    assert result.converged.all()
    assert result.iterations[0] <= 2 < result.iterations[1]
    assert all(call == [1] for call in calls[int(result.iterations[0]) :])
    assert result.num_matvecs == sum(len(call) for call in calls)
    torch.testing.assert_close(result.eigenvalue, torch.tensor([2.0, 3.0], dtype=torch.float64))


def test_zero_operator_and_exhausted_krylov_space():
    zero = torch.zeros(1, 10, 10, dtype=torch.float64)
    for solver in (lanczos, power_iteration):
        result = solve(solver, zero)
        assert result.converged.all() and result.eigenvalue.item() == 0.0
    tiny = random_symmetric(2, 3, seed=6)  # dim 3: at most 3 steps, then the Ritz values are exact
    result = solve(lanczos, tiny, tol=1e-15, max_iter=100)
    assert result.converged.all() and (result.iterations <= 3).all()
    torch.testing.assert_close(result.eigenvalue, largest_magnitude(tiny))


def test_not_converged_is_a_lower_bound():
    matrices = random_symmetric(4, 200, seed=7)
    result = solve(lanczos, matrices, max_iter=5)
    assert not result.converged.any() and (result.iterations == 5).all()
    assert (result.eigenvalue.abs() <= largest_magnitude(matrices).abs() + 1e-12).all()


def test_non_finite_products_raise():
    matrices = random_symmetric(2, 10, seed=8)
    matrices[1, 0, 0] = float("nan")
    for solver in (lanczos, power_iteration):
        with pytest.raises(FloatingPointError, match="non-finite"):
            solve(solver, matrices)


def test_generator_is_the_only_source_of_randomness():
    matrices = random_symmetric(2, 40, seed=9)
    rng = torch.get_rng_state()
    first, second = (
        solve(lanczos, matrices, max_iter=4, seed=11),
        solve(lanczos, matrices, max_iter=4, seed=11),
    )
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(first.eigenvalue, second.eigenvalue)
    v = random_unit_vectors(3, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64, device=CPU)
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize(
    "tol, max_iter", [(0.0, 10), (-1e-3, 10), (float("nan"), 10), (1e-3, 0), (1e-3, 2.5)]
)
def test_bad_solver_options(tol, max_iter):
    for solver in (lanczos, power_iteration):
        with pytest.raises(ValueError, match=r"tol|max_iter"):
            solve(solver, random_symmetric(1, 4, seed=0), tol=tol, max_iter=max_iter)


def test_chunk_slices():
    assert chunk_slices(5, None) == [slice(0, 5)]
    assert chunk_slices(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            chunk_slices(5, bad)
