"""One real local Ray for the whole test session (about 5 s and 0.8 GB to start)."""

import pytest

ray = pytest.importorskip("ray")


@pytest.fixture(scope="session")
def ray_session():
    from enkg_dist.distributed import cluster

    # 8 logical CPUs on 2 cores: room for 3 workers and the prior actor; the work itself is light
    cluster.connect(None, num_cpus=8)
    yield
    cluster.disconnect()
