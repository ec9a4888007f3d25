"""lightning-linearity: watch wide networks transition to linearity in PyTorch Lightning."""

from lightning_linearity.models import LinearityModule, MaskedDAGNet, NTKDenseNet, NTKFCN

__version__ = "0.1.0"

__all__ = ["LinearityModule", "MaskedDAGNet", "NTKDenseNet", "NTKFCN", "__version__"]
