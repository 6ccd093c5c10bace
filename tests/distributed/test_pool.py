import os
import sys
import threading
import time

import pytest
import ray
import torch

from enkg_dist import config as cfgmod
from enkg_dist import runner
from enkg_dist.distributed.pool import PoolOptions, WorkerPool
from enkg_dist.evaluation import ForwardResult
from enkg_dist.problems.base import ForwardModel
from enkg_dist.problems.chaos import ChaosForward
from enkg_dist.problems.linear_gaussian import SubsampleBlur

pytestmark = pytest.mark.usefixtures("ray_session")
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules

LG = "builtin:linear_gaussian_64"
SMALL = ["problem.n=16", "enkg.ensemble_size=12", "enkg.num_steps=12", "output_dir=/tmp/unused"]


def _ensemble(tmp_path, name, *overrides):
    cfg = cfgmod.load_config(LG, SMALL + list(overrides))
    out, metrics = runner.run(cfg, tmp_path / name, progress=False)
    return torch.load(out / "ensemble.pt")["particles"], metrics


def test_ray_equals_in_process_bit_for_bit_for_any_number_of_workers(tmp_path):
    local, _ = _ensemble(tmp_path, "local")
    for W in (1, 2, 3):
        remote, m = _ensemble(tmp_path, f"ray{W}", "execution.backend=ray", f"execution.num_workers={W}",
                              f"execution.batch_size={W}")
        assert m["backend"] == "ray"
        assert torch.equal(local, remote), W
    remote, _ = _ensemble(tmp_path, "concurrent", "execution.backend=ray", "execution.num_workers=2",
                          "execution.worker_concurrency=3")
    assert torch.equal(local, remote)


def _rows(J=24, n=8):
    return torch.randn(J, 1, n, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_killed_worker_mid_step_is_replaced_and_the_result_unchanged():
    G = ChaosForward(SubsampleBlur(8, 2), fail_rate=0.0, delay=0.15)  # a step of ~1.2 s: the kill lands mid-step
    x = _rows()
    clean = SubsampleBlur(8, 2)(x)
    pool = WorkerPool(G, G.obs_size, PoolOptions(num_workers=3, batch_size=2))
    try:
        assert torch.equal(pool.evaluate(x).psi, clean.psi)  # all workers up
        victim = pool.workers[0]
        killer = threading.Timer(0.3, lambda: ray.kill(victim, no_restart=True))
        killer.start()
        res = pool.evaluate(x)
        killer.join()
        assert torch.equal(res.psi, clean.psi) and bool(res.ok.all())
        assert pool.stats.workers_replaced >= 1 and pool.stats.redispatched >= 1
        assert torch.equal(pool.evaluate(x).psi, clean.psi)  # the replacement works
    finally:
        pool.shutdown()


def test_failures_are_recorded_with_reasons_and_hangs_time_out():
    _check_failures(PoolOptions(num_workers=3, batch_size=1, timeout=1.0))


def test_concurrent_workers_record_failures_and_time_out_hangs_alike():
    # a timeout kills a worker that runs other members at the same time: those go back to the queue
    _check_failures(PoolOptions(num_workers=2, batch_size=1, timeout=1.0, concurrency=3))


def _check_failures(options):
    G = ChaosForward(SubsampleBlur(8, 2), fail_rate=0.25, seed=3, hang_seconds=600)
    x = _rows(J=32)
    fates = [G.fate(r) for r in x]
    assert {"raise", "nan", "hang"} <= set(fates)
    pool = WorkerPool(G, G.obs_size, options)
    try:
        t0 = time.monotonic()
        res = pool.evaluate(x)
        assert time.monotonic() - t0 < 300  # far below the hang: the timeouts ended it (not a speed check)
    finally:
        pool.shutdown()
    for j, fate in enumerate(fates):
        if fate is None:
            assert res.ok[j] and res.reasons[j] is None
            assert torch.equal(res.psi[j], SubsampleBlur(8, 2)(x[j : j + 1]).psi[0])
        else:
            assert not res.ok[j]
            want = {"raise": "simulator raised SimulatorCrash", "nan": "non-finite", "hang": "timeout after 1 s"}[fate]
            assert want in res.reasons[j], (fate, res.reasons[j])
    assert pool.stats.timeouts == fates.count("hang")


class Clock(ForwardModel):
    """psi = (start, end) of the member's call: 0.3 s of waiting (the GIL released), as an external program would."""

    state_shape, obs_size = (1, 2, 2), 2

    def __call__(self, x, members=None):
        t0 = time.time()
        time.sleep(0.3 * x.shape[0])
        psi = torch.tensor([[t0, time.time()]] * x.shape[0], dtype=x.dtype)
        return ForwardResult(psi, torch.ones(x.shape[0], dtype=torch.bool), [None] * x.shape[0])


def test_a_worker_with_concurrency_runs_its_members_at_the_same_time():
    G, x = Clock(), torch.zeros(8, 1, 2, 2, dtype=torch.float64)
    pool = WorkerPool(G, G.obs_size, PoolOptions(num_workers=1, batch_size=1, concurrency=4))
    try:
        assert pool.slots == 4  # auto batching sizes tasks for 4 slots
        res = pool.evaluate(x)
    finally:
        pool.shutdown()
    assert bool(res.ok.all())
    spans = res.psi.numpy()
    overlap = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert overlap >= 2, spans  # one worker process ran several members at once (4 when the machine is quiet)


class SlowFirstTime(ForwardModel):
    """Member 5 takes 20 s the first time it is run anywhere, then no time (a marker file remembers)."""

    def __init__(self, marker):
        self.inner, self.marker = SubsampleBlur(8, 2), str(marker)
        self.state_shape, self.obs_size = self.inner.state_shape, self.inner.obs_size

    def __call__(self, x, members=None):
        if 5 in list(members) and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            time.sleep(20)
        time.sleep(0.02 * x.shape[0])
        return self.inner(x)


def test_stragglers_are_reissued_and_first_result_wins(tmp_path):
    G = SlowFirstTime(tmp_path / "seen")
    x = _rows(J=12)
    pool = WorkerPool(G, G.obs_size, PoolOptions(num_workers=3, batch_size=1, straggler_factor=5.0))
    try:
        pool.evaluate(x[:3])  # workers up, a few task times known
        (tmp_path / "seen").unlink(missing_ok=True)
        t0 = time.monotonic()
        res = pool.evaluate(x)
        assert time.monotonic() - t0 < 10
        assert torch.equal(res.psi, G.inner(x).psi) and pool.stats.reissued == 1
    finally:
        pool.shutdown()


def test_run_stops_cleanly_above_the_failure_threshold(tmp_path):
    cfg = cfgmod.load_config(LG, SMALL + ["execution.backend=ray", "chaos={fail_rate: 0.7, modes: [nan, raise]}"])
    with pytest.raises(runner.TooManyFailures, match=r"members failed \(limit 50%\)"):
        runner.run(cfg, tmp_path / "stop", progress=False)
    assert (tmp_path / "stop" / "stopped.json").is_file() and (tmp_path / "stop" / "config.yaml").is_file()


def test_run_completes_with_ten_percent_failures(tmp_path):
    _, m = _ensemble(tmp_path, "chaos", "execution.backend=ray", "execution.timeout=2",
                     "chaos={fail_rate: 0.1, modes: [nan, raise, hang], hang_seconds: 30}")
    cfg = cfgmod.load_config(LG, SMALL)
    assert m["failed_evaluations"] > 0
    assert m["forward_evaluations"] == runner.forward_budget(cfg)["forward_evaluations"]


def test_navier_stokes_on_ray_equals_in_process(tmp_path):
    ns = ["problem={kind: navier_stokes, n: 16, k: 2, spinup: 1.0}", "prior.alpha=2.5", "enkg.ensemble_size=6",
          "enkg.num_steps=6", "output_dir=/tmp/unused"]
    runs = []
    for name, extra in [("local", []), ("ray1", ["execution.backend=ray", "execution.num_workers=1"]),
                        ("ray2", ["execution.backend=ray", "execution.num_workers=2"]),
                        ("ray3", ["execution.backend=ray", "execution.num_workers=3", "execution.batch_size=2"])]:
        out, _ = runner.run(cfgmod.load_config(LG, ns + extra), tmp_path / name, progress=False)
        runs.append(torch.load(out / "ensemble.pt")["particles"])
    assert all(torch.equal(runs[0], r) for r in runs[1:])


def test_learned_prior_on_any_number_of_prior_actors_equals_in_process(tmp_path):
    """Members batched by global index (max_batch 2: three batches of J = 6): 1, 2 or 3 actors give the in-process
    bits (the UNet's output depends on its batch's composition at round-off)."""
    job = ["problem={kind: navier_stokes, n: 32, k: 2, T: 0.25, spinup: 1.0}",
           "prior={kind: learned, device: auto, max_batch: 2}", "enkg.ensemble_size=6", "enkg.num_steps=5",
           "output_dir=/tmp/unused"]
    runs = []
    for name, extra in [("local", []), ("ray1", ["execution.backend=ray", "execution.num_workers=2"]),
                        ("ray2", ["execution.backend=ray", "execution.prior_actors=2"]),
                        ("ray3", ["execution.backend=ray", "execution.prior_actors=3", "execution.num_workers=1"])]:
        out, _ = runner.run(cfgmod.load_config(None, job + extra), tmp_path / name, progress=False)
        runs.append(torch.load(out / "ensemble.pt")["particles"])
    assert all(torch.equal(runs[0], r) for r in runs[1:])


def test_prior_actors_move_cpu_weights_to_their_own_device():
    from enkg_dist.distributed.prior import RemotePrior
    from enkg_dist.priors.learned import LearnedPrior

    prior = LearnedPrior.from_checkpoint("builtin:ns32", device="cpu", max_batch=3)
    remote = RemotePrior(prior, num_actors=2, num_cpus=0, device="auto")
    try:
        assert remote.devices() == ["cpu", "cpu"]  # auto without a GPU grant
        x = torch.randn(7, 1, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        assert torch.equal(remote(x, 0.7), prior.denoise(x, 0.7))
    finally:
        remote.shutdown()
    bad = RemotePrior(prior, num_actors=1, num_cpus=0, device="cuda")
    try:
        with pytest.raises(ray.exceptions.RayActorError, match="this actor was given no GPU"):
            bad.devices()
    finally:
        bad.shutdown()


def test_auto_batch_size_balances_dispatch_cost_and_load():
    from enkg_dist.distributed.pool import auto_batch_size

    assert auto_batch_size(256, 32, None) == 4  # untimed: J / (2 W), two tasks per worker
    assert auto_batch_size(256, 32, 0.05) == 4  # 50 ms members: dispatch would be busy, take the cap
    assert auto_batch_size(256, 32, 2.0) == 1  # expensive members: one per task balances load best
    assert auto_batch_size(4096, 8, 0.01) == 32  # ceil(8 x 2 ms / (0.05 x 10 ms)) under the cap of 256
    assert auto_batch_size(10, 32, None) == 1


def test_auto_batched_pool_equals_the_unbatched_result():
    G = ChaosForward(SubsampleBlur(8, 2), fail_rate=0.0, delay=0.01)
    x = _rows(J=40)
    pool = WorkerPool(G, G.obs_size, PoolOptions(num_workers=2, batch_size=None))
    try:
        first, second = pool.evaluate(x), pool.evaluate(x)
        assert torch.equal(first.psi, G(x).psi) and torch.equal(second.psi, first.psi)
        assert pool.stats.batch_sizes[0] == 10  # untimed: 40 / (2 x 2)
        assert 1 <= pool.stats.batch_sizes[1] <= 10
    finally:
        pool.shutdown()


@ray.remote
def _lost_shard():
    raise RuntimeError("this shard's node is gone")


def test_x_hat0_by_reference_reaches_the_workers_without_the_driver():
    """The prior actors keep x_hat0 (a RemoteEnsemble); the workers fetch their rows: the same outputs as from the
    tensor, on any subset of members, and the driver carries no state array. A lost shard is computed again."""
    import numpy as np

    from enkg_dist import sampler
    from enkg_dist.distributed.ensemble import RemoteEnsemble
    from enkg_dist.distributed.prior import RemotePrior
    from enkg_dist.distributed.traffic import DRIVER
    from enkg_dist.priors.learned import LearnedPrior

    prior = LearnedPrior.from_checkpoint("builtin:ns32", device="cpu", max_batch=3)
    remote = RemotePrior(prior, num_actors=2, num_cpus=0, keep_x_hat=True)
    G = SubsampleBlur(32, 4)
    pool = WorkerPool(G, G.obs_size, PoolOptions(num_workers=2, batch_size=2))
    try:
        x = torch.randn(7, 1, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        want = sampler.x_hat_map(prior.denoise, x, 0.7, 2, 0.002, 7.0)
        ens = remote.x_hat_map(x, 0.7, 2, 0.002, 7.0)
        assert isinstance(ens, RemoteEnsemble) and ens.shape == x.shape and ens.dtype == x.dtype
        assert torch.equal(ens.fetch(), want)
        DRIVER.reset()
        some = np.array([0, 2, 3, 6])  # a resume's members still to run
        res = pool.evaluate(ens[some])
        assert torch.equal(res.psi, G(want[some]).psi) and bool(res.ok.all())
        assert DRIVER.sent == 0 and DRIVER.received == res.psi.numel() * 8 + len(some)  # outputs and ok flags only

        good = want.numpy()
        lost = RemoteEnsemble([(_lost_shard.remote(), 0, 7)], good.shape, good.dtype,
                              lambda: [(ray.put(good[:4]), 0, 4), (ray.put(good[4:]), 4, 7)])
        res = pool.evaluate(lost)
        assert torch.equal(res.psi, G(want).psi) and lost.generation == 1  # refreshed once, not per task
        gone = RemoteEnsemble([(_lost_shard.remote(), 0, 7)], good.shape, good.dtype)  # no way to recompute
        res = pool.evaluate(gone)
        assert not bool(res.ok.any()) and all(r.startswith("x_hat0 lost") for r in res.reasons)
    finally:
        pool.shutdown()
        remote.shutdown()
