"""The serial Navier–Stokes solver of `problems.navier_stokes` for ONE large field, slab-decomposed over MPI ranks.

Same equation (vorticity–stream-function, Re, forcing -A cos(k_f y)), same dealiasing ("disc" by default, as
NavierStokesForward; "two_thirds" too), same Heun + Crank–Nicolson step, same step rules: a fixed dt, or the adaptive
dt = min(cfl h / max|u|, 0.5 h^2 / mu) with h = 1/N, mu = nu sqrt(A) (the serial per-member rule; max|u| is a global
max by Allreduce), the last step clipped to land on T. The numbers equal the serial solver's to rounding.

Layout, R ranks, N % R == 0:
  physical: rank r owns rows x in [r N/R, (r+1) N/R), all N columns y (the field's first axis is split);
  spectral: rank r owns a block of Kl columns k2 of the rfft half-grid (padded from N/2+1 to Kp = R Kl with zero
            columns that stay zero) and all N wavenumbers k1.
Forward 2D FFT = local rfft along y + Alltoall transpose + local fft along x; the inverse runs backwards (ifft along
x, transpose, irfft along y), i.e. the same factorisation torch.fft.irfft2 uses. Each rank computes with one
thread, its spectra k1-contiguous as the serial solver's. Where the serial solver's C library builds and binds MKL
(`navier_stokes/fused.py`) and the slabs are multiples of 16 values, a rank's whole local work between the Alltoalls
is four C calls a step (`SlabNavierStokes.c_step`: its transforms planned as torch plans them, its elementwise passes
the serial solver's fused loops, in buffers kept from step to step), the same bits as the torch ops; without MKL the
passes alone are C (ENKG_NS_FUSED_MKL=0), and ENKG_MPI_FUSED=0 runs every pass and transform as a torch op. Each step
moves 12 fields in 4 transposes, the step rule's velocity riding with the corrector's fields, and one Allreduce (the
step rule's max|u| and the finite check together; on the C path an Iallreduce overlapping the last Alltoall); one
rank replaces the Alltoalls by nothing (its send buffer is what it receives). mpi4py is imported lazily (only the MPI
modules may import it, see tests/test_architecture.py; the slab classes are in mpi_slab.py). mpi4py-fft was tried for
the distributed FFTs: it has no wheel and its source build needs system FFTW libraries, so it does not install from
PyPI alone.

As a program (plugs into ExternalProgramForward as a simulator that needs MPI):

    mpirun -n R python -m enkg_dist.problems.mpi_navier_stokes INPUT.npy OUTPUT.npy [--T 1.0] [--k 2] [--re 200]
        [--dt FIXED] [--dealias disc|two_thirds] [--max-steps 20000] [--scale 10] [--full-output]

INPUT holds x = w/10, shape (1, N, N) or (N, N); OUTPUT gets what NavierStokesForward returns for that member:
w(T)[::k, ::k] flattened (float64), or with --full-output the whole field w(T) as (N, N). Rank 0 reads, scatters,
gathers and writes. A failed solve (non-finite field, step budget exhausted) exits 3 with the reason on stderr.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from enkg_dist.heap import retain_freed_memory
from enkg_dist.problems.mpi_slab import DEALIAS, SlabFFT, SlabNavierStokes, mpi_constant

LANDING_TOL = 1e-9  # as the serial solver: a step within this fraction of dt of T lands on T
SCALE = 10.0  # model space x = w / SCALE, as NavierStokesForward
FAIL_EXIT = 3


def world():
    """MPI.COMM_WORLD (imports mpi4py)."""
    from mpi4py import MPI

    return MPI.COMM_WORLD

@dataclass
class MPISolveResult:
    """omega: w(., T) (N, N) on the root rank (None elsewhere, and None when the solve failed); steps taken; t reached;
    ok / reason (None when T was reached) are the same on every rank; seconds: wall time of the time loop."""

    omega: np.ndarray | None
    steps: int
    t: float
    ok: bool
    reason: str | None
    seconds: float


def _any(comm, flag: bool) -> bool:
    if comm.Get_size() == 1:
        return bool(flag)
    return bool(comm.allreduce(int(bool(flag)), op=mpi_constant("MAX")))


def _max_of(comm, s2: float, flag: bool) -> tuple[float, bool]:
    """(max over the ranks of s2, whether any rank raised flag), in one Allreduce. A NaN s2 counts as inf (MPI's MAX
    is unspecified for NaN; inf fails the same way)."""
    s2 = s2 if math.isfinite(s2) else math.inf
    if comm.Get_size() == 1:
        return s2, bool(flag)
    buf = np.array([s2, float(bool(flag))])
    comm.Allreduce(mpi_constant("IN_PLACE"), buf, op=mpi_constant("MAX"))
    return float(buf[0]), bool(buf[1])

def solve_mpi(omega0: np.ndarray | None, T: float = 1.0, *, comm=None, dt: float | None = None, Re: float = 200.0,
              forcing_amplitude: float = 4.0, forcing_wavenumber: int = 4, dealias: str = "disc", cfl: float = 0.5,
              h: float | None = None, max_steps: int = 100_000, root: int = 0, gather: bool = True,
              max_step_count: int | None = None) -> MPISolveResult:
    """w(., T) from w(., 0) = omega0 (N, N) given on `root` (ignored elsewhere), with the rows split over `comm`.

    Call it on every rank of comm (default COMM_WORLD). dt: a fixed step (the serial solver's mode "fixed"), or None
    for the adaptive per-member rule (serial "per_member" mode). Failure (non-finite velocity or vorticity, or
    max_steps steps without reaching T) gives ok=False and the serial solver's reason. gather=False leaves omega None
    (for timing). max_step_count: stop after that many steps (benchmarks; then ok=False, reason says so).
    """
    comm = comm if comm is not None else world()
    rank, size = comm.Get_rank(), comm.Get_size()
    retain_freed_memory()  # fields of MiBs allocated at every op: page faults otherwise cost half a step
    if dt is not None and not dt > 0:
        raise ValueError(f"fixed step dt must be positive, got {dt}")
    T = float(T)
    if not T >= 0:
        raise ValueError(f"T must be >= 0, got {T}")
    field, head = None, None
    if rank == root:  # checked on the root, the verdict shared: every rank raises, none is left waiting
        field = np.asarray(omega0, dtype=np.float64)
        if field.ndim == 3 and field.shape[0] == 1:
            field = field[0]
        field = np.ascontiguousarray(field)
        if field.ndim != 2 or field.shape[0] != field.shape[1]:
            head = f"omega0 must be (N, N) or (1, N, N), got {field.shape}"
        elif field.shape[0] % size:
            head = f"grid size {field.shape[0]} is not divisible by the number of ranks {size}"
        else:
            head = field.shape[0]
    head = comm.bcast(head, root=root) if size > 1 else head
    if isinstance(head, str):
        raise ValueError(head)
    n = head
    fft = SlabFFT(comm, n)
    eq = SlabNavierStokes(fft, Re, forcing_amplitude, forcing_wavenumber, dealias)
    slab = np.empty((fft.nl, n), dtype=np.float64)
    if size > 1:
        comm.Scatter(field, slab, root=root)
    else:
        slab[:] = field
    h = 1.0 / n if h is None else float(h)
    mu = eq.step_viscosity()

    start = time.perf_counter()
    reason = None
    slab_t = torch.from_numpy(slab)
    if not _any(comm, not bool(torch.isfinite(slab_t).all())):
        w_hat = fft.forward(slab_t[None])[0]
    else:
        reason = "non-finite initial vorticity"
        w_hat = None
    t, steps = 0.0, 0
    if T == 0 and reason is None:
        out_slab = slab
    else:
        out_slab = None
    adaptive = dt is None
    # N(w) and the step rule's max|u|^2 at the current state, from the same transposes; the max over the ranks is
    # reduced together with the previous step's "non-finite vorticity" flag: one collective a step besides the FFTs
    n1 = s2 = None
    if adaptive and reason is None and out_slab is None:
        n1, s2 = eq.tendency(w_hat, speed=True)
        s2 = _max_of(comm, s2, False)[0]
    while reason is None and out_slab is None:
        bad_speed = False
        if adaptive:
            bad_speed = not math.isfinite(s2)
            speed = math.sqrt(s2) if math.isfinite(s2) else float("nan")
            step = min(cfl * h / speed, 0.5 * h * h / mu) if speed != 0 else 0.5 * h * h / mu
        else:
            step = float(dt)
        rem = T - t
        last = rem <= step * (1 + LANDING_TOL)
        if last:
            step = rem
        look = adaptive and not last and not bad_speed
        if eq.c_kernels:  # the look: N(w_{n+1}) (and max|u|^2 when adaptive) unless the solve ends here
            K = 0 if last or bad_speed else 5 if adaptive else 3
            w_hat, n1, s2_local, local_bad = eq.c_step(w_hat, step, n1 if n1 is not None else
                                                       eq.tendency(w_hat)[0], K)
        elif eq.fused:
            w_hat, n1, s2_local, local_bad = eq.fused_step(w_hat, step, n1 if n1 is not None else
                                                           eq.tendency(w_hat)[0], look)
        else:
            w_hat = eq.heun_cn_step(w_hat, step, n1)
            local_bad = not bool(torch.isfinite(torch.view_as_real(w_hat).sum()))  # a finite sum may overflow:
            local_bad = local_bad and not bool(torch.isfinite(torch.view_as_real(w_hat)).all())  # then look at each
            if look:
                n1, s2_local = eq.tendency(w_hat, speed=True)
        t = T if last else t + step
        steps += 1
        if eq.c_kernels and n1 is not None:  # c_step looked: its max|u|^2 and flag are over the ranks already
            s2, bad = (s2_local if look else s2), local_bad
        elif look:
            s2, bad = _max_of(comm, s2_local, local_bad)
        else:
            n1, bad = None, _any(comm, local_bad)
        bad = bad_speed or bad
        at = f"at step {steps} (t={t:.4g})"
        if bad:
            reason = f"non-finite {'velocity' if bad_speed else 'vorticity'} {at}"
        elif last:
            out_slab = fft.inverse(w_hat[None])[0].numpy()
        elif steps >= max_steps:
            reason = f"step budget exhausted: {max_steps} steps reached only t={t:.4g} < T={T:g}"
        elif max_step_count is not None and steps >= max_step_count:
            reason = f"stopped after max_step_count={max_step_count} steps at t={t:.4g}"
    seconds = time.perf_counter() - start

    omega = None
    if reason is None and gather:
        full = np.empty((n, n), dtype=np.float64) if rank == root else None
        if size > 1:
            comm.Gather(np.ascontiguousarray(out_slab), full, root=root)
        else:
            full = out_slab
        omega = full if rank == root else None
    return MPISolveResult(omega, steps, t, reason is None, reason, seconds)


def observe(omega: np.ndarray, k: int) -> np.ndarray:
    """NavierStokesForward.observe for one field: every k-th point in both axes, flattened."""
    return np.ascontiguousarray(omega[::k, ::k]).reshape(-1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m enkg_dist.problems.mpi_navier_stokes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help=".npy with x = w/scale, shape (1, N, N) or (N, N)")
    p.add_argument("output", help=".npy to write: w(T)[::k, ::k] flattened, or w(T) (N, N) with --full-output")
    p.add_argument("--T", type=float, default=1.0, help="final time (default 1)")
    p.add_argument("--k", type=int, default=2, help="subsampling factor of the observation (default 2)")
    p.add_argument("--re", type=float, default=200.0, help="Reynolds number (default 200)")
    p.add_argument("--dt", type=float, default=None, help="fixed time step (default: the adaptive CFL step)")
    p.add_argument("--dealias", choices=DEALIAS, default="disc", help="dealiasing mask (default disc)")
    p.add_argument("--max-steps", type=int, default=20_000, help="step budget (default 20000, as the serial G)")
    p.add_argument("--scale", type=float, default=SCALE, help="w = scale * x (default 10)")
    p.add_argument("--full-output", action="store_true", help="write the whole field w(T) (N, N)")
    args = p.parse_args(argv)
    comm = world()
    rank = comm.Get_rank()
    if comm.Get_size() > 1:
        torch.set_num_threads(1)  # one core per rank
    x, error = None, None
    if rank == 0:  # MPI_Abort may return under some launchers: errors are shared and every rank exits
        try:
            x = np.load(args.input, allow_pickle=False).astype(np.float64)
        except Exception as e:
            error = f"cannot read {args.input}: {type(e).__name__}: {e}"
        else:
            if x.ndim == 3 and x.shape[0] == 1:
                x = x[0]
            if x.ndim != 2 or x.shape[0] != x.shape[1] or (not args.full_output and x.shape[0] % args.k):
                error = f"bad input shape {x.shape} (need (N, N) or (1, N, N) with N % k == 0)"
            elif x.shape[0] % comm.Get_size():
                error = f"grid size {x.shape[0]} is not divisible by {comm.Get_size()} ranks"
    error = comm.bcast(error, root=0)
    if error is not None:
        if rank == 0:
            print(f"mpi_navier_stokes: {error}", file=sys.stderr)
        return 2
    res = solve_mpi(None if x is None else args.scale * x, args.T, comm=comm, dt=args.dt, Re=args.re,
                    dealias=args.dealias, max_steps=args.max_steps)
    if not res.ok:
        if rank == 0:
            print(f"mpi_navier_stokes: solve failed: {res.reason}", file=sys.stderr)
        return FAIL_EXIT
    if rank == 0:
        out = res.omega if args.full_output else observe(res.omega, args.k)
        np.save(args.output, out)
        print(f"mpi_navier_stokes: N={res.omega.shape[0]} on {comm.Get_size()} rank(s), {res.steps} steps to "
              f"t={res.t:g} in {res.seconds:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
