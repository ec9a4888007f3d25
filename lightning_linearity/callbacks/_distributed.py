"""How :class:`LinearityMonitor` splits one metric round across ranks and puts the pieces back together.

Every rank holds the whole model (DDP) and the same probe set, so the work splits by probe point: rank r
takes a contiguous share of the n points (shares differ in size by at most one, and may be empty when
n < world size), computes the rows of its share (its row block of the NTK, the Hessian norms of its
points, the |cos| of its points), and an all-gather through the strategy's collective reassembles the
rows in probe order on every rank. All ranks then hold identical full results.

Collectives block until every rank joins, so a rank that failed locally must still join them, or skip
them together with the others: :func:`agree` lets the ranks agree on success before each collective
that a failure could skip.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightning.pytorch.strategies import Strategy


def probe_share(n: int, rank: int, world_size: int) -> slice:
    """The contiguous slice of the n probe points that rank ``rank`` of ``world_size`` computes."""
    return slice(rank * n // world_size, (rank + 1) * n // world_size)


def gather_rows(strategy: Strategy, rows: Tensor, n: int) -> Tensor:
    """All-gather the rows of every rank's :func:`probe_share` and concatenate them in probe order.

    ``rows`` has shape (share size, ...) with the same trailing shape on every rank; the result has
    shape (n, ...) and is the same on every rank. Shares are padded to a common size for the collective.
    """
    world_size = strategy.world_size
    if world_size == 1:
        return rows
    shares = [probe_share(n, r, world_size) for r in range(world_size)]
    padded = max(s.stop - s.start for s in shares)
    buffer = rows.new_zeros((padded, *rows.shape[1:]))
    buffer[: rows.shape[0]] = rows
    with warnings.catch_warnings():  # Lightning gathers through a torch function that warns it is deprecated
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated.*")
        gathered = strategy.all_gather(buffer)  # (world_size, padded, ...)
    return torch.cat([gathered[r, : s.stop - s.start] for r, s in enumerate(shares)])


@dataclass(frozen=True)
class Outcome:
    """What the ranks agreed on after a step that may have failed on some of them.

    Attributes:
        failed: the step failed on at least one rank (all ranks skip what depends on it).
        raisable: at least one of those failures was an error other than non-finite values (NaN/inf in
            the model is only ever reported, so only these honour ``on_error="raise"``).
    """

    failed: bool
    raisable: bool


def agree(strategy: Strategy, error: BaseException | None) -> Outcome:
    """The same :class:`Outcome` on every rank, from each rank's ``error`` (one all-reduce of two counts)."""
    counts = torch.tensor(
        [error is not None, error is not None and not isinstance(error, FloatingPointError)],
        dtype=torch.float32,
        device=strategy.root_device,
    )
    if strategy.world_size > 1:
        counts = strategy.reduce(counts, reduce_op="sum")
    return Outcome(failed=bool(counts[0] > 0), raisable=bool(counts[1] > 0))
