"""End-to-end runs on one GPU: each path whose device boundaries the CPU tests cannot reach.

Run by scripts/gpu_check.sh (under 8 minutes on one GPU); collected only where CUDA is available.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from enkg_dist import config as cfgmod
from enkg_dist import runner

pytestmark = pytest.mark.gpu
SHORT = ["enkg.num_steps=8", "enkg.ensemble_size=16", "problem.spinup=1.0", "output_dir=/tmp/unused"]


def _run(tmp_path, name, *overrides, job=None):
    cfg = cfgmod.load_config(job, list(overrides))
    out, metrics = runner.run(cfg, tmp_path / name, progress=False)
    return torch.load(out / "ensemble.pt")["particles"], metrics


def test_default_job_with_device_auto(tmp_path):
    """The embedded default job as shipped (prior auto: on the GPU; driver auto: the CPU)."""
    x, m = _run(tmp_path, "default")
    assert bool(torch.isfinite(x).all()) and m["rel_l2_mean"] < 1.0


def test_driver_particles_on_the_gpu_equal_the_cpu_driver(tmp_path):
    """device: cuda puts particles, observation and Kalman update on the GPU; simulators answer on the CPU."""
    cpu, _ = _run(tmp_path, "cpu", "device=cpu", *SHORT)
    gpu, m = _run(tmp_path, "gpu", "device=cuda", *SHORT)
    assert m["failed_evaluations"] == 0
    assert float((gpu - cpu).norm() / cpu.norm()) < 1e-6


def test_ray_prior_actor_on_the_gpu_with_a_cpu_driver(tmp_path):
    local, _ = _run(tmp_path, "local", "prior.device=cuda", *SHORT)
    remote, m = _run(tmp_path, "ray", "execution.backend=ray", "execution.prior_gpus=1", "prior.device=auto", *SHORT)
    assert m["backend"] == "ray" and torch.equal(local, remote)  # same GPU, same batches: same bits


def test_ray_simulator_worker_on_the_gpu(tmp_path):
    cpu, _ = _run(tmp_path, "cpu", "execution.backend=ray", *SHORT)
    gpu, m = _run(tmp_path, "gpu", "execution.backend=ray", "execution.worker_gpus=1", "execution.num_workers=1",
                  *SHORT)
    assert m["failed_evaluations"] == 0
    assert float((gpu - cpu).norm() / cpu.norm()) < 1e-5


def test_bfloat16_prior(tmp_path):
    f32, _ = _run(tmp_path, "f32", "prior.device=cuda", *SHORT)
    bf16, m = _run(tmp_path, "bf16", "prior.device=cuda", "prior.dtype=bfloat16", *SHORT)
    assert bool(torch.isfinite(bf16).all())
    assert float((bf16 - f32).norm() / f32.norm()) < 0.1


def test_short_ddp_training_on_one_gpu(tmp_path):
    from enkg_dist.data.generate import generate_dataset

    data = tmp_path / "ns16.zarr"
    generate_dataset(data, n=16, splits={"train": 16, "val": 2, "test": 1}, spinup=0.1, progress=False, batch=16)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m",
           "enkg_dist.cli", "train-prior", str(data), "--out", str(out), "--steps", "4", "--set", "device=cuda",
           "--set", "model.model_channels=8", "--set", "model.channel_mult=[1, 2]", "--set", "batch_size=4",
           "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 4


def test_training_resume_on_the_gpu_is_bit_identical(tmp_path):
    from enkg_dist.priors.checkpoint import load_checkpoint
    from enkg_dist.priors.training import TrainConfig, train
    from enkg_dist.priors.unet import UNetConfig

    data = torch.randn(32, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.5
    model = UNetConfig(resolution=16, model_channels=8, channel_mult=(1, 2), attn_resolutions=(8,))
    cfg = dict(model=model, batch_size=8, steps=6, checkpoint_every=3, log_every=1, val_every=100, device="cuda")
    train(TrainConfig(**cfg), data, tmp_path / "whole", progress=False)
    train(TrainConfig(**{**cfg, "steps": 3}), data, tmp_path / "split", progress=False)
    train(TrainConfig(**cfg), data, tmp_path / "split", resume=True, progress=False)
    _, a = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    _, b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("J", [256, 2048])
def test_kalman_update_on_the_gpu_matches_the_cpu(J):
    from enkg_dist import kalman
    from enkg_dist.noise import NoiseCovariance

    g = torch.Generator().manual_seed(0)
    x, psi = torch.randn(J, 1, 64, 64, generator=g), torch.randn(J, 32 * 32, generator=g)
    y, Gamma = torch.randn(32 * 32, generator=g), NoiseCovariance.scalar(0.01, 32 * 32)
    cpu, _ = kalman.enkg_update(x.double(), psi.double(), y.double(), Gamma, 2.0)
    gpu, _ = kalman.enkg_update(x.double().cuda(), psi.double().cuda(), y.double().cuda(), Gamma, 2.0)
    assert torch.allclose(gpu.cpu(), cpu, rtol=1e-9, atol=1e-9)
