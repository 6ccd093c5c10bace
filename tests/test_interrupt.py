"""SIGTERM / SIGINT stop a run cleanly at a safe point: distinct exit code, one-line message, exact resume."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from enkg_dist import config as cfgmod
from enkg_dist import interrupt, runner
from enkg_dist.store import RunStore, committed_step_of


def job(directory: Path, log: Path) -> Path:
    """A small job whose members take 30 ms each, evaluated one at a time, logging each evaluation."""
    p = directory / "job.yaml"
    p.write_text(
        "name: interrupt-test\nseed: 5\nproblem: {n: 16, k: 2}\n"
        "enkg: {ensemble_size: 8, num_steps: 12, failure_policy: resample}\n"
        "execution: {batch_size: 1}\n"
        f"chaos: {{fail_rate: 0.1, modes: [nan], delay: 0.03, log: {log}}}\n")
    return p


def committed(run_dir: Path) -> int:
    return committed_step_of(run_dir / "store.zarr")


def evaluations(log: Path) -> int:
    return len(log.read_text().split())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, in-process: (final particles, member evaluations)."""
    d = tmp_path_factory.mktemp("ref")
    log = d / "ref.log"
    out, _ = runner.run(cfgmod.load_config(job(d, log)), d / "run", progress=False)
    return torch.load(out / "ensemble.pt")["particles"], evaluations(log)


@pytest.mark.subprocess
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_signal_stops_cleanly_and_resume_gives_the_uninterrupted_ensemble(tmp_path, reference, sig):
    ref, n_ref = reference
    log, run_dir = tmp_path / "a.log", tmp_path / "a"
    cmd = [sys.executable, "-m", "enkg_dist.cli", "run", str(job(tmp_path, log)), "--run-dir", str(run_dir),
           "--no-progress"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while committed(run_dir) < 1 and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    t_signal = time.monotonic()
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    print(f"\n{sig.name}: the driver exited {time.monotonic() - t_signal:.2f} s after the signal")
    assert p.returncode == interrupt.EXIT_INTERRUPTED, err
    last = err.strip().splitlines()[-1]
    m = re.fullmatch(rf"interrupted by {sig.name} at step (\d+); resume with: enkg-dist resume {run_dir}", last)
    assert m, err
    step = int(m.group(1))
    with RunStore.open(run_dir / "store.zarr", "r") as st:  # verifies the committed step's data decode
        assert st.committed_step == step - 1 >= 1 and st.damage is None
    assert not (run_dir / "ensemble.pt").exists()
    r = subprocess.run([sys.executable, "-m", "enkg_dist.cli", "resume", str(run_dir), "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"resumed from step {step - 1}" in r.stdout
    assert torch.equal(torch.load(run_dir / "ensemble.pt")["particles"], ref)
    assert evaluations(log) == n_ref  # every member recorded before the stop was reused, none ran twice


def test_stop_on_signals_sets_a_flag_checked_at_safe_points():
    previous = signal.getsignal(signal.SIGTERM)
    calls = []
    with interrupt.stop_on_signals():
        forward = interrupt.checked(lambda x, on_result: [on_result(j) for j in range(3)])
        forward(None, on_result=calls.append)
        os.kill(os.getpid(), signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is previous  # a second signal acts as before
        with pytest.raises(interrupt.Interrupted, match="interrupted by SIGTERM"):
            forward(None, on_result=calls.append)
        assert calls == [0, 1, 2]  # nothing dispatched after the stop was requested
    assert signal.getsignal(signal.SIGTERM) is previous
    interrupt.check()  # outside the block nothing is pending


def test_a_stop_between_results_raises_after_the_result_is_handed_on():
    seen = []

    def forward(x, on_result):
        for j in range(3):
            if j == 1:
                os.kill(os.getpid(), signal.SIGINT)
            on_result(j)

    with interrupt.stop_on_signals(), pytest.raises(interrupt.Interrupted, match="SIGINT"):
        interrupt.checked(forward)(None, on_result=seen.append)
    assert seen == [0, 1]


def test_a_stop_in_this_process_and_an_in_process_resume_give_the_uninterrupted_ensemble(tmp_path, reference):
    """The runner's hooks in the sampler's loop, without a subprocess (so `make check` keeps a resume bit-identity
    check): SIGTERM once step 3 is committed stops the run at a step boundary; the resume replays the recorded
    members and ends with the uninterrupted ensemble."""
    import threading

    ref, n_ref = reference
    log, run_dir = tmp_path / "a.log", tmp_path / "a"
    cfg = cfgmod.load_config(job(tmp_path, log))

    ended = threading.Event()

    def stop_after_step_3():
        while committed_step_of(run_dir / "store.zarr") < 3 and not ended.is_set():
            time.sleep(0.005)
        if not ended.is_set():  # never after the handler is gone (that SIGTERM would end pytest)
            os.kill(os.getpid(), signal.SIGTERM)

    watcher = threading.Thread(target=stop_after_step_3, daemon=True)
    with interrupt.stop_on_signals():
        watcher.start()
        try:
            with pytest.raises(interrupt.Interrupted) as stopped:
                runner.run(cfg, run_dir, progress=False)
        finally:
            ended.set()
            watcher.join()
    assert 4 <= stopped.value.step < 12
    out, metrics = runner.resume(run_dir, progress=False)
    assert metrics["resumed_from_step"] == stopped.value.step - 1
    assert torch.equal(torch.load(out / "ensemble.pt")["particles"], ref)
    assert evaluations(log) == n_ref  # the members recorded before the stop were replayed, none ran twice
