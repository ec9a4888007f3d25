"""Shared linear algebra for the metrics: batched symmetric eigen-solvers on matrix-free operators, chunking.

A *batched operator* is a callable ``matvec(v, active) -> A v``: ``v`` has shape (b, P) and holds one vector
for each batch element listed in ``active`` (a long tensor of indices into the batch of B independent
symmetric P x P matrices A_1..A_B); the result has the same shape, row j being ``A_{active[j]} v[j]``. The
solvers drop converged elements from ``active``, so a matvec is never spent on a finished problem, and they
count the matvecs (one per active element per step) for the benchmarks.

The Hessian of an NTK network's output is indefinite with a nearly +/- symmetric spectrum (docs/math.md
2.4), so the largest-magnitude eigenvalue must come from Lanczos, not from Rayleigh-quotient power
iteration, which stalls when the two extreme eigenvalues have nearly equal magnitude.
:func:`power_iteration` is kept as the reference the benchmark and the tests compare against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_linearity._text import short_repr

BatchedMatvec = Callable[[Tensor, Tensor], Tensor]


class ConvergenceWarning(UserWarning):
    """An iterative eigen-solver stopped at ``max_iter`` before meeting its tolerance."""


@dataclass(frozen=True)
class EigenResult:
    """Largest-magnitude eigenvalue estimates of a batch of symmetric operators.

    Attributes:
        eigenvalue: (B,) the signed estimate theta of the eigenvalue of largest magnitude.
        converged: (B,) bool, ``residual <= tol * |eigenvalue|`` (or the Krylov space was exhausted).
        residual: (B,) the residual norm ||A y - theta y|| of the unit estimate y (Lanczos: its
            three-term-recurrence value |beta_j s_j|). Some eigenvalue of A lies within it of theta.
        iterations: (B,) matvecs spent on each element.
        num_matvecs: total matvecs over the batch (``iterations.sum()``).
        vectors: (B, P) the unit Ritz vector of ``eigenvalue`` (unit in the solver's inner product), when
            :func:`lanczos` is asked for it; else ``None``.

    Both solvers raise ``FloatingPointError`` as soon as a product is non-finite.
    """

    eigenvalue: Tensor
    converged: Tensor
    residual: Tensor
    iterations: Tensor
    num_matvecs: int
    vectors: Tensor | None = None


def check_solver_options(tol: float, max_iter: int) -> None:
    """Raise ``ValueError`` unless ``tol > 0`` is a finite float and ``max_iter`` a positive integer."""
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not 0.0 < tol < float("inf"):
        raise ValueError(f"tol must be a positive finite number, got {short_repr(tol)}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {short_repr(max_iter)}")


def chunk_slices(n: int, chunk_size: int | None) -> list[slice]:
    """Consecutive slices covering ``range(n)``, each at most ``chunk_size`` long (one slice if ``None``)."""
    if chunk_size is None:
        return [slice(0, n)]
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {short_repr(chunk_size)}")
    return [slice(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]


def _check_finite_products(summary: Tensor) -> Tensor:
    """Raise ``FloatingPointError`` if ``summary`` (an inner product or norm of the latest products, which
    is non-finite whenever a product is) holds NaN or inf; else return it."""
    if not torch.isfinite(summary).all():
        raise FloatingPointError("a matrix-vector product of the operator is non-finite (NaN or inf)")
    return summary


def random_unit_vectors(
    batch: int, dim: int, *, generator: torch.Generator, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """(batch, dim) rows drawn uniformly from the unit sphere with ``generator`` (never the global RNG).

    The draw happens on the generator's device and is then moved to ``device``, so a CPU generator gives
    the same start vectors on every device.
    """
    v = torch.randn(batch, dim, generator=generator, dtype=dtype, device=generator.device).to(device)
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)


def _norm(w: Tensor, dual: Tensor) -> Tensor:
    """sqrt(<w, w>) = sqrt(w . G w) with ``dual`` = G w (``dual is w`` for the Euclidean product)."""
    if dual is w:
        return torch.linalg.vector_norm(w, dim=-1)
    return (w * dual).sum(dim=-1).clamp_min(0.0).sqrt()


def _reorthogonalize(w: Tensor, dual: Tensor, basis: Tensor, dual_basis: Tensor) -> Tensor:
    """Make each ``w[b]`` orthogonal to the rows of ``basis[b]`` in place; return the new norms.

    Orthogonal in the inner product <a, b> = a . G b, given by the duals ``dual`` = G w and
    ``dual_basis`` = G Q (the same tensors as ``w`` and ``basis`` for the Euclidean product, G = I); the
    dual is updated along with w, so G is never applied here. Classical Gram–Schmidt against the whole
    basis, repeated once more only if the first pass removed more than half of the squared norm (the DGKS
    criterion; "twice is enough", Parlett). After the three-term recurrence the first pass removes only
    rounding errors, so the repeat is rare.
    """
    norm = _norm(w, dual)
    for _ in range(2):
        # row-vector products (1 x P)(P x j) read the basis contiguously: several times faster than Q @ w
        row = w.unsqueeze(1)
        coefficients = torch.bmm(row, dual_basis.transpose(1, 2))  # <Q_i, w>
        row.baddbmm_(coefficients, basis, alpha=-1)
        if dual is not w:
            dual.unsqueeze(1).baddbmm_(coefficients, dual_basis, alpha=-1)
        previous, norm = norm, _norm(w, dual)
        if not (norm < previous / 2**0.5).any():
            break
    return norm


def _grow(stack: Tensor, capacity: int) -> Tensor:
    """``stack`` (b, j, P) copied into a new (b, capacity, P) tensor (rows past j uninitialised)."""
    grown = stack.new_empty(stack.shape[0], capacity, stack.shape[2])
    grown[:, : stack.shape[1]] = stack
    return grown


def lanczos(
    matvec: BatchedMatvec,
    batch: int,
    dim: int,
    *,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
    tol: float = 1e-6,
    max_iter: int = 100,
    gram: BatchedMatvec | None = None,
    start: Tensor | None = None,
    return_vectors: bool = False,
) -> EigenResult:
    """Largest-magnitude eigenvalue of B symmetric operators by Lanczos with full reorthogonalisation.

    For each element, with q_1 a random unit vector, step j computes

        w = A q_j - beta_{j-1} q_{j-1},  alpha_j = <q_j, w>,  w <- w - alpha_j q_j,
        w <- w - Q_j <Q_j, w>  (full reorthogonalisation),  beta_j = ||w||,  q_{j+1} = w / beta_j

    so that Q_j^T A Q_j = T_j, the tridiagonal matrix with diagonal alpha and off-diagonal beta. With the
    eigen-pairs (theta_i, s_i) of T_j, a Ritz value theta_i has the residual
    ||A Q_j s_i - theta_i Q_j s_i|| = |beta_j * s_i[j]|. The estimate is theta, the larger in magnitude of
    the two end Ritz values theta_min and theta_max, and the element stops when both ends have converged,

        max(|beta_j * s_min[j]|, |beta_j * s_max[j]|) <= tol * |theta|

    (then eigenvalues of A lie within ``tol * |theta|`` of both), or when the Krylov space is exhausted
    (j = dim, or beta_j = 0: T_j's eigenvalues are then exact). Waiting for both ends matters for spectra
    that are nearly symmetric about 0, like an NTK network's output Hessian (docs/math.md 2.4): one end can
    converge to, say, +0.319 while the other, heading for -0.325, has not yet; stopping on the larger
    Ritz value alone then reports 0.319 (seen on a width-64 FCN at tol 1e-3). Ritz values lie inside the
    spectrum, so |theta| never exceeds the true largest magnitude: a non-converged value is a lower bound.

    Args:
        matvec: the batched operator, see the module docstring.
        batch: B, the number of independent operators.
        dim: P, their dimension.
        generator: source of the random start vectors.
        dtype, device: of the Krylov vectors (those ``matvec`` takes and returns).
        tol: relative residual tolerance (> 0).
        max_iter: at most this many matvecs per element (capped at ``dim``).
        gram: the inner product <a, b> = a . G b as a batched operator ``v -> G v`` (symmetric positive
            semi-definite), for operators self-adjoint in it; ``None`` is the Euclidean product. The
            structured Hessian runs in coordinates of a small subspace whose vectors are not orthonormal
            (:mod:`~lightning_linearity.metrics._structured_hessian`). G is applied once per step; the
            start vectors are random coordinate vectors normalised in this product.
        start: (B, dim) start vectors (normalised here); default: B random unit vectors drawn from
            ``generator``. Drawing them for a larger batch and passing a subset lets a caller compute any
            subset of the elements with exactly the start vectors the whole batch would use.
        return_vectors: also return each element's Ritz vector Q_j s of the reported eigenvalue (formed
            when the element stops, before its Krylov basis is dropped).

    The small tridiagonal eigenproblems are solved in float64 on the CPU (one host sync per step, which
    the stopping test needs anyway).
    """
    check_solver_options(tol, max_iter)
    steps = min(max_iter, dim)
    active = torch.arange(batch)
    active_on_device = active.to(device)  # one tensor per active set: operators may cache on it

    def dual_of(v: Tensor) -> Tensor:
        return v if gram is None else gram(v, active_on_device)

    if start is None:
        q = random_unit_vectors(batch, dim, generator=generator, dtype=dtype, device=device)
    elif start.shape != (batch, dim):
        raise ValueError(f"start must have shape (batch, dim) = {(batch, dim)}, got {tuple(start.shape)}")
    else:
        q = start.to(device=device, dtype=dtype)
    q_dual = dual_of(q)
    if gram is not None or start is not None:
        start_norm = _norm(q, q_dual)[:, None]
        q = q / start_norm
        q_dual = q if gram is None else q_dual / start_norm
    q_previous, beta = torch.zeros_like(q), torch.zeros(batch, dtype=dtype, device=device)  # q_0, beta_0
    basis = torch.empty(batch, min(steps, 16), dim, dtype=dtype, device=device)  # Q, grown on demand
    dual_basis = basis if gram is None else torch.empty_like(basis)  # G Q
    alphas = torch.zeros(batch, steps, dtype=torch.float64)
    betas = torch.zeros(batch, steps, dtype=torch.float64)
    eigenvalue = torch.zeros(batch, dtype=torch.float64)
    residual = torch.full((batch,), float("inf"), dtype=torch.float64)
    converged = torch.zeros(batch, dtype=torch.bool)
    iterations = torch.zeros(batch, dtype=torch.long)
    vectors = torch.zeros(batch, dim, dtype=dtype, device=device) if return_vectors else None
    for j in range(steps):
        if j == basis.shape[1]:  # double the capacity of Q (and G Q)
            basis = _grow(basis, min(2 * j, steps))
            dual_basis = basis if gram is None else _grow(dual_basis, basis.shape[1])
        basis[:, j], dual_basis[:, j] = q, q_dual
        w = matvec(q, active_on_device)
        alpha = (q_dual * w).sum(dim=-1)
        w = w - alpha[:, None] * q - beta[:, None] * q_previous
        w_dual = dual_of(w)
        q_previous, beta = q, _reorthogonalize(w, w_dual, basis[:, : j + 1], dual_basis[:, : j + 1])
        alphas[active, j] = _check_finite_products(alpha.to("cpu", torch.float64))
        betas[active, j] = _check_finite_products(beta.to("cpu", torch.float64))
        iterations[active] += 1

        a, b = alphas[active, : j + 1], betas[active, :j]
        T = torch.diag_embed(a) + torch.diag_embed(b, offset=1) + torch.diag_embed(b, offset=-1)
        theta, S = torch.linalg.eigh(T)  # ascending: the two ends are the first and last Ritz values
        ends = torch.stack([theta[:, 0], theta[:, -1]], dim=-1)
        end_residuals = (betas[active, j, None] * torch.stack([S[:, j, 0], S[:, j, -1]], dim=-1)).abs()
        star = ends.abs().argmax(dim=-1, keepdim=True)
        theta, res = ends.gather(-1, star).squeeze(-1), end_residuals.gather(-1, star).squeeze(-1)
        both_ends = end_residuals.max(dim=-1).values <= tol * theta.abs()
        done = both_ends | (betas[active, j] == 0) | (j + 1 == dim)
        eigenvalue[active], residual[active] = theta, res
        converged[active] = done
        if return_vectors:
            finished = done | (j + 1 == steps)
            if finished.any():
                picked = torch.where(star[:, 0] == 0, 0, j)  # column of theta_min or theta_max in S
                ritz = S[torch.arange(len(picked)), :, picked][finished].to(device=device, dtype=dtype)
                vectors[active[finished].to(device)] = torch.einsum(
                    "bj,bjp->bp", ritz, basis[finished.to(device), : j + 1]
                )

        if done.all():
            break
        if done.any():
            keep = (~done).to(device)
            active = active[~done]
            active_on_device = active.to(device)
            basis, w, beta, q_previous = basis[keep], w[keep], beta[keep], q_previous[keep]
            dual_basis = basis if gram is None else dual_basis[keep]
            w_dual = w if gram is None else w_dual[keep]
        q = w / beta[:, None]
        q_dual = q if gram is None else w_dual / beta[:, None]
    return EigenResult(
        eigenvalue.to(device=device, dtype=dtype),
        converged.to(device),
        residual.to(device=device, dtype=dtype),
        iterations.to(device),
        int(iterations.sum()),
        vectors,
    )


def power_iteration(
    matvec: BatchedMatvec,
    batch: int,
    dim: int,
    *,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
    tol: float = 1e-6,
    max_iter: int = 100,
) -> EigenResult:
    """Largest-magnitude eigenvalue of B symmetric operators by Rayleigh-quotient power iteration.

    With v_1 a random unit vector, step t computes

        w = A v_t,   theta_t = v_t^T w,   r_t = ||w - theta_t v_t||,   v_{t+1} = w / ||w||

    and an element stops when ``r_t <= tol * |theta_t|``. If the two extreme eigenvalues are +lambda and
    -lambda, v_t never settles (it keeps both components), theta_t stays strictly inside (-lambda, lambda)
    and the residual does not fall: the element is reported as not converged. Arguments and result as for
    :func:`lanczos` (``max_iter`` is not capped here).
    """
    check_solver_options(tol, max_iter)
    v = random_unit_vectors(batch, dim, generator=generator, dtype=dtype, device=device)
    eigenvalue = torch.zeros(batch, dtype=dtype, device=device)
    residual = torch.full((batch,), float("inf"), dtype=dtype, device=device)
    converged = torch.zeros(batch, dtype=torch.bool, device=device)
    iterations = torch.zeros(batch, dtype=torch.long, device=device)
    active = torch.arange(batch, device=device)
    for _ in range(max_iter):
        w = matvec(v, active)
        theta = (v * w).sum(dim=-1)
        res = _check_finite_products(torch.linalg.vector_norm(w - theta[:, None] * v, dim=-1))
        eigenvalue[active], residual[active] = theta, res
        iterations[active] += 1
        done = res <= tol * theta.abs()
        converged[active] = done
        if done.all():
            break
        if done.any():
            active, w = active[~done], w[~done]
        v = w / torch.linalg.vector_norm(w, dim=-1, keepdim=True)
    return EigenResult(eigenvalue, converged, residual, iterations, int(iterations.sum()))


@dataclass(frozen=True)
class TopEigen:
    """The largest (algebraic) eigenvalues of one symmetric operator, from :func:`lanczos_largest`.

    Attributes:
        eigenvalues: (k,) Ritz values theta_1 >= ... >= theta_k (fewer than k only if the Krylov space was
            exhausted first).
        residuals: (k,) their residual norms |beta_j s_i[j]|: an eigenvalue lies within each of theta_i.
        converged: (k,) bool, ``residual <= tol * max |Ritz value|`` (or the Krylov space was exhausted).
        vectors: (k, P) the unit Ritz vectors, if asked for (else ``None``).
        num_matvecs: operator products spent.
    """

    eigenvalues: Tensor
    residuals: Tensor
    converged: Tensor
    vectors: Tensor | None
    num_matvecs: int


def lanczos_largest(
    matvec: Callable[[Tensor], Tensor],
    dim: int,
    k: int,
    *,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
    tol: float = 1e-6,
    max_iter: int = 100,
    return_vectors: bool = False,
) -> TopEigen:
    """The k largest (algebraic, not in magnitude) eigenvalues of one symmetric P x P operator.

    ``matvec(v) -> A v`` on vectors of ``dim`` entries. The recurrence is :func:`lanczos`'s (full
    reorthogonalisation, random unit start from ``generator``); after step j the k largest Ritz values
    theta_i of T_j, with residuals |beta_j s_i[j]|, stop the iteration once every residual is at most
    ``tol * max_i |theta_i|`` over all Ritz values (a relative tolerance on the spectrum's scale, so an
    eigenvalue near zero does not stall it), or when the Krylov space is exhausted. Ritz values never
    exceed the largest eigenvalue, so a non-converged theta_1 is a lower bound of lambda_max. One start
    vector sees each eigenvalue once: a repeated eigenvalue is reported once.
    """
    check_solver_options(tol, max_iter)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= dim:
        raise ValueError(f"k must be an integer in 1..{dim} (the operator's dimension), got {short_repr(k)}")
    steps = min(max(max_iter, k), dim)
    q = random_unit_vectors(1, dim, generator=generator, dtype=dtype, device=device)
    q_previous, beta = torch.zeros_like(q), torch.zeros(1, dtype=dtype, device=device)
    basis = torch.empty(1, min(steps, 16), dim, dtype=dtype, device=device)  # grown on demand
    alphas, betas = [], []
    num_matvecs = 0
    for j in range(steps):
        if j == basis.shape[1]:
            basis = _grow(basis, min(2 * j, steps))
        basis[:, j] = q
        w = matvec(q[0]).reshape(1, dim)
        num_matvecs += 1
        alpha = (q * w).sum(dim=-1)
        w = w - alpha[:, None] * q - beta[:, None] * q_previous
        q_previous, beta = q, _reorthogonalize(w, w, basis[:, : j + 1], basis[:, : j + 1])
        alphas.append(float(_check_finite_products(alpha.double().cpu())))
        betas.append(float(_check_finite_products(beta.double().cpu())))
        a, b = torch.tensor(alphas, dtype=torch.float64), torch.tensor(betas[:-1], dtype=torch.float64)
        T = torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)
        theta, S = torch.linalg.eigh(T)
        top = min(k, j + 1)
        values, residuals = theta.flip(0)[:top], (betas[-1] * S[j, :].flip(0)[:top]).abs()
        exhausted = betas[-1] == 0.0 or j + 1 == dim
        converged = torch.ones(top, dtype=torch.bool) if exhausted else residuals <= tol * theta.abs().max()
        if exhausted or (top == k and bool(converged.all())):
            break
        q = w / beta[:, None]
    vectors = None
    if return_vectors:
        vectors = S.flip(1)[:, :top].T.to(dtype=dtype, device=device) @ basis[0, : j + 1]
        vectors = vectors / torch.linalg.vector_norm(vectors, dim=-1, keepdim=True)
    return TopEigen(
        values.to(device=device, dtype=dtype),
        residuals.to(device=device, dtype=dtype),
        converged.to(device),
        vectors,
        num_matvecs,
    )
