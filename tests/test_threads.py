"""The thread budget (issue 16, item 4): simulator workers, prior actors and the in-process driver run their intra-op
threads (torch; OpenMP/MKL/OpenBLAS through threadpoolctl) on the CPUs they were given, recorded in the run."""

from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import pytest
import torch

from enkg_dist import config as cfgmod
from enkg_dist import runner, threads


@pytest.mark.parametrize("cpus, n", [(None, 1), (0, 1), (0.5, 1), (1, 1), (2, 2), (3.7, 3)])
def test_threads_for_cpus(cpus, n):
    assert threads.for_cpus(cpus) == n


@pytest.mark.parametrize("affinity, node, quota, load, n", [
    (8, 8, None, 0.2, 8),  # a quiet node, nobody pinned us: every core
    (8, 8, None, 5.0, 3),  # the node's other work takes 5 cores
    (2, 2, None, 1.0, 1),  # issue 16: another CPU-bound process on the 2 cores
    (8, 8, None, 40.0, 1),  # at least one
    (4, 64, None, 60.0, 4),  # pinned (Slurm, taskset): the CPUs given, whatever the rest of the node does
    (8, 8, 2.5, 0.0, 2),  # a container's CPU quota
])
def test_free_cpus(monkeypatch, affinity, node, quota, load, n):
    monkeypatch.setattr(threads, "affinity_cpus", lambda: affinity)
    monkeypatch.setattr(threads, "cgroup_cpus", lambda: quota)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: node)
    assert threads.free_cpus(load=load) == n


@pytest.mark.parametrize("text, cpus", [("max 100000\n", None), ("250000 100000\n", 2.5), ("garbage", None)])
def test_cgroup_quota(tmp_path, text, cpus):
    (tmp_path / "cpu.max").write_text(text)
    assert threads.cgroup_cpus(tmp_path) == cpus
    assert threads.cgroup_cpus(tmp_path / "absent") is None


def test_the_budget_sets_torch_native_pools_and_environment_then_restores_them(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    np.ones((4, 4)) @ np.ones((4, 4))  # numpy's BLAS loaded
    with threads.budget(2) as used:
        assert torch.get_num_threads() == 2 and used["torch"] == 2
        assert os.environ["OMP_NUM_THREADS"] == "2" and os.environ["OPENBLAS_NUM_THREADS"] == "2"
        pools = {k: v for k, v in threads.in_use().items() if k != "torch"}
        try:
            import threadpoolctl  # noqa: F401
        except ImportError:
            pools = {}
        assert all(v == 2 for v in pools.values()), pools
    assert torch.get_num_threads() == before
    assert os.environ["OMP_NUM_THREADS"] == "7" and "OPENBLAS_NUM_THREADS" not in os.environ


def test_threadpoolctl_is_installed():
    """A project dependency (pyproject, constraints, environment.yml): the native pools are limited, not only
    torch's."""
    import threadpoolctl

    assert threadpoolctl.threadpool_info is not None


def test_an_in_process_run_records_its_threads_and_leaves_the_process_as_it_was(tmp_path):
    from enkg_dist.store import root_attrs

    before = torch.get_num_threads()
    job = {"name": "threads", "output_dir": str(tmp_path), "problem": {"n": 8, "k": 2},
           "enkg": {"ensemble_size": 8, "num_steps": 3}, "execution": {"threads": 2}}
    out, metrics = runner.run(cfgmod.validate(job), progress=False)
    assert metrics["threads"]["driver"]["torch"] == 2
    assert json.loads((out / "metrics.json").read_text())["threads"]["driver"]["torch"] == 2
    assert root_attrs(out / "store.zarr")["meta"]["threads"]["driver"]["torch"] == 2
    assert torch.get_num_threads() == before


def test_the_driver_takes_the_free_cpus_without_execution_threads(monkeypatch):
    monkeypatch.setattr(threads, "free_cpus", lambda load=None: 3)
    assert runner.driver_threads(cfgmod.validate({})) == 3
    assert runner.driver_threads(cfgmod.validate({"execution": {"threads": 5}})) == 5
    plan = runner.thread_plan(cfgmod.validate({"execution": {"worker_cpus": 4}}), remote=True)
    assert plan["simulator_worker"] == 4 and plan["prior_actor"] == 1


# ---- asked from inside Ray workers and actors ----

PROBE = '''
import torch


def threads_forward():
    def G(x):  # each member's outputs: the threads of the process computing it
        try:
            from threadpoolctl import threadpool_info
            native = max([p["num_threads"] for p in threadpool_info()] or [0])
        except ImportError:
            native = 0
        return torch.tensor([[float(torch.get_num_threads()), float(native)]] * x.shape[0])
    return G


def threads_denoiser():
    def D(x, sigma):
        return torch.full_like(x, float(torch.get_num_threads()))
    return D
'''


@pytest.fixture
def probe(tmp_path):
    (tmp_path / "threads_probe.py").write_text(textwrap.dedent(PROBE))
    return (str(tmp_path),)


@pytest.mark.parametrize("cpus, override, want", [(2, None, 2), (1, None, 1), (2, 1, 1)])
def test_simulator_workers_run_on_the_cpus_they_were_given(ray_session, probe, cpus, override, want):
    from enkg_dist.distributed.pool import PoolOptions, WorkerPool
    from enkg_dist.factories import FactorySpec
    from enkg_dist.problems.plugin import PluginForward

    G = PluginForward(FactorySpec("threads_probe:threads_forward", {}, "problem.forward", probe), (1, 4, 4), 2)
    pool = WorkerPool(G, 2, PoolOptions(num_workers=2, num_cpus=cpus, batch_size=1, threads=override))
    try:
        res = pool.evaluate(torch.zeros(4, 1, 4, 4, dtype=torch.float64))
        assert bool(res.ok.all()), res.reasons
        assert res.psi[:, 0].tolist() == [want] * 4  # torch.get_num_threads() inside the worker
        native = res.psi[:, 1]
        assert bool(((native == want) | (native == 0)).all()), native  # OpenMP/OpenBLAS (threadpoolctl)
        assert all(t["torch"] == want for t in pool.threads())
    finally:
        pool.shutdown()


def test_prior_actors_run_on_the_cpus_they_were_given(ray_session, probe):
    from enkg_dist.distributed.prior import RemotePrior
    from enkg_dist.factories import FactorySpec
    from enkg_dist.priors.plugin import PluginPrior

    prior = PluginPrior(FactorySpec("threads_probe:threads_denoiser", {}, "prior.denoiser", probe), (1, 4, 4))
    for cpus, override, want in ((2, None, 2), (0, None, 1), (2, 1, 1)):
        remote = RemotePrior(prior, 1, 0.0, num_cpus=cpus, device="cpu", threads=override)
        try:
            out = remote(torch.zeros(3, 1, 4, 4, dtype=torch.float64), 1.0)
            assert torch.all(out == want), (cpus, override, out.unique())
            assert remote.threads()[0]["torch"] == want
        finally:
            remote.shutdown()


def test_a_ray_run_records_each_process_threads(ray_session, tmp_path):
    job = {"name": "ray-threads", "output_dir": str(tmp_path), "problem": {"n": 8, "k": 2},
           "enkg": {"ensemble_size": 8, "num_steps": 2},
           "execution": {"backend": "ray", "num_workers": 2, "worker_cpus": 2}}
    out, metrics = runner.run(cfgmod.validate(job), progress=False)
    t = json.loads((out / "metrics.json").read_text())["threads"]
    assert [w["torch"] for w in t["simulator_workers"]] == [2, 2]
    assert [a["torch"] for a in t["prior_actors"]] == [1]  # a CPU prior actor reserves no CPU: one thread
    assert "driver" in t
