"""Shared fixtures: float64 by default, deterministic, two threads. Tests that start a subprocess or use Ray count as
slow, so that `make check` (-m "not slow and not cluster") runs in-process tests only."""

import pytest
import torch

torch.set_num_threads(1)  # small tensors: threads only add overhead on a shared 2-core machine


@pytest.fixture
def gen():
    """A seeded torch generator for test data."""
    return torch.Generator().manual_seed(1234)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """A test on the Ray session is marked ray; a ray, subprocess or mpi test is also slow (before -m selects)."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
        if any(item.get_closest_marker(m) for m in ("ray", "subprocess", "mpi")):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray for the whole test session (about 5 s and 0.8 GB to start); its tests count as slow."""
    pytest.importorskip("ray")
    from enkg_dist.distributed import cluster

    # 8 logical CPUs on 2 cores: room for 3 workers and the prior actor; the work itself is light
    cluster.connect(None, num_cpus=8)
    yield
    cluster.disconnect()
