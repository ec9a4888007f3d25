"""Argument checks shared by the networks: one-line ``ValueError``s that name the argument and the fix."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import numpy as np

from lightning_linearity._text import short_repr

#: Seeds are hashed as two 32-bit words (see ``dag.derived_generator``): larger ones would alias smaller ones.
SEED_LIMIT = 2**64


def _integer(value: Any) -> int | None:
    """``value`` as an int if it is an integer (Python or numpy), not a bool; else ``None``."""
    if isinstance(value, bool | np.bool_):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_positive_int(name: str, value: Any) -> int:
    number = _integer(value)
    if number is None or number < 1:
        raise ValueError(f"{name} must be a positive integer, got {short_repr(value)}")
    return number


def check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"{name} must be True or False, got {short_repr(value)}")
    return bool(value)


def check_seed(name: str, value: Any) -> int:
    number = _integer(value)
    if number is None or not 0 <= number < SEED_LIMIT:
        raise ValueError(f"{name} must be an integer in [0, 2**64) or None, got {short_repr(value)}")
    return number


def check_widths(value: Any) -> list[int]:
    """Hidden widths: a non-empty list of positive integers (a string or a single number is refused)."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence | np.ndarray) or len(value) == 0:
        raise ValueError(
            f"hidden_widths must be a non-empty list of positive integers, got {short_repr(value)}"
        )
    return [check_positive_int("every hidden width", w) for w in value]
