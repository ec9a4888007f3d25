"""Gaussian inputs x ~ N(0, I_d) (004 Assumption 4.1) with teacher or random regression targets."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from lightning_linearity._text import short_repr
from lightning_linearity.data._base import InMemoryDataModule, Split
from lightning_linearity.data._preprocess import check_choice, check_float32, check_int

Labels = Literal["teacher", "random"]

# Independent random streams: np.random.default_rng([seed, stream]) for the teacher and for each split's
# inputs, np.random.default_rng([seed, stream, _TARGETS]) for that split's noise or random targets. So
# num_samples=20 extends num_samples=10 (inputs and targets) and num_val never changes the training points.
_TEACHER, _TRAIN, _VAL, _TEST = 0, 1, 2, 3
_TARGETS = 1


def teacher_network(x: np.ndarray, w: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The teacher: a 1-hidden-layer tanh network in the NTK parameterisation (docs/math.md section 1).

        f(x) = V tanh(W x / sqrt(d)) / sqrt(m),    W in R^{m x d}, V in R^{k x m}, entries N(0, 1)

    Args:
        x: inputs of shape (n, d).
        w: first-layer weights (m, d).
        v: output weights (k, m).

    Returns:
        Targets of shape (n, k); each entry has variance E[tanh(z)^2] ~ 0.39 for z ~ N(0, 1).
    """
    hidden = np.tanh(x @ w.T / np.sqrt(w.shape[1]))
    return hidden @ v.T / np.sqrt(w.shape[0])


class GaussianDataModule(InMemoryDataModule):
    """Synthetic regression data with inputs x ~ N(0, I_d), as in 004 Assumption 4.1.

    Targets (float32, shape (n, out_features)):

    - ``labels="teacher"``: ``y = teacher(x) + noise * eps`` where the teacher is a fixed random
      1-hidden-layer tanh network in the NTK parameterisation, ``teacher(x) = V tanh(W x / sqrt(d)) /
      sqrt(m)`` with ``m = teacher_width`` and all entries of W, V i.i.d. N(0, 1) (see
      :func:`teacher_network`); ``eps ~ N(0, 1)``. The teacher is drawn from ``seed`` and shared by all
      splits.
    - ``labels="random"``: i.i.d. N(0, 1) targets, independent of x (pure memorisation).

    Random streams: the teacher's W, then V, come from ``numpy.random.default_rng([seed, 0])``; the inputs
    of the train / val / test splits from ``default_rng([seed, s])`` with s = 1 / 2 / 3, and their noise or
    random targets from ``default_rng([seed, s, 1])``. So the splits are independent and a larger
    ``num_samples`` extends the training set without changing its first points. Inputs are not normalised
    (they already satisfy the assumption).

    Args:
        in_features: input dimension d.
        num_samples: number of training points.
        num_val: number of validation points.
        num_test: number of test points.
        labels: ``"teacher"`` or ``"random"``.
        out_features: target dimension k.
        teacher_width: hidden width m of the teacher network.
        noise: standard deviation of Gaussian noise added to teacher targets (0 for none).
        seed: seed for inputs, teacher and noise, and for the loaders' shuffling.
        batch_size: points per batch.
        full_batch: every loader yields its whole split as one batch (full-batch gradient descent).
        shuffle: reshuffle the training split every epoch.
        num_workers: ``DataLoader`` worker processes.

    Raises:
        ValueError: for a non-positive size or width, a negative ``noise`` or an unknown ``labels``.
    """

    def __init__(
        self,
        in_features: int = 10,
        num_samples: int = 20,
        num_val: int = 100,
        num_test: int = 100,
        labels: Labels = "teacher",
        out_features: int = 1,
        teacher_width: int = 64,
        noise: float = 0.0,
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
        dim = check_int("in_features", in_features, minimum=1)
        self.num_samples = check_int("num_samples", num_samples, minimum=1)
        self.num_val = check_int("num_val", num_val, minimum=0)
        self.num_test = check_int("num_test", num_test, minimum=0)
        self.labels = check_choice("labels", labels, ("teacher", "random"))
        targets = check_int("out_features", out_features, minimum=1)
        self.teacher_width = check_int("teacher_width", teacher_width, minimum=1)
        if isinstance(noise, bool) or not isinstance(noise, int | float) or not 0 <= noise < math.inf:
            raise ValueError(f"noise must be a finite float >= 0, got {short_repr(noise)}")
        self.noise = float(noise)
        self._declare(dim, target_dim=targets)

    def _materialise(self) -> tuple[Split, Split, Split]:
        d, k = self.in_features, self.out_features
        teacher_rng = np.random.default_rng([self.seed, _TEACHER])
        w = teacher_rng.standard_normal((self.teacher_width, d))
        v = teacher_rng.standard_normal((k, self.teacher_width))
        splits = []
        for stream, n in ((_TRAIN, self.num_samples), (_VAL, self.num_val), (_TEST, self.num_test)):
            x = np.random.default_rng([self.seed, stream]).standard_normal((n, d))
            eps = np.random.default_rng([self.seed, stream, _TARGETS]).standard_normal((n, k))
            y = teacher_network(x, w, v) + self.noise * eps if self.labels == "teacher" else eps
            fix = f"noise={self.noise!r} is too large; use a noise level within float32's range"
            y = check_float32(y, "the targets", fix)
            splits.append(Split(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y)))
        return tuple(splits)
