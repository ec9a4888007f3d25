"""Shared fixtures."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

# The fault suite's property tests draw the same examples on every run, so a green main stays green;
# HYPOTHESIS_PROFILE=explore draws new ones (run it locally to hunt for faults).
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def one_thread():
    """For modules of small products: intra-op threads only add synchronisation (a lot on a busy 2-core CI
    box). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
