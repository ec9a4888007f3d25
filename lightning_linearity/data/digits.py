"""scikit-learn's bundled 8x8 digits: the package's offline default data set."""

from __future__ import annotations

import numpy as np
import torch

from lightning_linearity.data._base import InMemoryDataModule, Split
from lightning_linearity.data._preprocess import (
    Normalization,
    balanced_order,
    carve,
    check_class_indices,
    check_int,
    check_normalize,
    normalize_splits,
    select_classes,
    split_sizes,
)

NUM_CLASSES = 10
NUM_FEATURES = 64


class DigitsDataModule(InMemoryDataModule):
    """The 1797 8x8 hand-written digits of ``sklearn.datasets.load_digits`` (64 features, 10 classes).

    The data ships with scikit-learn, so this works offline; with ``classes=[0, 1]`` and
    ``num_samples=10`` or ``20`` it stands in for the papers' CIFAR-2 experiments.

    Splits are carved from the points of the chosen classes in a seeded, class-balanced round-robin
    order (see ``balanced_order``): first the ``num_samples`` training points, then ``num_val`` validation
    points, then ``num_test`` test points. Increasing ``num_samples`` only adds training points. Labels of a
    class subset are re-mapped to ``0..C-1`` in the order given (``classes=[7, 3]``: 7 -> 0, 3 -> 1).

    Args:
        classes: digits to keep, e.g. ``[0, 1]``; ``None`` for all ten.
        num_samples: number of training points, class-balanced where the class counts allow; ``None``
            for every point not held out.
        num_val: validation points; default a fifth of the chosen classes' points (capped by what
            ``num_samples`` leaves).
        num_test: test points, after the validation points; same default as ``num_val``.
        normalize: ``"standard"`` (per-feature zero mean and unit variance fitted on the training split;
            features constant on it become 0 in every split), ``"sphere"`` (each sample scaled to norm
            sqrt(64) = 8, so NTK pre-activations stay O(1)) or ``"none"`` (raw grey levels 0..16).
        seed: seed for the choice of points (``numpy.random.default_rng``) and the loaders' shuffling.
        batch_size: points per batch.
        full_batch: every loader yields its whole split as one batch (full-batch gradient descent).
        shuffle: reshuffle the training split every epoch.
        num_workers: ``DataLoader`` worker processes.

    Raises:
        ValueError: for an unknown or repeated class, sizes that do not fit, or a bad ``normalize``.
    """

    def __init__(
        self,
        classes: list[int] | None = None,
        num_samples: int | None = None,
        num_val: int | None = None,
        num_test: int | None = None,
        normalize: Normalization = "standard",
        seed: int = 0,
        batch_size: int = 64,
        full_batch: bool = False,
        shuffle: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            batch_size=batch_size, full_batch=full_batch, shuffle=shuffle, num_workers=num_workers, seed=seed
        )
        self.save_hyperparameters()
        self.classes = check_class_indices(classes, NUM_CLASSES, source="the digits data set")
        self.num_samples = check_int("num_samples", num_samples, minimum=1, allow_none=True)
        self.num_val = check_int("num_val", num_val, minimum=0, allow_none=True)
        self.num_test = check_int("num_test", num_test, minimum=0, allow_none=True)
        self.normalize = check_normalize(normalize)
        self._declare(NUM_FEATURES, num_classes=len(self.classes))

    def _materialise(self) -> tuple[Split, Split, Split]:
        from sklearn.datasets import load_digits  # deferred: importing sklearn.datasets takes ~0.5 s

        x_all, y_all = load_digits(return_X_y=True)
        kept, labels = select_classes(y_all, self.classes)
        available = len(kept)
        sizes = split_sizes(
            available,
            num_samples=self.num_samples,
            num_val=self.num_val,
            num_test=self.num_test,
            default_val=available // 5,
            default_test=available // 5,
            source=f"the digits data set for classes {self.classes}",
        )
        order = balanced_order(labels, len(self.classes), np.random.default_rng(self.seed))
        parts = carve(order, sizes)
        xs = normalize_splits(self.normalize, *(x_all[kept[idx]] for idx in parts))
        return tuple(
            Split(torch.from_numpy(x), torch.from_numpy(labels[idx]))
            for x, idx in zip(xs, parts, strict=True)
        )
