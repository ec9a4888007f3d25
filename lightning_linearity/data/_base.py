"""The shared base of the package's data modules: in-memory ``(x, y)`` tensors and their loaders."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lightning_linearity._compat import LightningDataModule
from lightning_linearity._text import short_repr
from lightning_linearity.data._preprocess import check_int

Task = Literal["classification", "regression"]


@dataclass(frozen=True)
class Split:
    """One split of a data set held in memory.

    Attributes:
        x: inputs, float32 of shape (n, d), or (n, ...) for data kept in its per-sample shape (images).
        y: targets: int64 class indices of shape (n,) for classification, float32 of shape (n, k) for
            regression.
    """

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])


class InMemoryDataModule(LightningDataModule, ABC):
    """Base class: a data set materialised once, deterministically, as tensors in memory.

    Subclasses check their arguments and declare the data's shape in ``__init__`` (through
    :meth:`_declare`, so a ``LightningCLI`` can link ``data.in_features`` to the model before any data is
    read) and build the splits in :meth:`_materialise`, which runs once, on the first :meth:`setup` or
    the first access to a split. Every batch is a tuple ``(x, y)`` as described in :class:`Split`.

    Loaders: training batches of ``batch_size`` points, reshuffled every epoch when ``shuffle`` (with a
    ``torch.Generator`` seeded by ``seed``, never the global RNG); validation, test and predict batches
    in a fixed order. ``full_batch=True`` makes every loader yield its whole split as one batch (full-batch
    gradient descent, as in the papers); ``shuffle`` is then moot. Under DDP Lightning shards each split
    across ranks, so a "full batch" is each rank's shard and the all-reduced gradient is the full-batch
    one. The predict loader iterates the test split. An empty split yields an empty list of batches.

    Attributes:
        in_features: input dimension d (x has shape (n, d)).
        num_classes: number of classes C, or ``None`` for regression.
        out_features: suggested number of model outputs: C for classification, the target dimension k
            for regression.
        task: ``"classification"`` or ``"regression"``.

    Args:
        batch_size: points per batch (ignored when ``full_batch``).
        full_batch: yield every split as a single batch.
        shuffle: reshuffle the training split every epoch.
        num_workers: ``DataLoader`` worker processes (0 loads in the main process; the data is already in
            memory, so workers rarely help).
        seed: seed of the loaders' own ``torch.Generator`` (subclasses use it for their data too).
    """

    in_features: int
    num_classes: int | None
    out_features: int
    task: Task

    def __init__(
        self,
        batch_size: int = 64,
        full_batch: bool = False,
        shuffle: bool = True,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.full_batch = _check_bool("full_batch", full_batch)
        self.shuffle = _check_bool("shuffle", shuffle)
        self.num_workers = check_int("num_workers", num_workers, minimum=0)
        self.seed = check_int("seed", seed, minimum=0, maximum=2**64 - 1)
        self._splits: tuple[Split, Split, Split] | None = None

    # ------------------------------------------------------------------------------- subclass API
    def _declare(
        self, in_features: int, *, num_classes: int | None = None, target_dim: int | None = None
    ) -> None:
        """Record the data's shape: pass ``num_classes`` (classification) or ``target_dim`` (regression)."""
        if (num_classes is None) == (target_dim is None):
            raise TypeError("_declare needs exactly one of num_classes and target_dim")
        self.in_features = int(in_features)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.out_features = int(num_classes if num_classes is not None else target_dim)  # type: ignore[arg-type]
        self.task = "classification" if num_classes is not None else "regression"

    @abstractmethod
    def _materialise(self) -> tuple[Split, Split, Split]:
        """Build the (train, val, test) splits. Called once; must be deterministic in the arguments."""

    # ------------------------------------------------------------------------------------- splits
    @override
    def setup(self, stage: str | None = None) -> None:
        """Materialise the splits (once; later calls, for any stage, reuse them)."""
        self._ensure_materialised()

    def _ensure_materialised(self) -> tuple[Split, Split, Split]:
        if self._splits is None:
            splits = self._materialise()
            for name, split in zip(("train", "val", "test"), splits, strict=True):
                self._check_split(name, split)
            self._splits = splits
        return self._splits

    def _check_split(self, name: str, split: Split) -> None:
        # Internal consistency: what a subclass built must match what it declared.
        x, y = split.x, split.y
        shape = getattr(self, "input_shape", (self.in_features,))
        if x.dtype != torch.float32 or tuple(x.shape[1:]) != tuple(shape):
            raise RuntimeError(
                f"{name} split: x must be float32 (n, {', '.join(map(str, shape))}), got {x.dtype} "
                f"{tuple(x.shape)}"
            )
        if self.task == "classification":
            ok = y.dtype == torch.int64 and y.shape == (len(split),)
            ok = ok and (len(split) == 0 or (int(y.min()) >= 0 and int(y.max()) < self.out_features))
        else:
            ok = y.dtype == torch.float32 and y.shape == (len(split), self.out_features)
        if not ok:
            raise RuntimeError(
                f"{name} split: targets do not match task={self.task!r}: {y.dtype} {tuple(y.shape)}"
            )

    @property
    def train_split(self) -> Split:
        """The training split (materialised on first access)."""
        return self._ensure_materialised()[0]

    @property
    def val_split(self) -> Split:
        """The validation split (materialised on first access)."""
        return self._ensure_materialised()[1]

    @property
    def test_split(self) -> Split:
        """The test split (materialised on first access)."""
        return self._ensure_materialised()[2]

    # ---------------------------------------------------------------------------------- loaders
    def _loader(self, split: Split, *, train: bool) -> DataLoader | list:
        n = len(split)
        if n == 0:
            return []
        # Every loader gets its own generator: even an unshuffled DataLoader draws a base seed from the
        # global RNG when it has none, which would silently change the user's RNG state.
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            TensorDataset(split.x, split.y),
            batch_size=n if self.full_batch else self.batch_size,
            shuffle=train and self.shuffle and not self.full_batch,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=generator,
        )

    @override
    def train_dataloader(self) -> DataLoader | list:
        """Batches of the training split (reshuffled each epoch when ``shuffle`` and not ``full_batch``)."""
        return self._loader(self.train_split, train=True)

    @override
    def val_dataloader(self) -> DataLoader | list:
        """Batches of the validation split, in a fixed order."""
        return self._loader(self.val_split, train=False)

    @override
    def test_dataloader(self) -> DataLoader | list:
        """Batches of the test split, in a fixed order."""
        return self._loader(self.test_split, train=False)

    @override
    def predict_dataloader(self) -> DataLoader | list:
        """Batches of the test split, in a fixed order (``(x, y)`` like every other loader)."""
        return self._loader(self.test_split, train=False)


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {short_repr(value)}")
    return value
