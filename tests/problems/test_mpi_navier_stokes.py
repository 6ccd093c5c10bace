"""The slab-decomposed MPI Navier–Stokes solver equals the serial torch solver, through real mpirun runs."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from enkg_dist.problems.external import ExternalProgramForward
from enkg_dist.problems.navier_stokes import NavierStokes2D, NavierStokesForward, grf_vorticity, solve

pytestmark = pytest.mark.mpi

N, K = 32, 2
PROGRAM = [sys.executable, "-m", "enkg_dist.problems.mpi_navier_stokes"]
ROOT = Path(__file__).resolve().parents[2]


def find_mpirun() -> tuple[str, list[str]] | None:
    """(mpirun, extra flags) beside this Python or on PATH, or None."""
    beside = Path(sys.executable).parent / "mpirun"
    mpirun = str(beside) if os.access(beside, os.X_OK) else shutil.which("mpirun")
    if mpirun is None:
        return None
    version = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30)
    openmpi = "Open MPI" in version.stdout + version.stderr
    return mpirun, (["--allow-run-as-root", "--oversubscribe"] if openmpi else [])


@pytest.fixture(scope="module")
def mpirun():
    found = find_mpirun()
    if found is None:
        pytest.skip("no mpirun beside this Python or on PATH: the MPI solver needs an MPI launcher")
    pytest.importorskip("mpi4py", reason="the MPI solver needs mpi4py")
    mpirun, flags = found
    return [mpirun, *flags]


def x_field(seed: int) -> torch.Tensor:
    """x = w/10 for a GRF vorticity, (1, N, N) float64."""
    return grf_vorticity(N, seed) / 10.0


def run_program(mpirun, ranks, tmp_path, x, *args, check=True) -> subprocess.CompletedProcess:
    np.save(tmp_path / "in.npy", x.numpy())
    proc = subprocess.run([*mpirun, "-n", str(ranks), *PROGRAM, str(tmp_path / "in.npy"), str(tmp_path / "out.npy"),
                           *args], capture_output=True, text=True, timeout=120, cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("ranks", [1, 2, 4])
@pytest.mark.parametrize("step", [[], ["--dt", "0.01"]], ids=["adaptive", "fixed"])
def test_the_c_kernels_give_the_torch_ops_bits(mpirun, tmp_path, monkeypatch, ranks, step):
    # ENKG_MPI_FUSED=0: every pass and transform a torch op; ENKG_NS_FUSED_MKL=0: the elementwise passes in the
    # serial solver's C loops, the transforms torch's; default: the rank's whole local work in C (c_step)
    x, outs = x_field(1), []
    for env in ({"ENKG_MPI_FUSED": "0"}, {"ENKG_NS_FUSED_MKL": "0"}, {}):
        for name in ("ENKG_MPI_FUSED", "ENKG_NS_FUSED_MKL"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        run_program(mpirun, ranks, tmp_path, x, "--T", "0.1", "--full-output", *step)
        outs.append(np.load(tmp_path / "out.npy"))
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_mpi_solve_equals_the_serial_solve(mpirun, tmp_path, ranks):
    x = x_field(0)
    # adaptive (the serial per-member rule, global max|u|): exactly NavierStokesForward for one member
    T = 0.2
    run_program(mpirun, ranks, tmp_path, x, "--T", str(T), "--k", str(K))
    ref = NavierStokesForward(N, K, T)(x[None]).psi[0].numpy()
    out = np.load(tmp_path / "out.npy")
    assert out.shape == ref.shape == ((N // K) ** 2,)
    assert rel(out, ref) < 1e-10
    # fixed step, whole field
    dt, T = 0.01, 0.1
    proc = run_program(mpirun, ranks, tmp_path, x, "--T", str(T), "--dt", str(dt), "--full-output")
    assert f"on {ranks} rank(s), 10 steps" in proc.stdout
    ref = solve(10 * x, T, mode="fixed", dt=dt, equation=NavierStokes2D(N, dealias="disc")).omega[0].numpy()
    out = np.load(tmp_path / "out.npy")
    assert out.shape == (N, N) and rel(out, ref) < 1e-10
    if ranks == 4:  # the other dealiasing, with padded spectral columns (N/2+1 = 17 over 4 ranks)
        run_program(mpirun, ranks, tmp_path, x, "--T", "0.05", "--dealias", "two_thirds", "--full-output")
        ref = solve(10 * x, 0.05, equation=NavierStokes2D(N, dealias="two_thirds")).omega[0].numpy()
        assert rel(np.load(tmp_path / "out.npy"), ref) < 1e-10


def test_failures_exit_nonzero_with_the_reason(mpirun, tmp_path):
    proc = run_program(mpirun, 2, tmp_path, x_field(0), "--T", "1", "--max-steps", "2", check=False)
    assert proc.returncode != 0 and "step budget exhausted: 2 steps" in proc.stderr
    assert not (tmp_path / "out.npy").exists()
    # a fixed step far too long for the field: the ranks agree that the vorticity blew up (the flag rides with the
    # look's last Alltoall) and stop together
    proc = run_program(mpirun, 2, tmp_path, 1e5 * x_field(0), "--T", "1", "--dt", "0.001", check=False)
    assert proc.returncode == 3 and "non-finite vorticity at step" in proc.stderr
    proc = run_program(mpirun, 4, tmp_path, torch.zeros(1, N + 2, N + 2), check=False)  # 34 rows on 4 ranks
    assert proc.returncode == 2 and "not divisible by 4 ranks" in proc.stderr
    proc = run_program(mpirun, 2, tmp_path, torch.zeros(1, N + 1, N + 1), check=False)  # 33 % k != 0
    assert proc.returncode == 2 and "bad input shape" in proc.stderr


def test_as_an_external_mpi_simulator_it_equals_the_serial_forward(mpirun, tmp_path):
    T = 0.1
    x = torch.stack([x_field(s) for s in (1, 2, 3)])
    G = ExternalProgramForward([*PROGRAM, "{input}", "{output}", "--T", str(T), "--k", str(K)], (1, N, N),
                               (N // K) ** 2, launcher=[*mpirun, "-n", "{ranks}"], ranks=2, timeout=120,
                               cwd=ROOT, scratch_dir=tmp_path)
    r = G(x)
    assert r.ok.all(), G.last_failures
    ref = NavierStokesForward(N, K, T)(x)
    assert ref.ok.all()
    for a, b in zip(r.psi.numpy(), ref.psi.numpy()):
        assert rel(a, b) < 1e-10
