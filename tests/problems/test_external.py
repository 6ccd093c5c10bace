"""ExternalProgramForward: a user's simulator program run per member, each failure confined to its member."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from enkg_dist.problems import example_program as ex
from enkg_dist.problems.external import ExternalProgramForward, example_forward

pytestmark = pytest.mark.subprocess  # every test here starts one (counted as slow)

N, K, STEPS = 8, 2, 3
M = (N // K) ** 2
EXAMPLE = [sys.executable, "-m", "enkg_dist.problems.example_program", "{input}", "{output}",
           "--k", str(K), "--steps", str(STEPS)]
# the example program, failing with --fail exit for odd member indices only
ODD_FAIL = [sys.executable, "-c",
            "import runpy, sys\n"
            "member, rest = int(sys.argv[1]), sys.argv[2:]\n"
            "sys.argv = ['example_program', *rest, *(['--fail', 'exit'] if member % 2 else [])]\n"
            "runpy.run_module('enkg_dist.problems.example_program', run_name='__main__')",
            "{member}", *EXAMPLE[3:]]


def fields(J: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.5 * torch.randn(J, 1, N, N, generator=g, dtype=torch.float64)


def expected(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.from_numpy(ex.simulate(row.numpy(), K, STEPS)) for row in x])


def forward(tmp_path, command=EXAMPLE, obs_size=M, **kw) -> ExternalProgramForward:
    return ExternalProgramForward(command, (1, N, N), obs_size, scratch_dir=tmp_path / "scratch", **kw)


def assert_same(a: torch.Tensor, b: torch.Tensor):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_success_equals_the_in_process_call_and_cleans_up(tmp_path):
    x = fields(3)
    r = forward(tmp_path, max_parallel=2)(x)
    assert r.ok.all() and r.reasons == [None] * 3
    torch.testing.assert_close(r.psi, expected(x), rtol=0, atol=1e-14)
    assert list((tmp_path / "scratch").iterdir()) == []
    G = pickle.loads(pickle.dumps(example_forward(N, K, STEPS, scratch_dir=tmp_path)))  # ships to workers
    assert G.obs_size == M
    assert_same(G(x[:1]).psi, r.psi[:1])


@pytest.mark.parametrize("mode, words, timeout", [
    ("exit", ["exit code 3", ex.FAIL_MESSAGE], None),
    ("hang", ["timeout", "process group killed"], 2.0),
    ("garbage", ["malformed", "output.npy"], None),
    ("nan", ["non-finite", f"{M} of {M}"], None),
    ("missing", ["missing", "output.npy"], None),
])
def test_each_failure_mode_fails_its_member_with_a_readable_reason(tmp_path, mode, words, timeout):
    G = forward(tmp_path, EXAMPLE + ["--fail", mode], timeout=timeout)
    r = G(fields(1), members=[7])
    assert not r.ok[0] and torch.isnan(r.psi).all()
    reason = r.reasons[0]
    assert "\n" not in reason and all(w in reason for w in words), reason
    detail = G.last_failures[7]
    assert reason in detail and "command:" in detail
    workdir = Path(detail.split("workdir: ")[1].splitlines()[0])
    assert (workdir / "input.npy").exists()  # failed members' work directories are kept for inspection
    if mode == "exit":
        assert ex.FAIL_MESSAGE in detail.split("stderr")[1]


def test_wrong_size_is_malformed_and_npz_output_is_accepted(tmp_path):
    r = forward(tmp_path, obs_size=M + 1)(fields(1))
    assert not r.ok[0] and "malformed" in r.reasons[0] and f"expected {M + 1}" in r.reasons[0]
    write_npz = [sys.executable, "-c", "import sys, numpy as np; "
                 "np.savez(sys.argv[2] + '/output.npz', psi=np.load(sys.argv[1]).ravel()[:%d])" % M,
                 "{input}", "{workdir}"]
    x = fields(2)
    r = forward(tmp_path, write_npz)(x)
    assert r.ok.all()
    assert_same(r.psi, x.reshape(2, -1)[:, :M])
    # np.savez appends .npz to {output}: output.npy.npz is read too
    no_key = [sys.executable, "-c", "import sys, numpy as np; np.savez(sys.argv[1], other=np.zeros(3))", "{output}"]
    r = forward(tmp_path, no_key)(x[:1])
    assert not r.ok[0] and "malformed" in r.reasons[0] and "psi" in r.reasons[0]


def test_a_mixed_batch_keeps_the_good_members(tmp_path):
    x = fields(4, seed=1)
    G = forward(tmp_path, ODD_FAIL, max_parallel=2)
    r = G(x, members=[4, 5, 6, 7])
    assert r.ok.tolist() == [True, False, True, False]
    assert_same(r.psi[[0, 2]], expected(x[[0, 2]]))
    assert torch.isnan(r.psi[[1, 3]]).all()
    assert all("exit code 3" in r.reasons[i] and ex.FAIL_MESSAGE in r.reasons[i] for i in (1, 3))
    assert sorted(G.last_failures) == [5, 7]


def test_results_do_not_depend_on_max_parallel_or_member_order(tmp_path):
    x = fields(5, seed=2)
    r1 = forward(tmp_path, ODD_FAIL, max_parallel=1)(x)
    G3 = forward(tmp_path, ODD_FAIL, max_parallel=3)
    r3 = G3(x)
    perm = [3, 0, 4, 1, 2]
    rp = G3(x[perm], members=perm)
    for r, order in ((r3, list(range(5))), (rp, perm)):
        assert_same(r.psi, r1.psi[order])
        assert r.ok.tolist() == r1.ok[order].tolist() and r.reasons == [r1.reasons[i] for i in order]


EVIL = ["; touch PWNED", "$(touch PWNED2)", "`touch PWNED3`", "a b  c", "{braces} {x}", "'\"\\"]
DUMP_ARGV = [sys.executable, "-c", "import json, sys, numpy as np; "
             "np.save(sys.argv[2], np.load(sys.argv[1]).ravel()[:%d]); "
             "open(sys.argv[3], 'w').write(json.dumps(sys.argv[1:]))" % M,
             "{input}", "{output}", "{workdir}/argv.json", *EVIL]


def test_no_shell_injection_through_paths_or_arguments(tmp_path):
    scratch = tmp_path / "s p; touch PWNED $(touch PWNED2) `touch PWNED3` {member} {x}"
    G = ExternalProgramForward(DUMP_ARGV, (1, N, N), M, scratch_dir=scratch, keep_workdirs=True)
    x = fields(1)
    r = G(x, members=[3])
    assert r.ok[0], r.reasons
    assert_same(r.psi, x.reshape(1, -1)[:, :M])
    (workdir,) = scratch.glob("enkg-call-*/3")
    argv = json.loads((workdir / "argv.json").read_text())
    assert argv == [str(workdir / "input.npy"), str(workdir / "output.npy"), str(workdir / "argv.json"), *EVIL]
    assert "{member}" in argv[0]  # substituted text is never substituted again
    for where in (tmp_path, Path.cwd(), workdir):
        assert not list(where.rglob("PWNED*")), where
    with pytest.raises(TypeError, match="never run through a shell"):
        ExternalProgramForward("echo hi", (1, N, N), M)


def alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_timeout_kills_the_whole_process_group(tmp_path):
    pidfile = tmp_path / "child.pid"
    # the program and its child both ignore SIGTERM (inherited across exec), so SIGKILL must follow
    spawn = [sys.executable, "-c",
             "import signal, subprocess, sys, time\n"
             "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
             "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
             "open(sys.argv[1], 'w').write(str(p.pid))\n"
             "time.sleep(600)", str(pidfile)]
    G = forward(tmp_path, spawn, timeout=4.0, kill_grace=0.5)
    t0 = time.monotonic()
    r = G(fields(1))
    assert time.monotonic() - t0 < 10
    assert not r.ok[0] and "timeout after 4 s" in r.reasons[0]
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child), f"child {child} survived the timeout"


def test_missing_or_unexecutable_programs(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        forward(tmp_path, ["no-such-simulator-enkg", "{input}"])
    script = tmp_path / "sim.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    with pytest.raises(FileNotFoundError, match="not executable"):
        forward(tmp_path, [str(script)])
    script.chmod(0o755)
    G = forward(tmp_path, [str(script)])
    script.chmod(0o644)  # gone bad after construction: only at run time
    r = G(fields(1))
    assert not r.ok[0] and "not found or not executable" in r.reasons[0]


def find_mpirun() -> tuple[str, list[str]] | None:
    """(mpirun, extra flags) beside this Python or on PATH, or None."""
    beside = Path(sys.executable).parent / "mpirun"
    mpirun = str(beside) if os.access(beside, os.X_OK) else shutil.which("mpirun")
    if mpirun is None:
        return None
    version = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30)
    openmpi = "Open MPI" in version.stdout + version.stderr
    return mpirun, (["--allow-run-as-root", "--oversubscribe"] if openmpi else [])


@pytest.mark.mpi
def test_mpi_launcher_with_two_ranks_equals_one(tmp_path):
    found = find_mpirun()
    if found is None:
        pytest.skip("no mpirun beside this Python or on PATH")
    pytest.importorskip("mpi4py", reason="the example program needs mpi4py to split its rows across ranks")
    mpirun, flags = found
    x = fields(2, seed=3)
    results = {}
    for ranks in (1, 2):
        G = forward(tmp_path / str(ranks), launcher=[mpirun, *flags, "-n", "{ranks}"], ranks=ranks, timeout=120,
                    keep_workdirs=True)
        r = G(x)
        assert r.ok.all(), G.last_failures
        logs = [p.read_text() for p in (tmp_path / str(ranks)).rglob("stdout.txt")]
        assert len(logs) == 2 and all(f"{ranks} rank(s)" in s for s in logs), logs
        results[ranks] = r.psi
    torch.testing.assert_close(results[2], results[1], rtol=0, atol=1e-13)
    torch.testing.assert_close(results[1], expected(x), rtol=0, atol=1e-13)


# ---- problem.noise: Gamma from files (as linear_gaussian and python problems) ----

def _external_job(tmp_path, **problem):
    """An external-problem job on the example program (n = N, every K-th point), a synthetic twin by default."""
    return {"problem": {"kind": "external", "command": ["{python}", "-m", "enkg_dist.problems.example_program",
                                                        "{input}", "{output}", "--k", str(K), "--steps", str(STEPS)],
                        "n": N, "obs_size": M, "scratch_dir": str(tmp_path / "scratch"), **problem},
            "prior": {"kind": "gaussian"}, "output_dir": str(tmp_path / "runs")}


def _gamma_file(tmp_path, kind: str):
    """(problem.noise, Gamma as a numpy array): variances or a full SPD covariance, as .npy files. Half the outputs
    have a tiny variance (std 1e-9) and the other half std about 0.3, so the twin's noise shows the covariance's
    shape; the full one also correlates neighbours."""
    import numpy as np

    std = np.where(np.arange(M) < M // 2, 1e-9, 0.3 + 0.01 * np.arange(M))
    if kind == "variances":
        np.save(tmp_path / "var.npy", std**2)
        return {"variances": str(tmp_path / "var.npy")}, np.diag(std**2)
    i = np.arange(M)
    corr = np.exp(-np.abs(i[:, None] - i[None, :]) / 2.0)  # exponential correlation: SPD
    full = std[:, None] * corr * std[None, :]
    np.save(tmp_path / "gamma.npy", full)
    return {"covariance": str(tmp_path / "gamma.npy")}, full


@pytest.mark.parametrize("kind", ["variances", "covariance"])
def test_gamma_from_a_file_sets_gamma_and_the_twin_noise(tmp_path, kind):
    """problem.noise replaces noise_std: Gamma holds the file's numbers, and the synthetic twin's noise is that
    Gamma's colour of the twin's draws (nearly zero where the variance is tiny)."""
    import numpy as np

    from enkg_dist import config as cfgmod
    from enkg_dist import rng, runner

    noise, want = _gamma_file(tmp_path, kind)
    built = runner.build(cfgmod.validate(_external_job(tmp_path, noise=noise, noise_std=5.0)))
    Gamma = built.problem.Gamma
    assert Gamma.kind == ("diagonal" if kind == "variances" else "full") and Gamma.m == M
    torch.testing.assert_close(Gamma.dense(), torch.from_numpy(want), rtol=1e-12, atol=1e-30)
    pb = built.problem
    eta = pb.y - expected(pb.x_true[None])[0]  # the twin's noise
    z = rng.member_normal(0, rng.OBS_NOISE, [0], (M,))[0]
    torch.testing.assert_close(eta, Gamma.color(z), rtol=0, atol=1e-15)
    assert float(eta[: M // 2].abs().max()) < 1e-8 < 0.05 < float(eta[M // 2:].abs().max())
    if kind == "covariance":  # correlated neighbours: L z, not sqrt(diag) z
        assert not torch.allclose(eta, z * torch.from_numpy(np.sqrt(np.diag(want))), atol=1e-6)


def test_without_problem_noise_the_external_problem_keeps_noise_std(tmp_path):
    """noise_std alone: Gamma = noise_std^2 I and the twin's y bit for bit as before problem.noise existed."""
    from enkg_dist import config as cfgmod
    from enkg_dist import rng, runner

    pb = runner.build(cfgmod.validate(_external_job(tmp_path, noise_std=0.2))).problem
    assert pb.Gamma.kind == "scalar" and float(pb.Gamma.value) == 0.2**2
    z = rng.member_normal(0, rng.OBS_NOISE, [0], (M,))[0]
    assert torch.equal(pb.y, expected(pb.x_true[None])[0].to(torch.float64) + 0.2 * z)


def test_a_run_with_a_covariance_file_whitens_its_misfit_with_that_gamma(tmp_path):
    """A whole (tiny) run: the misfit it records for the first correction is the mean of r^T Gamma^-1 r / m with
    the file's Gamma, r the recorded outputs minus y."""
    import numpy as np

    from enkg_dist import config as cfgmod
    from enkg_dist import runner
    from enkg_dist.store import RunStore

    noise, full = _gamma_file(tmp_path, "covariance")
    full = full + np.diag(np.full(M, 1e-4))  # a misfit of order 1, not 1e18, on the tiny-variance half
    np.save(tmp_path / "gamma.npy", full)
    job = _external_job(tmp_path, noise=noise, noise_std=5.0)
    job["enkg"] = {"ensemble_size": 4, "num_steps": 2, "num_corrections": 1, "guidance_start": 0.0,
                   "guidance_end": 0.0}
    cfg = cfgmod.validate(job)
    y = runner.build(cfg).problem.y.numpy()  # the twin's y, as the run builds it
    out, metrics = runner.run(cfg, progress=False)
    assert metrics["failed_evaluations"] == 0
    store = RunStore.open(out / runner.STORE_NAME)
    try:
        misfit, psi = store.read("misfit"), store.read("psi")
    finally:
        store.close()
    step = int(np.flatnonzero(np.isfinite(misfit[:, 0]))[0])
    r = psi[step, 0] - y
    want = float(np.mean(np.einsum("jm,jm->j", r, np.linalg.solve(full, r.T).T)) / M)
    assert misfit[step, 0] == pytest.approx(want, rel=1e-9)
    assert misfit[step, 0] != pytest.approx(float(np.mean((r**2).sum(1))) / M / 25.0, rel=1e-3)  # not noise_std


@pytest.mark.parametrize("noise, words", [
    ("covariance", ["problem.noise.covariance", f"expected ({M}, {M})"]),
    ("variances", ["problem.noise.variances", f"the observation {M}"]),
])
def test_gamma_of_the_wrong_size_is_one_line_naming_the_key(tmp_path, noise, words):
    import numpy as np

    from enkg_dist import config as cfgmod
    from enkg_dist import runner

    np.save(tmp_path / "g.npy", np.eye(M + 1) if noise == "covariance" else np.ones(M - 1))
    with pytest.raises(cfgmod.ConfigError) as e:
        runner.build(cfgmod.validate(_external_job(tmp_path, noise={noise: str(tmp_path / "g.npy")})))
    text = str(e.value)
    assert "\n" not in text.strip() and text.startswith("config error: "), text
    assert all(w in text for w in words), (words, text)
