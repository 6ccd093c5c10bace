"""Shared fixtures: float64 by default, deterministic, two threads."""

import pytest
import torch

torch.set_num_threads(1)  # small tensors: threads only add overhead on a shared 2-core machine


@pytest.fixture
def gen():
    """A seeded torch generator for test data."""
    return torch.Generator().manual_seed(1234)
