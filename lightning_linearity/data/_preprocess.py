"""Deterministic preprocessing shared by the data modules.

Argument checks, class subsets (re-mapped to ``0..C-1``), class-balanced split selection and input
normalisation. Everything here is plain NumPy; randomness only ever comes from a
``numpy.random.Generator`` passed in by the caller, never from a global RNG.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np

from lightning_linearity._text import short_repr

Normalization = Literal["standard", "sphere", "none"]
NORMALIZATIONS: tuple[str, ...] = get_args(Normalization)


# --------------------------------------------------------------------------------------------- checks
def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def check_int(
    name: str, value: object, *, minimum: int, maximum: int | None = None, allow_none: bool = False
) -> int | None:
    """Return ``value`` as an ``int`` if it is an integer in ``[minimum, maximum]`` (or ``None`` when
    allowed)."""
    if value is None and allow_none:
        return None
    if not _is_int(value) or value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" + ("" if maximum is None else f" and <= {_readable(maximum)}")
        allowed = f"an integer {bound}" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {allowed}, got {short_repr(value)}")
    return int(value)


def _readable(bound: int) -> str:
    """``2**64 - 1`` rather than its twenty digits."""
    power = (bound + 1).bit_length() - 1
    return f"2**{power} - 1" if power > 16 and bound + 1 == 2**power else str(bound)


def check_float32(array: np.ndarray, what: str, fix: str) -> np.ndarray:
    """``array`` as float32, or a one-line ``ValueError`` if a finite value overflows float32's range."""
    if array.dtype == np.float32:
        return array
    with np.errstate(over="ignore"):
        cast = array.astype(np.float32)
    if not np.isfinite(cast).all():
        raise ValueError(
            f"{what}: values beyond float32's range (|v| > {float(np.finfo(np.float32).max):.3g}); {fix}"
        )
    return cast


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise a ``ValueError`` listing them."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {short_repr(value)}")
    return value


def check_normalize(value: object) -> str:
    """Check a ``normalize`` argument (one of :data:`NORMALIZATIONS`)."""
    return check_choice("normalize", value, NORMALIZATIONS)


def check_class_indices(classes: Sequence[object] | None, num_total: int, *, source: str) -> list[int]:
    """Resolve a user's class subset given as indices into ``0..num_total-1``.

    ``None`` means all classes in their natural order. The returned order is the user's order: class
    ``classes[i]`` becomes label ``i``.
    """
    if classes is None:
        return list(range(num_total))
    if isinstance(classes, str | bytes) or not isinstance(classes, Sequence) or len(classes) == 0:
        raise ValueError(
            f"classes must be a non-empty list of class indices in 0..{num_total - 1} of {source} "
            f"(or None for all), got {short_repr(classes)}"
        )
    resolved = []
    for c in classes:
        if not _is_int(c) or not 0 <= c < num_total:
            raise ValueError(
                f"unknown class {c!r} in classes={list(classes)!r}: "
                f"{source} has class indices 0..{num_total - 1}"
            )
        resolved.append(int(c))
    check_unique(resolved, list(classes))
    return resolved


def check_unique(resolved: Sequence[int], given: Sequence[object]) -> None:
    """Raise if a class appears twice in a (resolved) class list."""
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"classes must not repeat a class, got {list(given)!r}")


# ------------------------------------------------------------------------------------ class subsets
def select_classes(labels: np.ndarray, classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Keep the points whose label is in ``classes`` and re-map labels to ``0..C-1``.

    Args:
        labels: integer labels of shape (N,).
        classes: the original labels to keep; ``classes[i]`` becomes label ``i``.

    Returns:
        ``(kept, new_labels)``: indices into ``labels`` of the kept points (ascending) and their new
        labels (int64).
    """
    labels = np.asarray(labels, dtype=np.int64)
    classes_arr = np.asarray(classes, dtype=np.int64)
    kept = np.flatnonzero(np.isin(labels, classes_arr))
    table = np.full(max(int(labels.max(initial=0)), int(classes_arr.max(initial=0))) + 1, -1, dtype=np.int64)
    table[classes_arr] = np.arange(len(classes_arr), dtype=np.int64)
    return kept, table[labels[kept]]


# ------------------------------------------------------------------------------------- split choice
def balanced_order(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """A seeded order of all points that interleaves the classes round-robin.

    Each class's points are shuffled with ``rng``; the order then takes the first point of class 0,
    of class 1, ..., of class C-1, then the second point of each class, and so on, skipping classes
    that have run out. Hence every prefix is as class-balanced as the class counts allow, and a
    longer prefix extends a shorter one (``num_samples=20`` contains the points of ``num_samples=10``).

    Args:
        labels: labels in ``0..num_classes-1``, shape (N,).
        num_classes: C.
        rng: the caller's generator.

    Returns:
        A permutation of ``0..N-1`` (int64).
    """
    labels = np.asarray(labels)
    index_parts, rank_parts, class_parts = [], [], []
    for c in range(num_classes):
        members = rng.permutation(np.flatnonzero(labels == c))
        index_parts.append(members)
        rank_parts.append(np.arange(len(members)))
        class_parts.append(np.full(len(members), c))
    indices = np.concatenate(index_parts).astype(np.int64)
    order = np.lexsort((np.concatenate(class_parts), np.concatenate(rank_parts)))
    return indices[order]


def _held_out(name: str, requested: int | None, default: int, left: int, source: str) -> int:
    if requested is None:
        return min(default, left)
    if requested > left:
        raise ValueError(
            f"{name}={requested} is more than the {left} points of {source} left after the earlier "
            f"splits; use at most {left}"
        )
    return requested


def split_sizes(
    available: int,
    *,
    num_samples: int | None,
    num_val: int | None,
    num_test: int | None,
    default_val: int,
    default_test: int,
    source: str,
) -> tuple[int, int, int]:
    """Sizes of the train / val / test splits carved (in that order) from ``available`` points.

    With ``num_samples`` given, the held-out splits default to ``default_val`` / ``default_test``
    capped by what is left; with ``num_samples=None`` training gets every point not held out.

    Raises:
        ValueError: if the requested sizes do not fit, naming the argument and the limit.
    """
    if num_samples is not None:
        if num_samples > available:
            raise ValueError(
                f"num_samples={num_samples} is more than the {available} points available in {source}; "
                f"use 1..{available} (or None for every point not held out)"
            )
        left = available - num_samples
        n_val = _held_out("num_val", num_val, default_val, left, source)
        n_test = _held_out("num_test", num_test, default_test, left - n_val, source)
        return num_samples, n_val, n_test
    n_val = default_val if num_val is None else num_val
    n_test = default_test if num_test is None else num_test
    n_train = available - n_val - n_test
    if n_train < 1:
        raise ValueError(
            f"num_val={n_val} and num_test={n_test} leave no training points out of the {available} "
            f"available in {source}; together they may hold out at most {available - 1}"
        )
    return n_train, n_val, n_test


def carve(order: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    """Cut consecutive chunks of the given sizes from ``order``."""
    bounds = np.cumsum([0, *sizes])
    return [order[a:b] for a, b in itertools.pairwise(bounds)]


# ------------------------------------------------------------------------------------ normalisation
def _as_float(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return a if a.dtype in (np.float32, np.float64) else a.astype(np.float64)


def normalize_splits(kind: str, train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Normalise the inputs of all splits, fitting any statistics on ``train`` only.

    - ``"standard"``: ``(x - mean) / std`` per feature, mean and (population) std over the training
      split; features that are constant on the training split are set to 0 in every split.
    - ``"sphere"``: each sample scaled to Euclidean norm ``sqrt(d)`` (so each entry is O(1) and NTK
      pre-activations ``W x / sqrt(d)`` are O(1)); an all-zero sample stays zero.
    - ``"none"``: unchanged.

    Args:
        kind: one of :data:`NORMALIZATIONS`.
        train: training inputs of shape (n, d).
        *others: further splits of shape (n_i, d).

    Returns:
        ``[train, *others]`` normalised, as float32 arrays. Statistics are computed in float64; they are
        applied in the inputs' own precision (float64 for digits, float32 for the large CIFAR arrays).
    """
    check_normalize(kind)
    arrays = [_as_float(a) for a in (train, *others)]
    if kind == "standard":
        fit = arrays[0]
        if fit.shape[0] == 0:
            raise ValueError("normalize='standard' needs at least one training point")
        mean = fit.mean(axis=0, dtype=np.float64)
        constant = fit.max(axis=0) == fit.min(axis=0)
        scale = np.where(constant, 1.0, fit.std(axis=0, dtype=np.float64))
        mean, scale = mean.astype(fit.dtype), scale.astype(fit.dtype)
        arrays = [np.where(constant, 0.0, (a - mean) / scale).astype(a.dtype, copy=False) for a in arrays]
    elif kind == "sphere":
        out = []
        for a in arrays:
            norms = np.sqrt(np.einsum("ij,ij->i", a, a, dtype=np.float64))[:, None]
            factor = np.divide(np.sqrt(a.shape[1]), norms, out=np.zeros_like(norms), where=norms > 0)
            out.append(a * factor.astype(a.dtype))
        arrays = out
    return [check_float32(a, "the inputs x", "rescale them") for a in arrays]
