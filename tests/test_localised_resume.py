"""A localised run killed with SIGKILL after a committed step resumes to the uninterrupted run's ensemble, bit for
bit (the replay path of checkpoint_every included)."""

import signal
import subprocess
import sys
import time

import pytest
import torch

from enkg_dist import config as cfgmod
from enkg_dist import runner
from enkg_dist.store import committed_step_of

pytestmark = pytest.mark.subprocess  # every test here starts one (counted as slow)

JOB = ("name: localised-resume\nseed: 5\nproblem: {n: 16, k: 2}\n"
       "enkg: {ensemble_size: 8, num_steps: 12, guard: 2.0, inflation: rtps, inflation_factor: 0.5,\n"
       "       localisation: {kind: gaspari_cohn, radius: 2.5}}\n"
       "execution: {batch_size: 1}\nstore: {full_every: 20, checkpoint_every: 4}\n"
       "chaos: {fail_rate: 0.0, delay: 0.03}\n")


def test_localised_run_resumes_bit_for_bit(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(JOB)
    out, _ = runner.run(cfgmod.load_config(job), tmp_path / "ref", progress=False)
    ref = torch.load(out / "ensemble.pt")["particles"]
    run_dir = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-m", "enkg_dist.cli", "run", str(job), "--run-dir", str(run_dir),
                          "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while p.poll() is None and committed_step_of(run_dir / "store.zarr") < 6:
            time.sleep(0.05)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    r = subprocess.run([sys.executable, "-m", "enkg_dist.cli", "resume", str(run_dir), "--no-progress"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.equal(torch.load(run_dir / "ensemble.pt")["particles"], ref)
