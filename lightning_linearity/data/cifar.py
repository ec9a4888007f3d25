"""CIFAR-10 from a local folder in the standard "python version" batch format (never downloaded)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lightning_linearity._text import short_repr
from lightning_linearity.data._base import InMemoryDataModule, Split
from lightning_linearity.data._preprocess import (
    Normalization,
    _is_int,
    balanced_order,
    carve,
    check_int,
    check_normalize,
    check_unique,
    normalize_splits,
    select_classes,
    split_sizes,
)
from lightning_linearity.data._safe_pickle import load_restricted_pickle

TRAIN_FILES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
NUM_CLASSES = 10
IMAGE_FEATURES = 3 * 32 * 32


def _get(content: dict, key: str) -> object:
    # Batches written by Python 2 have bytes keys; a re-pickled copy may have str keys.
    if key.encode() in content:
        return content[key.encode()]
    return content.get(key)


def _text(value: object) -> str:
    # A damaged file may hold bytes that are not UTF-8: shown escaped rather than failing to decode.
    return value.decode(errors="backslashreplace") if isinstance(value, bytes) else str(value)


def load_cifar10_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch safely and validate it.

    The file is unpickled with an allow-list of NumPy globals (see ``_safe_pickle``), so a tampered file
    cannot run code.

    Args:
        path: a ``data_batch_*`` or ``test_batch`` file.

    Returns:
        ``(data, labels)``: uint8 of shape (N, 3072) (the 32x32 red, green, blue planes, row-major) and
        int64 labels in 0..9 of shape (N,).

    Raises:
        FileNotFoundError: if the file is missing.
        ValueError: if it is corrupted, refers to a forbidden global, or lacks ``data``/``labels`` of the
            right type and shape; the message names the file.
    """
    content = load_restricted_pickle(path)
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a pickled dict (a CIFAR-10 batch), got {type(content).__name__}")
    data, labels = _get(content, "data"), _get(content, "labels")
    if data is None or labels is None:
        keys = sorted(_text(k) for k in content)
        raise ValueError(f"{path}: a CIFAR-10 batch needs the keys 'data' and 'labels', found {keys}")
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != IMAGE_FEATURES
    ):
        desc = (
            f"{data.dtype} array of shape {data.shape}"
            if isinstance(data, np.ndarray)
            else type(data).__name__
        )
        raise ValueError(f"{path}: 'data' must be a uint8 array of shape (N, {IMAGE_FEATURES}), got {desc}")
    if isinstance(labels, np.ndarray):
        labels_ok = labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer)
    else:
        labels_ok = isinstance(labels, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in labels
        )
    if not labels_ok:
        raise ValueError(f"{path}: 'labels' must be a list of ints, got {type(labels).__name__}")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != data.shape[0]:
        raise ValueError(f"{path}: {data.shape[0]} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(
            f"{path}: labels must lie in 0..{NUM_CLASSES - 1}, found {labels.min()}..{labels.max()}"
        )
    return data, labels


def load_cifar10_label_names(path: str | Path) -> list[str]:
    """Read the ten class names from a CIFAR-10 ``batches.meta`` file (safely, as above).

    Raises:
        FileNotFoundError: if the file is missing.
        ValueError: if it is corrupted or has no list of 10 names under ``label_names``.
    """
    content = load_restricted_pickle(path)
    names = _get(content, "label_names") if isinstance(content, dict) else None
    if (
        not isinstance(names, list)
        or len(names) != NUM_CLASSES
        or not all(isinstance(n, bytes | str) for n in names)
    ):
        raise ValueError(f"{path}: expected a dict with 'label_names', a list of {NUM_CLASSES} strings")
    return [_text(n) for n in names]


class CIFAR10DataModule(InMemoryDataModule):
    """CIFAR-10 read from a local folder of python batches; nothing is ever downloaded.

    The folder must hold ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and ``batches.meta`` as
    distributed in ``cifar-10-python.tar.gz`` (extracted). Every file is unpickled with an allow-list of
    NumPy globals, so a tampered file is refused instead of executed. Images become float32 vectors of
    3072 features (red, green, blue 32x32 planes) scaled to [0, 1], then normalised.

    Splits: the training split (``num_samples`` points, class-balanced, chosen with ``seed``) and the
    validation split (``num_val`` further points) come from the five training batches; the test split is
    the official test batch (``num_test`` class-balanced points of it, or all). With ``classes``
    (e.g. ``["airplane", "bird"]``, the CIFAR-2 of the papers) only those classes are kept and their labels
    re-mapped to ``0..C-1`` in the order given.

    Args:
        data_dir: folder holding the extracted batches (e.g. ``.../cifar-10-batches-py``).
        classes: class names (as in ``batches.meta``) or indices 0..9; ``None`` for all ten.
        num_samples: number of training points, class-balanced; ``None`` for every point not held out.
        num_val: validation points held out from the training batches; default a tenth of the chosen
            classes' training points (capped by what ``num_samples`` leaves).
        num_test: test points drawn class-balanced from the test batch; ``None`` for all of them.
        normalize: ``"standard"`` (per-feature z-score fitted on the training split; features constant on
            it become 0), ``"sphere"`` (each image scaled to norm sqrt(3072)) or ``"none"`` ([0, 1] pixels).
        seed: seed for the choice of points (``numpy.random.default_rng``) and the loaders' shuffling.
        batch_size: points per batch.
        full_batch: every loader yields its whole split as one batch.
        shuffle: reshuffle the training split every epoch.
        num_workers: ``DataLoader`` worker processes.

    Raises:
        FileNotFoundError: if ``data_dir`` or one of the seven files is missing.
        ValueError: for an unknown class, a bad size or ``normalize``, or a corrupted/unsafe file.
    """

    def __init__(
        self,
        data_dir: str,
        classes: list[str | int] | None = None,
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
        if not isinstance(data_dir, str | Path):
            raise ValueError(f"data_dir must be a folder path (str), got {short_repr(data_dir)}")
        self.data_dir = Path(data_dir).expanduser()
        if not self.data_dir.is_dir():
            raise FileNotFoundError(
                f"CIFAR-10 folder not found: {self.data_dir}. Point data_dir at the extracted "
                f"'cifar-10-batches-py' folder; this package never downloads data."
            )
        missing = [f for f in (*TRAIN_FILES, TEST_FILE, META_FILE) if not (self.data_dir / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"CIFAR-10 folder {self.data_dir} lacks {missing}; it needs data_batch_1..5, test_batch and "
                f"batches.meta (the python version of CIFAR-10)"
            )
        self.num_samples = check_int("num_samples", num_samples, minimum=1, allow_none=True)
        self.num_val = check_int("num_val", num_val, minimum=0, allow_none=True)
        self.num_test = check_int("num_test", num_test, minimum=0, allow_none=True)
        self.normalize = check_normalize(normalize)
        self.label_names = load_cifar10_label_names(self.data_dir / META_FILE)
        self.classes = self._resolve_classes(classes)
        self.class_names = [self.label_names[c] for c in self.classes]
        self._declare(IMAGE_FEATURES, num_classes=len(self.classes))

    def _resolve_classes(self, classes: Sequence[str | int] | None) -> list[int]:
        if classes is None:
            return list(range(NUM_CLASSES))
        if isinstance(classes, str | bytes) or not isinstance(classes, Sequence) or len(classes) == 0:
            raise ValueError(
                "classes must be a non-empty list of CIFAR-10 class names or indices, got "
                f"{short_repr(classes)}"
            )
        resolved = []
        for c in classes:
            if isinstance(c, str) and c in self.label_names:
                resolved.append(self.label_names.index(c))
            elif _is_int(c) and 0 <= c < NUM_CLASSES:
                resolved.append(int(c))
            else:
                raise ValueError(
                    f"unknown CIFAR-10 class {c!r} in classes={list(classes)!r}; use names from "
                    f"{self.label_names} or indices 0..{NUM_CLASSES - 1}"
                )
        check_unique(resolved, classes)
        return resolved

    def _materialise(self) -> tuple[Split, Split, Split]:
        train_parts = [load_cifar10_batch(self.data_dir / f) for f in TRAIN_FILES]
        pool_x = np.concatenate([d for d, _ in train_parts])
        pool_y = np.concatenate([lab for _, lab in train_parts])
        test_x, test_y = load_cifar10_batch(self.data_dir / TEST_FILE)
        num_classes = len(self.classes)

        kept, labels = select_classes(pool_y, self.classes)
        available = len(kept)
        n_train, n_val, _ = split_sizes(
            available,
            num_samples=self.num_samples,
            num_val=self.num_val,
            num_test=0,
            default_val=available // 10,
            default_test=0,
            source=f"the training batches of {self.data_dir} for classes {self.class_names}",
        )
        order = balanced_order(labels, num_classes, np.random.default_rng([self.seed, 0]))
        train_idx, val_idx = carve(order, (n_train, n_val))

        test_kept, test_labels = select_classes(test_y, self.classes)
        if self.num_test is not None and self.num_test > len(test_kept):
            raise ValueError(
                f"num_test={self.num_test} is more than the {len(test_kept)} test points of "
                f"{self.data_dir / TEST_FILE} for classes {self.class_names}; "
                f"use at most {len(test_kept)} (or None)"
            )
        test_order = balanced_order(test_labels, num_classes, np.random.default_rng([self.seed, 1]))
        if self.num_test is not None:
            test_order = test_order[: self.num_test]

        # Select while still uint8 (a full CIFAR-10 training set is 600 MB as float32).
        xs = [pool_x[kept[train_idx]], pool_x[kept[val_idx]], test_x[test_kept[test_order]]]
        ys = [labels[train_idx], labels[val_idx], test_labels[test_order]]
        xs = normalize_splits(self.normalize, *(x.astype(np.float32) / 255.0 for x in xs))
        return tuple(Split(torch.from_numpy(x), torch.from_numpy(y)) for x, y in zip(xs, ys, strict=True))
