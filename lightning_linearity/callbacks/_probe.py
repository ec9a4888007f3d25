"""The fixed probe set X = (x_1..x_n) of :class:`LinearityMonitor`'s metrics (docs/math.md section 2).

The probe set is chosen once, at the start of fit, and then held fixed (also across a resume, through the
callback's ``state_dict``). It is either given explicitly or read from the training data set, by index,
never by iterating the training loader: iterating would draw from the global random state (shuffling)
and, under DDP, would see only the rank's shard. Indexing the data set is deterministic and the same on
every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from lightning_linearity._compat import MisconfigurationException

ProbeSelection = Literal["first", "random"]
PROBE_SELECTIONS: tuple[str, ...] = ("first", "random")

#: Probe points taken from the training data when ``probe_size`` is not given.
DEFAULT_PROBE_SIZE = 32


@dataclass(frozen=True)
class ProbeSet:
    """Probe inputs ``x`` (n, ...) and, when the data has them, targets ``y`` (n, ...)."""

    x: Tensor
    y: Tensor | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def to(self, device: torch.device, dtype: torch.dtype) -> ProbeSet:
        """On ``device``, floating-point inputs cast to ``dtype`` (integer inputs such as token ids stay)."""
        x = self.x.to(device=device, dtype=dtype if self.x.is_floating_point() else self.x.dtype)
        return ProbeSet(x, None if self.y is None else self.y.to(device))

    def state_dict(self) -> dict[str, Tensor | None]:
        return {"x": self.x.detach().cpu(), "y": None if self.y is None else self.y.detach().cpu()}


def split_batch(batch: Any, source: str) -> ProbeSet:
    """A collated batch as a probe set: a tensor is ``x``; a tuple/list is ``(x, y, ...)``."""
    if isinstance(batch, Tensor):
        return ProbeSet(batch)
    if isinstance(batch, Sequence) and batch and isinstance(batch[0], Tensor):
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        return ProbeSet(batch[0], y)
    raise MisconfigurationException(
        f"LinearityMonitor cannot read probe inputs from {source}: its items collate to "
        f"{type(batch).__name__}, not a tensor or an (x, y) tuple; pass probe_data=x or (x, y) explicitly"
    )


def explicit_probe(data: Tensor | Sequence[Tensor], size: int | None) -> ProbeSet:
    """The first ``size`` points (all if ``None``) of the user's tensor ``x`` or pair ``(x, y)``."""
    probe = split_batch(data, "probe_data")
    if probe.x.dim() < 1 or len(probe) < 1:
        raise MisconfigurationException(
            f"probe_data holds no probe points (inputs of shape {tuple(probe.x.shape)})"
        )
    if probe.y is not None and probe.y.shape[0] != len(probe):
        raise MisconfigurationException(
            f"probe_data has {len(probe)} inputs but {probe.y.shape[0]} targets; give (x, y) of equal length"
        )
    if size is None:
        return probe
    if size > len(probe):
        raise MisconfigurationException(
            f"probe_size={size} is larger than probe_data, which holds {len(probe)} points"
        )
    return ProbeSet(probe.x[:size], None if probe.y is None else probe.y[:size])


def probe_from_loader(loader: Any, size: int, selection: ProbeSelection, seed: int) -> ProbeSet:
    """``size`` points of the training loader's data set: its first ones, or a random subset (``seed``).

    The items are collated with the loader's own ``collate_fn``. The caller isolates the global random
    state (a data set's ``__getitem__`` may draw random augmentations).
    """
    if not isinstance(loader, DataLoader):
        raise MisconfigurationException(
            f"LinearityMonitor takes probe points from a single training DataLoader, got "
            f"{type(loader).__name__}; pass probe_data=x or (x, y) explicitly"
        )
    dataset = loader.dataset
    if (
        isinstance(dataset, IterableDataset)
        or not isinstance(dataset, Dataset)
        or not hasattr(dataset, "__len__")
    ):
        raise MisconfigurationException(
            f"LinearityMonitor needs an indexable training data set with a length to choose probe points, "
            f"got {type(dataset).__name__}; pass probe_data=x or (x, y) explicitly"
        )
    available = len(dataset)
    if size > available:
        raise MisconfigurationException(
            f"probe_size={size} is larger than the training data, which holds {available} points"
        )
    if selection == "first":
        indices = list(range(size))
    else:
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randperm(available, generator=generator)[:size].sort().values.tolist()
    # a loader without automatic batching (batch_size=None) only converts items; stack them ourselves
    collate = loader.collate_fn if loader.batch_size is not None else default_collate
    return split_batch(
        collate([dataset[i] for i in indices]), f"the training data set {type(dataset).__name__}"
    )
