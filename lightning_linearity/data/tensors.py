"""User data: in-memory tensors or arrays, a ``.npz`` archive or a ``.pt`` file of tensors."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_linearity._text import short_repr
from lightning_linearity.data._base import InMemoryDataModule, Split
from lightning_linearity.data._preprocess import (
    Normalization,
    balanced_order,
    carve,
    check_float32,
    check_int,
    check_normalize,
    check_unique,
    normalize_splits,
    select_classes,
    split_sizes,
)

NPZ_SUFFIXES = (".npz",)
TORCH_SUFFIXES = (".pt", ".pth")


def _reason(err: BaseException) -> str:
    """``Type: message`` of a loader's error in one line (torch's weights_only refusal spans several lines:
    keep the one that names what was refused)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if "weights_only" not in line and not line.startswith("Check the doc")]
    return f"{type(err).__name__}: {(useful or lines or [''])[0]}"


def _load_npz(path: Path, keys: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as err:  # a corrupted archive can fail as BadZipFile, ValueError, OSError, EOFError
        raise ValueError(f"{path}: not a readable NumPy .npz archive ({_reason(err)})") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{path}: expected a .npz archive of named arrays (np.savez), found a single .npy array"
        )
    with archive:
        missing = [k for k in keys if k not in archive.files]
        if missing:
            raise ValueError(
                f"{path}: no array named {missing} (it holds {sorted(archive.files)}); set x_key / y_key"
            )
        try:
            return archive[keys[0]], archive[keys[1]]
        except Exception as err:  # object arrays (pickles) are refused; a damaged member fails to decode
            raise ValueError(f"{path}: could not read arrays {list(keys)} ({_reason(err)})") from err


def _load_torch(path: Path, keys: tuple[str, str]) -> tuple[Any, Any]:
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupted zip, truncated file, or a pickle that weights_only refuses
        raise ValueError(
            f"{path}: not a readable torch file of tensors with weights_only=True ({_reason(err)})"
        ) from err
    if not isinstance(content, Mapping):
        raise ValueError(
            f"{path}: expected a dict of tensors with keys {list(keys)}, got {type(content).__name__}"
        )
    missing = [k for k in keys if k not in content]
    if missing:
        raise ValueError(
            f"{path}: no entry named {missing} (it holds {sorted(map(str, content))}); set x_key / y_key"
        )
    return content[keys[0]], content[keys[1]]


def load_xy_file(path: str | Path, x_key: str = "x", y_key: str = "y") -> tuple[Any, Any]:
    """Read ``(x, y)`` from a ``.npz`` archive or a ``.pt``/``.pth`` dict of tensors, without pickle.

    ``.npz`` files are read with ``numpy.load(..., allow_pickle=False)`` and ``.pt`` files with
    ``torch.load(..., weights_only=True)``, so neither can run code.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: for another suffix, a corrupted file or missing keys, naming the file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    keys = (x_key, y_key)
    if path.suffix in NPZ_SUFFIXES:
        return _load_npz(path, keys)
    if path.suffix in TORCH_SUFFIXES:
        return _load_torch(path, keys)
    raise ValueError(
        f"{path}: unsupported file type {path.suffix!r}; use {list(NPZ_SUFFIXES + TORCH_SUFFIXES)}"
    )


def _to_numpy(name: str, value: Any, source: str) -> np.ndarray:
    if isinstance(value, Tensor):
        if value.is_nested or value.is_quantized or value.layout != torch.strided:
            kind = "nested" if value.is_nested else "quantized" if value.is_quantized else str(value.layout)
            raise ValueError(f"{source}: {name} must be a dense tensor of real numbers, got a {kind} tensor")
        value = value.detach().cpu()
        if value.is_floating_point() and value.dtype not in (torch.float32, torch.float64):
            value = value.float()  # bfloat16 / float16 have no (exact) numpy twin
        return value.numpy()
    if isinstance(value, np.ndarray):
        return value
    raise ValueError(f"{source}: {name} must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}")


class TensorDataModule(InMemoryDataModule):
    """A data module for your own ``(x, y)`` data, in memory or in a file.

    Give either ``path`` (a ``.npz`` archive read with ``allow_pickle=False``, or a ``.pt``/``.pth`` dict
    of tensors read with ``weights_only=True``; arrays under ``x_key`` and ``y_key``) or in-memory ``x`` and
    ``y`` (tensors or arrays; see also :meth:`from_tensors`). The data is read in ``__init__`` so that
    ``in_features`` and friends are known at once.

    - ``x`` has shape (n, ...), any real dtype; it becomes float32 and keeps its per-sample shape, e.g.
      images (n, C, H, W) for a convolutional model (``flatten=True`` gives (n, C*H*W) for an MLP).
      ``in_features`` is the number of entries per sample, ``input_shape`` the per-sample shape.
    - ``y`` decides the task: an integer dtype means classification with class indices (int64, shape
      (n,)); a floating dtype means regression (float32, shape (n, k); a 1-d ``y`` becomes (n, 1)).

    For classification, ``classes`` keeps a subset re-mapped to ``0..C-1`` in the order given; otherwise
    labels must be ``>= 0`` and ``num_classes`` defaults to ``max(y) + 1``. Splits are carved in a seeded
    order (class-balanced round-robin for classification, a permutation for regression): ``num_samples``
    training points, then ``num_val``, then ``num_test``. By default every point is used for training.

    Args:
        path: ``.npz``, ``.pt`` or ``.pth`` file; ``None`` when passing ``x`` and ``y``.
        x_key: name of the inputs in the file.
        y_key: name of the targets in the file.
        classes: class labels to keep (classification only); ``None`` keeps all.
        num_classes: number of classes when ``classes`` is ``None`` (default ``max(y) + 1``).
        num_samples: training points; ``None`` for every point not held out.
        num_val: validation points.
        num_test: test points.
        normalize: ``"none"`` (default), ``"standard"`` (per-entry z-score fitted on the training split;
            constant entries become 0) or ``"sphere"`` (each sample scaled to norm sqrt(d), d entries).
        flatten: flatten each sample to a vector of ``in_features`` entries.
        seed: seed for the choice of points and the loaders' shuffling.
        batch_size: points per batch.
        full_batch: every loader yields its whole split as one batch (full-batch gradient descent).
        shuffle: reshuffle the training split every epoch.
        num_workers: ``DataLoader`` worker processes.
        x: in-memory inputs (instead of ``path``).
        y: in-memory targets (instead of ``path``).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: for a corrupted file, missing keys, shapes or dtypes that do not fit, non-finite
            values, unknown classes, sizes that do not fit or a bad ``normalize``.
    """

    def __init__(
        self,
        path: str | None = None,
        x_key: str = "x",
        y_key: str = "y",
        classes: list[int] | None = None,
        num_classes: int | None = None,
        num_samples: int | None = None,
        num_val: int = 0,
        num_test: int = 0,
        normalize: Normalization = "none",
        seed: int = 0,
        batch_size: int = 64,
        full_batch: bool = False,
        shuffle: bool = True,
        num_workers: int = 0,
        x: Any = None,
        y: Any = None,
        flatten: bool = False,
    ) -> None:
        super().__init__(
            batch_size=batch_size, full_batch=full_batch, shuffle=shuffle, num_workers=num_workers, seed=seed
        )
        self.save_hyperparameters(ignore=["x", "y"])
        self.num_samples = check_int("num_samples", num_samples, minimum=1, allow_none=True)
        self.num_val = check_int("num_val", num_val, minimum=0)
        self.num_test = check_int("num_test", num_test, minimum=0)
        self.normalize = check_normalize(normalize)
        if (path is None) == (x is None and y is None):
            raise ValueError("give either path (a .npz / .pt file) or both x and y, not both and not neither")
        if path is not None:
            if isinstance(path, torch.Tensor | np.ndarray):
                raise ValueError("path must be a file path; pass in-memory data as x=..., y=... (keywords)")
            if not isinstance(path, str | Path):
                raise ValueError(f"path must be a file path (str), got {short_repr(path)}")
            source = str(Path(path).expanduser())
            x, y = load_xy_file(path, x_key, y_key)
        else:
            source = "TensorDataModule(x=..., y=...)"
            if x is None or y is None:
                raise ValueError("in-memory data needs both x and y")
        self.source = source
        if not isinstance(flatten, bool):
            raise ValueError(f"flatten must be True or False, got {short_repr(flatten)}")
        x = _to_numpy("x", x, source)
        #: the shape of one sample as the loaders yield it
        self.input_shape: tuple[int, ...] = (math.prod(x.shape[1:]),) if flatten else tuple(x.shape[1:])
        self._x, self._y = self._check_xy(x, _to_numpy("y", y, source))
        if self._y.dtype == np.int64:
            self._prepare_classes(classes, num_classes)
            self._declare(self._x.shape[1], num_classes=self._num_classes)
        else:
            if classes is not None or num_classes is not None:
                raise ValueError(
                    f"{source}: classes / num_classes need integer labels, but y is floating (regression)"
                )
            self._declare(self._x.shape[1], target_dim=self._y.shape[1])

    @classmethod
    def from_tensors(cls, x: Tensor | np.ndarray, y: Tensor | np.ndarray, **kwargs: Any) -> TensorDataModule:
        """Build from in-memory inputs and targets; ``kwargs`` are the other constructor arguments."""
        return cls(x=x, y=y, **kwargs)

    def _check_xy(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        src = self.source
        if x.ndim < 2:
            raise ValueError(
                f"{src}: x must have shape (n, ...) with samples of 1 entry or more, got {x.shape}"
            )
        if (
            not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer))
            or x.dtype == np.bool_
        ):
            raise ValueError(f"{src}: x must hold real numbers (float or int), got dtype {x.dtype}")
        if x.shape[0] < 1 or math.prod(x.shape[1:]) < 1:
            raise ValueError(f"{src}: x is empty (shape {x.shape})")
        x = x.reshape(x.shape[0], -1).copy()  # flat while checked and normalised; our own copy
        if not np.isfinite(x).all():
            raise ValueError(f"{src}: x contains NaN or infinite values")
        if y.shape[:1] != x.shape[:1]:
            raise ValueError(
                f"{src}: x has {x.shape[0]} points but y has shape {y.shape}; they must match in dim 0"
            )
        if np.issubdtype(y.dtype, np.integer) and y.dtype != np.bool_:
            if y.ndim != 1:
                raise ValueError(f"{src}: integer (class index) targets must have shape (n,), got {y.shape}")
            if y.min() < 0:
                raise ValueError(f"{src}: class indices must be >= 0, found {y.min()}")
            if y.max() > np.iinfo(np.int64).max:
                raise ValueError(f"{src}: class index {y.max()} does not fit int64; labels must be 0..C-1")
            y = y.astype(np.int64)
        elif np.issubdtype(y.dtype, np.floating):
            if y.ndim == 1:
                y = y[:, None]
            if y.ndim != 2:
                raise ValueError(f"{src}: regression targets must have shape (n,) or (n, k), got {y.shape}")
            if not np.isfinite(y).all():
                raise ValueError(f"{src}: y contains NaN or infinite values")
            y = check_float32(y, f"{src}: y", "rescale the targets")
        else:
            raise ValueError(
                f"{src}: y has dtype {y.dtype}; "
                "use integer class indices (classification) or floats (regression)"
            )
        return x, y

    def _prepare_classes(self, classes: list[int] | None, num_classes: int | None) -> None:
        src, present = self.source, np.unique(self._y)
        if classes is not None:
            if num_classes is not None:
                raise ValueError(
                    f"{src}: give classes or num_classes, not both (classes fixes C = len(classes))"
                )
            if isinstance(classes, str | bytes) or not isinstance(classes, Sequence) or len(classes) == 0:
                raise ValueError(
                    f"{src}: classes must be a non-empty list of labels, got {short_repr(classes)}"
                )
            for c in classes:
                if isinstance(c, bool) or not isinstance(c, int | np.integer) or c not in present:
                    raise ValueError(
                        f"{src}: unknown class {c!r} in classes={list(classes)!r}; y holds {present.tolist()}"
                    )
            check_unique([int(c) for c in classes], classes)
            self.classes: list[int] | None = [int(c) for c in classes]
            self._num_classes = len(self.classes)
        else:
            largest = int(present.max())
            self.classes = None
            self._num_classes = (
                largest + 1 if num_classes is None else check_int("num_classes", num_classes, minimum=1)
            )
            if largest >= self._num_classes:
                raise ValueError(f"{src}: num_classes={num_classes} but y holds class index {largest}")

    def _materialise(self) -> tuple[Split, Split, Split]:
        x, y = self._x, self._y
        rng = np.random.default_rng(self.seed)
        if self.task == "classification":
            if self.classes is not None:
                kept, y = select_classes(y, self.classes)
                x = x[kept]
            order = balanced_order(y, self.out_features, rng)
        else:
            order = rng.permutation(len(y))
        sizes = split_sizes(
            len(y),
            num_samples=self.num_samples,
            num_val=self.num_val,
            num_test=self.num_test,
            default_val=0,
            default_test=0,
            source=self.source,
        )
        parts = carve(order, sizes)
        xs = normalize_splits(self.normalize, *(x[idx] for idx in parts))
        return tuple(
            Split(torch.from_numpy(xi).reshape(-1, *self.input_shape), torch.from_numpy(y[idx]))
            for xi, idx in zip(xs, parts, strict=True)
        )
