"""A full disk during a run, on a real small file system (a tmpfs of a few MiB mounted for the test): the run stops
cleanly with one line, every committed step stays intact, and a resume after space is freed ends with the
uninterrupted run's ensemble, bit for bit. Skipped, with the reason, where the kernel refuses the mount."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from enkg_dist import config as cfgmod
from enkg_dist import runner
from enkg_dist.store import RunStore, committed_step_of, verify_store

pytestmark = pytest.mark.subprocess  # every test here starts one (counted as slow)

JOB = ("name: enospc\nseed: 2\nproblem: {n: 16, k: 2}\nenkg: {ensemble_size: 8, num_steps: 12}\n"
       "store: {full_every: 1}\n")


@pytest.fixture
def small_fs(tmp_path):
    d = tmp_path / "fs"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); run as root where mount is "
                    "permitted, or on a loop device")
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)


def used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def cli(*args):
    return subprocess.run([sys.executable, "-m", "enkg_dist.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def test_disk_full_mid_run_stops_cleanly_and_resumes_bit_identical(tmp_path, small_fs):
    job = tmp_path / "job.yaml"
    job.write_text(JOB)
    ref, _ = runner.run(cfgmod.load_config(job), tmp_path / "ref", progress=False)
    reference = torch.load(ref / "ensemble.pt")["particles"]

    base = used(small_fs)  # what a whole run takes on this file system
    runner.run(cfgmod.load_config(job), small_fs / "sizing", progress=False)
    need = used(small_fs) - base
    subprocess.run(["rm", "-rf", str(small_fs / "sizing")], check=True)
    filler = small_fs / "filler"
    with open(filler, "wb") as f:  # leave about half of what the run needs
        f.write(b"\0" * max(0, free(small_fs) - need // 2))

    run_dir = small_fs / "run"
    r = cli("run", job, "--run-dir", run_dir, "--no-progress")
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[0].startswith("error: no space left on device (") and str(run_dir) in lines[0], lines[0]
    assert f"continue with: enkg-dist resume {run_dir}" in lines[0]
    t = committed_step_of(run_dir / "store.zarr")
    assert 0 <= t < 11, f"the disk filled at step {t}, not mid-run (need {need} B)"
    print(f"\n{lines[0]}\n(disk full with {t + 1} of 12 steps committed; the run needs {need / 2**20:.2f} MiB)")
    with RunStore.open(run_dir / "store.zarr") as st:  # verifies the newest ensemble
        assert st.committed_step == t and st.damage is None
    assert verify_store(run_dir / "store.zarr") == []  # every committed chunk decodes

    filler.unlink()
    r = cli("resume", run_dir, "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.equal(torch.load(run_dir / "ensemble.pt")["particles"], reference)
