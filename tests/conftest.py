"""Shared fixtures: float64 by default, deterministic, two threads."""

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def gen():
    """A seeded torch generator for test data."""
    return torch.Generator().manual_seed(1234)


def random_ensemble(gen, J=12, d=30, m=7, dtype=torch.float64):
    x = torch.randn(J, d, generator=gen, dtype=dtype)
    psi = torch.randn(J, m, generator=gen, dtype=dtype) + x[:, :m] ** 2
    y = torch.randn(m, generator=gen, dtype=dtype)
    return x, psi, y
