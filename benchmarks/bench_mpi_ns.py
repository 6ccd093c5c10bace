"""Strong scaling of the slab-decomposed MPI Navier–Stokes solver (enkg_dist.problems.mpi_navier_stokes): one N x N
field, a fixed number of adaptive steps (global max|u| by Allreduce each step), R ranks, time per step and speed-up
over R = 1. Rows with more ranks than CPU cores are oversubscribed and marked so. The serial torch solver (one
thread, same field, same steps) is timed too, as the reference.

    python benchmarks/bench_mpi_ns.py [--n 256] [--steps 50] [--ranks 1 2 4] [--repeats 3]
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
    """Run under mpirun: warm up, then time `steps` steps `repeats` times; rank 0 prints the best as JSON."""
    from enkg_dist.problems.mpi_navier_stokes import solve_mpi, world

    comm = world()
    w0 = field(args.n) if comm.Get_rank() == 0 else None
    solve_mpi(w0, 1.0, comm=comm, max_step_count=2, gather=False)  # warm-up (FFT plans, buffers)
    best = float("inf")
    for _ in range(args.repeats):
        comm.Barrier()
        res = solve_mpi(w0, 1.0, comm=comm, max_step_count=args.steps, gather=False)
        best = min(best, comm.allreduce(res.seconds, op=__import__("mpi4py.MPI").MPI.MAX))
    if comm.Get_rank() == 0:
        print(json.dumps({"ranks": comm.Get_size(), "steps": res.steps, "seconds": best}))


def serial(n: int, steps: int, repeats: int) -> float:
    """Seconds per step of the serial torch solver (1 thread) on the same field, same adaptive rule."""
    import torch

    from enkg_dist.problems.navier_stokes import NavierStokes2D, solve

    torch.set_num_threads(1)
    w0 = torch.from_numpy(field(n))[None]
    eq = NavierStokes2D(n, dealias="disc")
    solve(w0, 1.0, equation=eq, max_steps=2)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        solve(w0, 1.0, equation=eq, max_steps=steps)  # stops (budget exhausted) after `steps` steps
        best = min(best, time.perf_counter() - t0)
    return best / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--repeats", type=int, default=3)
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
    print(f"MPI NS solver, {args.n}^2, {args.steps} adaptive steps, best of {args.repeats}, {cores} CPU core(s)")
    ref = serial(args.n, args.steps, args.repeats)
    print(f"serial torch solver (1 thread): {1e3 * ref:.2f} ms/step")
    print(f"{'ranks':>5} {'ms/step':>9} {'speed-up':>9} {'efficiency':>10}  note")
    base = None
    for r in args.ranks:
        cmd = [mpirun, *flags, "-n", str(r), sys.executable, __file__, "--worker", "--n", str(args.n),
               "--steps", str(args.steps), "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
        if out.returncode:
            print(f"{r:>5} failed: {out.stderr.strip()[-500:]}")
            continue
        res = json.loads(out.stdout.strip().splitlines()[-1])
        per = res["seconds"] / res["steps"]
        if base is None:
            base = per * r  # the first row (R = 1 normally) is the reference, taken as perfectly efficient
        sp = base / per
        note = f"oversubscribed ({r} ranks on {cores} cores)" if r > cores else ""
        print(f"{r:>5} {1e3 * per:>9.2f} {sp:>9.2f} {sp / r:>10.2f}  {note}")


if __name__ == "__main__":
    main()
