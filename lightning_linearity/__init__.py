"""lightning-linearity: watch wide networks transition to linearity in PyTorch Lightning.

Public API: the NTK-parameterised LightningModules :class:`NTKFCN`, :class:`NTKDenseNet` and
:class:`MaskedDAGNet`, the :class:`LinearityMonitor` callback, and the metric functions in
:mod:`lightning_linearity.metrics`.
"""

from lightning_linearity.callbacks import LinearityMonitor
from lightning_linearity.models import NTKFCN, LinearityModule, MaskedDAGNet, NTKDenseNet

__version__ = "0.2.0"

__all__ = ["NTKFCN", "LinearityModule", "LinearityMonitor", "MaskedDAGNet", "NTKDenseNet", "__version__"]
