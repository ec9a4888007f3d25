"""Run the metrics without perturbing training: what :class:`LinearityMonitor` promises to leave alone."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn


@contextmanager
def training_untouched(module: nn.Module, device: torch.device) -> Iterator[None]:
    """Evaluate metrics on ``module`` and leave training exactly as it was.

    Inside: every submodule in eval mode (dropout off, batch-norm statistics frozen), autocast off (mixed
    precision computes only the training step in low precision), gradients enabled (for the metrics' own
    derivatives; they never write ``.grad``). On exit, also after an exception: each submodule's own
    train/eval flag, and the random states of torch (CPU and ``device`` if it is a GPU), NumPy and Python,
    restored to what they were on entry.
    """
    modes = [(m, m.training) for m in module.modules()]
    python_state, numpy_state = random.getstate(), np.random.get_state()  # noqa: NPY002 (the legacy global state users may draw from)
    gpus = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    try:
        with (
            torch.random.fork_rng(devices=gpus),
            torch.autocast(device_type=device.type, enabled=False),
            torch.enable_grad(),
        ):
            module.eval()
            yield
    finally:
        for m, training in modes:
            m.training = training
        random.setstate(python_state)
        np.random.set_state(numpy_state)  # noqa: NPY002
