"""Lightning callbacks of lightning-linearity."""

from lightning_linearity.callbacks.linearity_monitor import LinearityMonitor

__all__ = ["LinearityMonitor"]
