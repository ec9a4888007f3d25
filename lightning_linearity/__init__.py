"""lightning-linearity: watch wide networks transition to linearity in PyTorch Lightning."""

__version__ = "0.1.0"
