"""enkg_dist.heap: freed memory stays in the process (glibc), and a solve's bits do not depend on it."""

import os
import subprocess
import sys

import pytest
import torch

from enkg_dist import heap
from enkg_dist.priors.checkpoint import flatten, load_checkpoint

GLIBC = heap._glibc() is not None
needs_glibc = pytest.mark.skipif(not GLIBC, reason="not glibc: retain_freed_memory is a no-op")

# RSS after freeing a 256 MiB array, in a fresh process (mallopt is process-wide); prints MiB before and after free
PROBE = """
import os, sys
import numpy as np
from enkg_dist.heap import retain_freed_memory
if sys.argv[1] == "1":
    assert retain_freed_memory()
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page / 2**20
a = np.ones(2**25)  # 256 MiB, touched
held = rss()
del a
print(held, rss())
"""


def _rss_after_free(retain: bool) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, "1" if retain else "0"], capture_output=True, text=True,
                         check=True).stdout
    held, freed = map(float, out.split())
    return held, freed


@needs_glibc
def test_freed_memory_stays_in_the_process_only_when_asked():
    held, freed = _rss_after_free(retain=False)
    assert held - freed > 200  # glibc's default: a 256 MiB block is mmapped and returned on free
    held, freed = _rss_after_free(retain=True)
    assert held - freed < 8  # retained: the next allocation reuses it, no page faults


@needs_glibc
def test_retain_is_idempotent_and_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("ENKG_RETAIN_FREED_MEMORY", "0")
    assert heap.retain_freed_memory() is False
    monkeypatch.delenv("ENKG_RETAIN_FREED_MEMORY")
    assert heap.retain_freed_memory() is True and heap.retain_freed_memory() is True
    assert heap.retained()


SOLVE = """
import sys, torch
from enkg_dist import heap
from enkg_dist.problems.navier_stokes import grf_vorticity, solve
torch.set_num_threads(1)
n = int(sys.argv[1])
w0 = torch.cat([grf_vorticity(n, seed=s) for s in (0, 1)])
res = solve(w0, 0.002 * 256 / n, mode="per_member")
sys.stdout.buffer.write(bytes([heap.retained()]) + res.omega.numpy().tobytes())
"""


def _probe(script: str, retain: str, *args: str) -> bytes:
    """stdout of `script` in a fresh process (mallopt is process-wide) with ENKG_RETAIN_FREED_MEMORY=retain."""
    env = {**os.environ, "ENKG_RETAIN_FREED_MEMORY": retain}
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, env=env, check=True).stdout


@needs_glibc
@pytest.mark.parametrize("n", [32, 256])
def test_a_cpu_solve_retains_memory_and_its_bits_do_not_depend_on_it(n):
    # every grid: at 128^2 a lane's temporaries are above malloc's mmap threshold too (issue 18)
    on, off = _probe(SOLVE, "1", str(n)), _probe(SOLVE, "0", str(n))
    assert on[0] == 1 and off[0] == 0  # the solve switched it on; the variable kept it off
    assert len(on) > 1 and on[1:] == off[1:]


PRIOR = """
import sys, torch
from enkg_dist import heap
from enkg_dist.priors.learned import LearnedPrior
torch.set_num_threads(1)
before = heap.retained()
prior = LearnedPrior.from_checkpoint("builtin:ns32", device="cpu", max_batch=64)
x = torch.randn(96, 1, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.5
d = prior.denoise(x, torch.linspace(0.05, 5.0, 96, dtype=torch.float64))
sys.stdout.buffer.write(bytes([before, heap.retained()]) + d.numpy().tobytes())
"""

TRAIN = """
import sys, torch
from enkg_dist import heap
from enkg_dist.priors.training import TrainConfig, train
from enkg_dist.priors.unet import UNetConfig
torch.set_num_threads(1)
before = heap.retained()
x = torch.randn(96, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.5
cfg = TrainConfig(model=UNetConfig(model_channels=8, channel_mult=(1, 2)), batch_size=8, steps=2, warmup_steps=1,
                  val_every=2, checkpoint_every=2, val_draws=1, device="cpu")
train(cfg, x[:64], sys.argv[1], x[64:], progress=False)
sys.stdout.buffer.write(bytes([before, heap.retained()]))
"""


@needs_glibc
def test_a_cpu_prior_retains_memory_and_its_bits_do_not_depend_on_it():
    on, off = _probe(PRIOR, "1"), _probe(PRIOR, "0")
    assert on[:2] == bytes([0, 1]) and off[:2] == bytes([0, 0])  # the prior set it; the variable kept it off
    assert len(on) > 2 and on[2:] == off[2:]


@needs_glibc
def test_cpu_training_retains_memory_and_its_bits_do_not_depend_on_it(tmp_path):
    on, off = (_probe(TRAIN, v, str(tmp_path / f"train-{v}")) for v in "10")
    assert on == bytes([0, 1]) and off == bytes([0, 0])  # training set it in a fresh process; 0 kept it off
    trained = [load_checkpoint(tmp_path / f"train-{v}" / "checkpoint.pt")[1] for v in "10"]
    flat = [{}, {}]
    for state, f in zip(trained, flat):
        flatten(state, "", f)
    assert flat[0].keys() == flat[1].keys() and all(torch.equal(flat[0][k], flat[1][k]) for k in flat[0])
