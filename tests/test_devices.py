"""Device placement: names resolved in one place, checked against the right machine, batches by global index."""

import pytest
import torch

from enkg_dist import config as cfgmod
from enkg_dist import devices, runner
from enkg_dist.problems.navier_stokes.problem import NavierStokesForward


def test_driver_auto_is_the_cpu_until_the_gpu_suite_passed():
    assert devices.driver_device("auto") == torch.device("cpu")
    assert devices.driver_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            devices.driver_device("cuda")


def test_actor_device_follows_its_gpu_grant():
    assert devices.actor_device("auto", has_gpu=True) == torch.device("cuda")
    assert devices.actor_device("auto", has_gpu=False) == torch.device("cpu")
    assert devices.actor_device("cpu", has_gpu=True) == torch.device("cpu")
    with pytest.raises(ValueError, match="given no GPU"):
        devices.actor_device("cuda", has_gpu=False)


@pytest.mark.parametrize("J, size, parts", [(6, 2, 1), (6, 2, 2), (6, 2, 3), (7, 3, 2), (10, 4, 5), (5, None, 3)])
def test_member_chunks_are_global_and_shards_take_whole_chunks(J, size, parts):
    shards = devices.member_chunks(J, size, parts)
    assert len(shards) == parts
    flat = [c for shard in shards for c in shard]
    assert flat == devices.member_chunks(J, size, 1)[0]  # the same chunks, whatever the number of shards
    assert flat[0][0] == 0 and flat[-1][1] == J and all(a[1] == b[0] for a, b in zip(flat, flat[1:]))
    assert all(e - s == (size or J) for s, e in flat[:-1])


def _cfg(*overrides):
    return cfgmod.load_config(None, list(overrides))


def test_prior_device_is_checked_against_the_prior_actors_on_ray_not_the_head():
    # on Ray, prior.device: cuda is fine on a CPU-only head when actors get GPUs
    assert runner.prior_device(_cfg("prior.device=cuda", "execution.prior_gpus=1"), remote=True) == "cuda"
    with pytest.raises(cfgmod.ConfigError, match=r"prior.device: 'cuda' on Ray needs execution.prior_gpus > 0"):
        runner.prior_device(_cfg("prior.device=cuda"), remote=True)
    assert runner.prior_device(_cfg("prior.device=auto"), remote=True) == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(cfgmod.ConfigError, match="prior.device: 'cuda' was asked but no CUDA device"):
            runner.prior_device(_cfg("prior.device=cuda"), remote=False)


def test_bfloat16_on_a_cpu_prior_is_refused_naming_the_key():
    with pytest.raises(cfgmod.ConfigError, match="prior.dtype: bfloat16 runs on CUDA only.*prior_gpus"):
        runner.prior_device(_cfg("prior.dtype=bfloat16"), remote=True)
    assert runner.prior_device(_cfg("prior.dtype=bfloat16", "execution.prior_gpus=1"), remote=True) == "cuda"
    if not torch.cuda.is_available():
        with pytest.raises(cfgmod.ConfigError, match="prior.dtype: bfloat16 runs on CUDA only"):
            runner.prior_device(_cfg("prior.dtype=bfloat16"), remote=False)


def test_devices_plan_says_where_each_part_runs():
    plan = runner.devices_plan(_cfg())
    assert plan["driver"].startswith("cpu (device: auto is the CPU")
    ray_plan = runner.devices_plan(_cfg("execution.backend=ray", "execution.worker_gpus=1",
                                        "execution.prior_gpus=1"))
    assert ray_plan["prior"] == "cuda (each prior actor)" and ray_plan["simulators"].startswith("cuda")


def test_a_ray_bound_learned_prior_is_built_on_the_cpu():
    built = runner.build(_cfg("prior.device=cuda", "execution.prior_gpus=1", "execution.backend=ray",
                              "problem.spinup=0.1", "problem.T=0.1"), remote=True)
    assert built.prior.device == torch.device("cpu")


def test_forward_model_for_a_device_keeps_the_answer():
    G = NavierStokesForward(16, 2, T=0.1)
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.3
    moved = G.for_device(torch.device("cpu"))
    assert moved is not G and moved.chunk == G.chunk == "auto"
    assert torch.equal(moved(x).psi, G(x).psi)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_forward_model_on_the_gpu_takes_and_returns_cpu_tensors():
    G = NavierStokesForward(16, 2, T=0.1)
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.3
    gpu = G.for_device(torch.device("cuda"))
    out = gpu(x)
    assert gpu.chunk is None and out.psi.device.type == "cpu"
    assert torch.allclose(out.psi, G(x).psi, rtol=1e-9, atol=1e-9)


def test_a_resume_on_other_hardware_warns(tmp_path):
    """The store records the hardware kinds of the driver and the prior; a resume elsewhere (here: the same run
    continued with GPU prior actors) says the result is equal only to round-off."""
    from enkg_dist.store import RunStore

    job = ["problem.n=32", "problem.T=0.1", "problem.spinup=0.1", "enkg.ensemble_size=4", "enkg.num_steps=3",
           "output_dir=/tmp/unused", "prior.device=cpu"]
    cfg = cfgmod.load_config(None, job)
    out, _ = runner.run(cfg, tmp_path / "run", progress=False)
    with RunStore.open(out / "store.zarr", "r", verify=False) as st:
        assert st.attrs["meta"]["hardware"] == {"driver": "cpu", "prior": "cpu"}
    gpu = cfgmod.load_config(None, job + ["execution.backend=ray", "execution.prior_gpus=1", "prior.device=auto"])
    built = runner.build(gpu, remote=True)
    assert runner.hardware_of(gpu, built, remote=True) == {"driver": "cpu", "prior": "cuda"}
    with pytest.warns(RuntimeWarning, match="resuming on other hardware"):
        runner.open_store(gpu, out, built, resuming=True, remote=True).close()
