"""Strong scaling of the slab-decomposed MPI Navier–Stokes solver (enkg_dist.problems.mpi_navier_stokes) against the
serial torch solver: one N x N float64 field, a fixed number of adaptive steps (global max|u| by Allreduce each
step), R ranks of one thread each. For each size the serial solver (this process, one thread) and every R are timed
in turn, `--rounds` times over (so that a busy machine slows all of them alike); each figure is the fastest round.
Rows with more ranks than CPU cores are oversubscribed and marked so. Prints the load average before and after.

    python benchmarks/bench_mpi_ns.py [--sizes 512 1024 2048] [--steps 20] [--ranks 1 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def field(n: int, seed: int = 0) -> np.ndarray:
    """A smooth random vorticity (std 5) with spectrum ~ (|k|^2 + 9)^(-2.5), as the NS problem's GRF."""
    g = np.random.default_rng(seed)
    k1 = np.fft.fftfreq(n, 1.0 / n)[:, None]
    k2 = np.fft.rfftfreq(n, 1.0 / n)[None, :]
    amp = (k1**2 + k2**2 + 9.0) ** -1.25
    amp[0, 0] = 0.0
    w = np.fft.irfft2(amp * (g.standard_normal(amp.shape) + 1j * g.standard_normal(amp.shape)), s=(n, n))
    return 5.0 * w / w.std()


def worker(args) -> None:
    """Run under mpirun: warm up, then time `steps` steps; rank 0 prints the slowest rank's time as JSON."""
    import torch
    from mpi4py import MPI

    from enkg_dist.problems.mpi_navier_stokes import solve_mpi, world

    torch.set_num_threads(1)
    comm = world()
    w0 = field(args.n) if comm.Get_rank() == 0 else None
    solve_mpi(w0, 1.0, comm=comm, max_step_count=2, gather=False)  # warm-up (FFT plans, buffers)
    comm.Barrier()
    res = solve_mpi(w0, 1.0, comm=comm, max_step_count=args.steps, gather=False)
    seconds = comm.allreduce(res.seconds, op=MPI.MAX)
    if comm.Get_rank() == 0:
        print(json.dumps({"ranks": comm.Get_size(), "steps": res.steps, "seconds": seconds}))


def serial(n: int, steps: int) -> float:
    """Seconds per step of the serial torch solver (1 thread) on the same field, same adaptive rule."""
    import torch

    from enkg_dist.problems.navier_stokes import NavierStokes2D, solve

    torch.set_num_threads(1)
    w0 = torch.from_numpy(field(n))[None]
    eq = NavierStokes2D(n, dealias="disc")
    solve(w0, 1.0, equation=eq, max_steps=2)
    t0 = time.perf_counter()
    solve(w0, 1.0, equation=eq, max_steps=steps)  # stops (budget exhausted) after `steps` steps
    return (time.perf_counter() - t0) / steps


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--steps", type=int, default=20, help="steps at 512^2, scaled by (512/N)^2 above (at least 3)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    beside = Path(sys.executable).parent / "mpirun"
    mpirun = str(beside) if os.access(beside, os.X_OK) else shutil.which("mpirun")
    if mpirun is None:
        sys.exit("no mpirun beside this Python or on PATH")
    version = subprocess.run([mpirun, "--version"], capture_output=True, text=True).stdout
    flags = ["--allow-run-as-root", "--oversubscribe"] if "Open MPI" in version else []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    print(f"MPI NS solver, float64, adaptive steps, fastest of {args.rounds} interleaved rounds, {cores} CPU core(s); "
          f"{load()}")
    print(f"{'N':>5} {'steps':>5} {'serial ms/step':>14} {'ranks':>5} {'ms/step':>9} {'vs serial':>9} "
          f"{'speed-up':>8} {'efficiency':>10}  note")
    for n in args.sizes:
        steps = max(3, round(args.steps * (512 / n) ** 2)) if n > 512 else args.steps
        best = {"serial": float("inf"), **{r: float("inf") for r in args.ranks}}
        for _ in range(args.rounds):
            best["serial"] = min(best["serial"], serial(n, steps))
            for r in args.ranks:
                cmd = [mpirun, *flags, "-n", str(r), sys.executable, __file__, "--worker", "--n", str(n),
                       "--steps", str(steps)]
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
                if out.returncode:
                    sys.exit(f"{r} ranks failed: {out.stderr.strip()[-500:]}")
                res = json.loads(out.stdout.strip().splitlines()[-1])
                best[r] = min(best[r], res["seconds"] / res["steps"])
        one = best.get(1)
        for r in args.ranks:
            per = best[r]
            sp = one / per if one else float("nan")
            note = f"oversubscribed ({r} ranks on {cores} cores)" if r > cores else ""
            print(f"{n:>5} {steps:>5} {1e3 * best['serial']:>14.2f} {r:>5} {1e3 * per:>9.2f} "
                  f"{best['serial'] / per:>8.2f}x {sp:>8.2f} {sp / r:>10.2f}  {note}")
    print(load())


if __name__ == "__main__":
    main()
