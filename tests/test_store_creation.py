"""Store creation that a kill at any instant cannot wedge: real drivers SIGKILLed at each stage of creating their
store (a hook kills the process there), and at moments chosen by the clock; `resume` and `run --run-dir` then start
the run afresh (nothing had been committed) and end with the uninterrupted run's ensemble, bit for bit."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from enkg_dist import config as cfgmod
from enkg_dist import report, runner
from enkg_dist.store import probe

LG = "builtin:linear_gaussian_64"
SMALL = ["name=creation", "problem.n=16", "enkg.ensemble_size=8", "enkg.num_steps=6", "store.full_every=2"]
POINTS = ["root", "arrays-made", "recovery", "marker", "renamed"]

pytestmark = pytest.mark.subprocess  # every test here starts one (counted as slow)

CHILD = r"""
import os, signal, sys
from enkg_dist import config as cfgmod, runner
from enkg_dist.store import runstore

target = sys.argv[2]

def hook(point):
    if point == target:
        os.kill(os.getpid(), signal.SIGKILL)

runstore.CREATE_HOOK = hook
runner.run(cfgmod.load_config("builtin:linear_gaussian_64", sys.argv[3:]), sys.argv[1], progress=False)
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out, _ = runner.run(cfgmod.load_config(LG, SMALL), tmp_path_factory.mktemp("ref") / "run", progress=False)
    return torch.load(out / "ensemble.pt")["particles"]


def killed_at(point: str, run_dir: Path) -> None:
    r = subprocess.run([sys.executable, "-c", CHILD, str(run_dir), point, *SMALL], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr


@pytest.mark.parametrize("point", POINTS)
def test_kill_at_each_stage_of_creation_then_resume(tmp_path, reference, point):
    run_dir = tmp_path / "run"
    killed_at(point, run_dir)
    store = run_dir / "store.zarr"
    assert (run_dir / "config.yaml").is_file()
    if point == "renamed":  # complete, nothing committed: a store to resume from step -1
        assert probe(store) == "store"
    else:  # nothing a reader could take for a store; the half-made one sits under a temporary name
        assert not store.exists() and probe(store) == "half-created"
        assert [p.name.split(".creating-")[0] for p in run_dir.glob("store.zarr.creating-*")] == ["store.zarr"]
        with pytest.raises(report.ReportError, match="creation was interrupted.*enkg-dist resume"):
            report.summary(run_dir)
    _, metrics = runner.resume(run_dir, progress=False)
    assert torch.equal(torch.load(run_dir / "ensemble.pt")["particles"], reference)
    assert metrics["resumed_from_step"] in (None, -1)
    assert not list(run_dir.glob("store.zarr.creating-*")) and probe(store) == "store"


def test_run_with_run_dir_starts_a_half_created_store_afresh(tmp_path, reference, capfd):
    run_dir = tmp_path / "run"
    killed_at("arrays-made", run_dir)
    runner.run(cfgmod.load_config(LG, SMALL), run_dir, progress=False)
    assert "creation was interrupted before anything was committed; starting afresh" in capfd.readouterr().err
    assert torch.equal(torch.load(run_dir / "ensemble.pt")["particles"], reference)


@pytest.mark.slow
def test_kill_at_moments_chosen_by_the_clock_during_creation(tmp_path, reference):
    """The issue's reproduction: SIGKILL as soon as the store's files appear (here: its temporary directory), after
    a random delay of 0-30 ms; every attempt resumes to the uninterrupted ensemble."""
    rnd = random.Random(3)
    states = []
    for attempt in range(6):
        run_dir = tmp_path / f"run{attempt}"
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(run_dir), "none", *SMALL],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not list(run_dir.glob("store.zarr*")) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(rnd.uniform(0, 0.03))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        states.append(probe(run_dir / "store.zarr"))
        assert states[-1] in ("half-created", "store"), states
        runner.resume(run_dir, progress=False)
        assert torch.equal(torch.load(run_dir / "ensemble.pt")["particles"], reference), states
    print(f"\nstates at the kills: {states}")
