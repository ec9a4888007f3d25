"""LightningDataModules for transition-to-linearity experiments.

Every module holds its data in memory, builds it deterministically from its arguments (its own seeded
generators, never a global RNG) and yields batches ``(x, y)``: ``x`` float32 of shape (n, d); ``y`` int64
class indices 0..C-1 of shape (n,) for classification or float32 of shape (n, k) for regression.
``full_batch=True`` makes every loader yield its whole split as one batch (full-batch gradient descent).
After construction, ``in_features``, ``num_classes`` (``None`` for regression), ``out_features`` and
``task`` describe the data, e.g. for ``LightningCLI.link_arguments``.

- :class:`DigitsDataModule`: scikit-learn's bundled 8x8 digits (offline default; ``classes=[0, 1]`` and
  ``num_samples=10`` stand in for the papers' CIFAR-2).
- :class:`GaussianDataModule`: x ~ N(0, I_d) with teacher-network or random regression targets.
- :class:`CIFAR10DataModule`: CIFAR-10 python batches from a local folder, unpickled safely.
- :class:`TensorDataModule`: your own tensors, ``.npz`` or ``.pt`` file.
"""

from lightning_linearity.data._base import InMemoryDataModule, Split, Task
from lightning_linearity.data._preprocess import NORMALIZATIONS, Normalization
from lightning_linearity.data._safe_pickle import UnsafePickleError
from lightning_linearity.data.cifar import CIFAR10DataModule, load_cifar10_batch, load_cifar10_label_names
from lightning_linearity.data.digits import DigitsDataModule
from lightning_linearity.data.gaussian import GaussianDataModule, teacher_network
from lightning_linearity.data.tensors import TensorDataModule, load_xy_file

__all__ = [
    "NORMALIZATIONS",
    "CIFAR10DataModule",
    "DigitsDataModule",
    "GaussianDataModule",
    "InMemoryDataModule",
    "Normalization",
    "Split",
    "Task",
    "TensorDataModule",
    "UnsafePickleError",
    "load_cifar10_batch",
    "load_cifar10_label_names",
    "load_xy_file",
    "teacher_network",
]
