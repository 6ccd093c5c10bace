"""One writer per run directory (flock + lease), and every user fault as one line naming the key or the path."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from enkg_dist import config as cfgmod
from enkg_dist import interrupt, rundir, runner
from enkg_dist.store import committed_step_of

LG = "builtin:linear_gaussian_64"
TINY = ["problem.n=16", "enkg.ensemble_size=4", "enkg.num_steps=4"]


def cli(*args):
    """The command line, in this process (typer's CliRunner: the same code path, without the interpreter's start);
    an exception that escaped the command is a traceback a user would have seen."""
    from typer.testing import CliRunner

    from enkg_dist.cli import app

    result = CliRunner().invoke(app, list(map(str, args)))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"a traceback for {args}") from result.exception
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def one_line_error(r) -> str:
    """The stderr of a refused command: exit 2, one line, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-2000:]
    return lines[0]


# ---- the lock and the lease


HOLDER = r"""
import sys, time
from pathlib import Path
from enkg_dist.rundir import RunDirLock
lock = RunDirLock(Path(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(600)
"""


@pytest.mark.subprocess
def test_a_second_driver_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(d)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(rundir.RunDirLocked, match=rf"in use by pid {holder.pid} on host "
                                                      rf"{socket.gethostname()}, started 20"):
            rundir.RunDirLock(d).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = rundir.RunDirLock(d).acquire()  # the kernel dropped the dead holder's flock: taken over at once
    assert lock.note is not None and f"pid {holder.pid}" in lock.note and "which is gone" in lock.note
    assert json.loads((d / rundir.LEASE_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (d / rundir.LEASE_FILE).exists()
    rundir.RunDirLock(d).acquire().release()  # released: free again, in the same process


def test_a_lease_from_another_host_guards_file_systems_without_shared_locks(tmp_path, monkeypatch):
    """flock succeeds here (as on Lustre without -o flock, across hosts): the lease of a live driver elsewhere
    refuses the run; once its heartbeat is older than the lease time it is stale and taken over."""
    d = tmp_path / "run"
    d.mkdir()
    lease = {"host": "node-17", "pid": 4242, "token": "x", "started": "2026-01-01T00:00:00+00:00",
             "heartbeat": time.time() - 5}
    (d / rundir.LEASE_FILE).write_text(json.dumps(lease))
    monkeypatch.setenv("ENKG_LEASE_SECONDS", "60")
    with pytest.raises(rundir.RunDirLocked, match=r"in use by pid 4242 on host node-17, .*lease renewed \d s ago.*"
                                                  r"goes stale 60 s after its last renewal"):
        rundir.RunDirLock(d).acquire()
    lease["heartbeat"] = time.time() - 61
    (d / rundir.LEASE_FILE).write_text(json.dumps(lease))
    lock = rundir.RunDirLock(d).acquire()
    assert "pid 4242 on host node-17" in lock.note
    lock.release()


def test_a_driver_that_loses_its_lease_or_directory_stops_at_the_next_safe_point(tmp_path, monkeypatch):
    monkeypatch.setenv("ENKG_LEASE_HEARTBEAT", "0.05")
    d = tmp_path / "run"
    d.mkdir()
    lock = rundir.RunDirLock(d).acquire()
    stolen = {"host": "node-3", "pid": 7, "token": "theirs", "heartbeat": time.time()}
    (d / rundir.LEASE_FILE).write_text(json.dumps(stolen))
    deadline = time.monotonic() + 10
    with pytest.raises(rundir.RunDirError, match="lease is now held by pid 7 on host node-3"):
        while time.monotonic() < deadline:
            interrupt.check()
            time.sleep(0.02)
    lock.release()
    assert json.loads((d / rundir.LEASE_FILE).read_text())["token"] == "theirs"  # not removed by the loser
    interrupt.check()  # nothing left pending

    (d / rundir.LEASE_FILE).unlink()  # the other driver ended
    lock = rundir.RunDirLock(d).acquire()
    (d / rundir.LEASE_FILE).unlink()
    os.unlink(d / rundir.LOCK_FILE)
    d.rmdir()
    with pytest.raises(rundir.RunDirError, match=f"run directory {d} disappeared during the run"):
        while time.monotonic() < deadline + 10:
            interrupt.check()
            time.sleep(0.02)
    lock.release()


@pytest.mark.slow
def test_two_resumes_at_once_one_runs_the_other_is_refused(tmp_path):
    """The issue's case: two `enkg-dist resume D` at once both ran to the end. Now one runs, one is refused."""
    job = tmp_path / "job.yaml"
    job.write_text("name: lock\nseed: 1\nproblem: {n: 16, k: 2}\nenkg: {ensemble_size: 8, num_steps: 12}\n"
                   "execution: {batch_size: 1}\nchaos: {fail_rate: 0.0, delay: 0.02}\n")
    ref, _ = runner.run(cfgmod.load_config(job), tmp_path / "ref", progress=False)
    d = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "enkg_dist.cli", "run", job, "--run-dir", d, "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while committed_step_of(d / "store.zarr") < 2 and p.poll() is None:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    both = [subprocess.Popen([sys.executable, "-m", "enkg_dist.cli", "resume", d, "--no-progress"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(q.wait(300), *q.communicate()) for q in both]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    refused = next(r for r in results if r[0] == 2)[2].strip().splitlines()
    assert len(refused) == 1 and f"run directory {d} is in use by pid" in refused[0], refused
    assert torch.equal(torch.load(d / "ensemble.pt")["particles"], torch.load(ref / "ensemble.pt")["particles"])


# ---- faults of the run directory, each one line naming the path


def test_run_dir_that_is_a_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    line = one_line_error(cli("run", LG, *sum((["--set", s] for s in TINY), []), "--run-dir", f, "--no-progress"))
    assert f"run directory {f} (--run-dir) is a file, not a directory" in line
    assert f.read_text() == "x"


@pytest.fixture
def read_only_dir(tmp_path):
    """A real read-only file system (tmpfs mounted ro); skipped where mounting is not permitted."""
    d = tmp_path / "ro"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a read-only tmpfs here ({r.stderr.strip() or r.returncode})")
    yield d
    subprocess.run(["umount", str(d)], check=False)


@pytest.mark.subprocess
def test_read_only_run_dir_and_output_dir(read_only_dir):
    sets = sum((["--set", s] for s in TINY), [])
    line = one_line_error(cli("run", LG, *sets, "--run-dir", read_only_dir, "--no-progress"))
    assert f"run directory {read_only_dir} is not writable (Read-only file system)" in line
    line = one_line_error(cli("run", LG, *sets, "--set", f"output_dir={read_only_dir / 'runs'}", "--no-progress"))
    assert f"cannot create run directory {read_only_dir / 'runs'}" in line and "(output_dir)" in line
    assert "Read-only file system" in line


@pytest.mark.slow
def test_run_dir_that_disappears_mid_run(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("problem: {n: 16, k: 2}\nenkg: {ensemble_size: 8, num_steps: 40}\nexecution: {batch_size: 1}\n"
                   "chaos: {fail_rate: 0.0, delay: 0.02}\n")
    d = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "enkg_dist.cli", "run", job, "--run-dir", d, "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "ENKG_LEASE_HEARTBEAT": "0.2"})
    while committed_step_of(d / "store.zarr") < 1 and p.poll() is None:
        time.sleep(0.02)
    subprocess.run(["rm", "-rf", str(d)], check=False)  # races with the live writer, as a user's rm would
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"run directory {d} disappeared during the run" in lines[0], err
    print(f"\n{lines[0]}")


# ---- validation: one line, nothing left behind


def test_sigma_min_above_sigma_max_is_caught_by_dry_run_and_leaves_no_run_directory(tmp_path):
    line = one_line_error(cli("run", LG, "--set", "enkg.sigma_min=100", "--dry-run"))
    assert line == "error: config error: enkg.sigma_min: must be smaller than enkg.sigma_max (80), got 100"
    out = tmp_path / "runs"
    one_line_error(cli("run", LG, "--set", "enkg.sigma_min=100", "--set", f"output_dir={out}", "--no-progress"))
    assert not out.exists()


def test_non_finite_observation_is_refused_before_a_run_directory_exists(tmp_path):
    import numpy as np

    obs = tmp_path / "y.npy"
    np.save(obs, np.full(64, np.nan))
    job = tmp_path / "job.yaml"
    job.write_text(f"problem: {{kind: external, command: ['{{python}}', -c, pass], n: 16, obs_size: 64, "
                   f"observation: {obs}}}\noutput_dir: {tmp_path / 'runs'}\n")
    with pytest.raises(cfgmod.ConfigError, match=rf"problem.observation: 64 of 64 values in {obs} are not finite"):
        runner.run(cfgmod.load_config(job), progress=False)
    assert not (tmp_path / "runs").exists()


def test_empty_job_file_is_an_error_and_an_explicit_empty_mapping_runs_the_defaults(tmp_path):
    job = tmp_path / "empty.yaml"
    job.write_text("# nothing yet\n")
    line = one_line_error(cli("run", job, "--dry-run"))
    assert f"job file '{job}' is empty" in line and "64x64 linear-Gaussian" in line and "write {}" in line
    job.write_text("{}\n")
    assert cfgmod.load_config(job).problem.kind == "linear_gaussian"


def test_an_ensemble_that_cannot_fit_is_refused_before_allocating(tmp_path):
    r = cli("run", LG, "--set", "enkg.ensemble_size=10000000", "--dry-run")
    line = one_line_error(r)
    assert line.startswith("error: config error: enkg.ensemble_size: the driver would need about ")
    assert "lower enkg.ensemble_size or problem.n (now 64), or set dtype: float32" in line
    assert '# memory: {"driver_estimate"' in r.stdout
    t0 = time.monotonic()
    out = tmp_path / "runs"
    one_line_error(cli("run", LG, "--set", "enkg.ensemble_size=10000000", "--set", f"output_dir={out}",
                       "--no-progress"))
    assert time.monotonic() - t0 < 60 and not out.exists()
    r = cli("run", LG, "--dry-run")
    assert r.returncode == 0 and '"driver_estimate"' in r.stdout and '"available_here"' in r.stdout


# ---- resume --set


def test_resume_set_changes_only_the_keys_that_may_change(tmp_path):
    d = tmp_path / "run"
    runner.run(cfgmod.load_config(LG, TINY), d, progress=False)
    line = one_line_error(cli("resume", d, "--set", "enkg.scale=1.0", "--no-progress"))
    assert "resume --set enkg.scale: this key may not change between resumptions" in line
    assert "execution.num_workers" in line and "store.checkpoint_every" in line
    _, metrics = runner.resume(d, progress=False, overrides=["execution.batch_size=2", "store.checkpoint_every=3"])
    assert metrics["resumed_from_step"] == 3 and metrics["forward_evaluations"] == 0
    cfg = cfgmod.load_config(d / "config.yaml")
    assert cfg.execution.batch_size == 2 and cfg.store.checkpoint_every == 3  # kept for the next resumption
    with pytest.raises(cfgmod.ConfigError, match="resume --set seed: this key may not change"):
        runner.resume(d, progress=False, overrides=["seed=3"])


def test_a_truncated_config_yaml_is_replaced_by_the_config_the_store_keeps(tmp_path, capfd):
    d = tmp_path / "run"
    runner.run(cfgmod.load_config(LG, TINY), d, progress=False)
    good = (d / "config.yaml").read_text()
    (d / "config.yaml").write_text(good[: len(good) // 3] + "\n  - [unclosed")
    _, metrics = runner.resume(d, progress=False)
    assert metrics["resumed_from_step"] == 3 and (d / "config.yaml").read_text() == good
    assert "is unreadable; using the config stored in the run store" in capfd.readouterr().err
