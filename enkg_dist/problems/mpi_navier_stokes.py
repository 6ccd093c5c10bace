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
x, transpose, irfft along y), i.e. the same factorisation torch.fft.irfft2 uses. Local FFTs and arithmetic are the
serial solver's (torch, one intra-op thread per rank, spectra k1-contiguous): one rank runs exactly the serial
kernel (a local transpose where more ranks have the Alltoall), and each step moves 12 fields in 4 transposes, the
step rule's velocity riding with the predictor's fields. mpi4py is imported lazily (only this module may import
it, see tests/test_architecture.py). mpi4py-fft was tried for the distributed FFTs: it has no wheel and its source
build needs system FFTW libraries, so it does not install from PyPI alone.

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
from enkg_dist.problems.navier_stokes.equation import k1_contiguous
from enkg_dist.problems.navier_stokes.kernels import cn_factors

LANDING_TOL = 1e-9  # as the serial solver: a step within this fraction of dt of T lands on T
DEALIAS = ("disc", "two_thirds")
SCALE = 10.0  # model space x = w / SCALE, as NavierStokesForward
FAIL_EXIT = 3


def world():
    """MPI.COMM_WORLD (imports mpi4py)."""
    from mpi4py import MPI

    return MPI.COMM_WORLD


class SlabFFT:
    """2D real FFTs of a field whose rows are split over the ranks of `comm`; batched over leading axes (torch).

    forward: (B, Nl, N) real -> (B, N, Kl) complex (all k1, this rank's k2 block)
    inverse: (B, N, Kl) complex -> (B, Nl, N) real
    """

    def __init__(self, comm, n: int):
        self.comm, self.n = comm, int(n)
        self.size, self.rank = comm.Get_size(), comm.Get_rank()
        if self.n % self.size:
            raise ValueError(f"grid size {n} is not divisible by the number of ranks {self.size}")
        self.nl = self.n // self.size  # rows per rank
        self.nk = self.n // 2 + 1  # rfft columns
        self.kl = -(-self.nk // self.size)  # k2 columns per rank (padded)
        self.kp = self.kl * self.size
        self.k2_lo = self.rank * self.kl  # this rank's first k2 column
        self._row_types: dict = {}  # B -> the MPI datatype of `_rows`

    @staticmethod
    def layout(t: torch.Tensor) -> torch.Tensor:
        """t (..., N, Kl) in the memory layout of the spectra: k1 contiguous (the serial solver's, see
        NavierStokes2D.fft), so that the column FFTs read and write without strides."""
        return k1_contiguous(t)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """rfft along y, transpose, fft along x."""
        a = torch.fft.rfft(f, dim=-1)  # (B, nl, nk)
        if self.size == 1:  # the serial solver's transform: a local transpose in place of the Alltoall
            return torch.fft.fft(a.transpose(-1, -2).contiguous(), dim=-1).transpose(-1, -2)
        B, R, nl, kl = f.shape[0], self.size, self.nl, self.kl
        send = a.new_zeros((R, B, kl, nl)) if self.kp > self.nk else a.new_empty((R, B, kl, nl))
        for r in range(R):  # send[r]: the columns of rank r, transposed (padding columns stay zero)
            lo, hi = r * kl, min((r + 1) * kl, self.nk)
            send[r, :, : hi - lo, :] = a[..., lo:hi].transpose(-1, -2)
        spec = a.new_empty((B, kl, self.n))
        # rank s's rows land straight in columns s nl .. (s+1) nl of every (field, k2) row: no unpacking copy
        self.comm.Alltoall([send.numpy(), B * kl * nl, _mpi("C_DOUBLE_COMPLEX")], [spec.numpy(), 1, self._rows(B)])
        return torch.fft.fft(spec, dim=-1).transpose(-1, -2)  # (B, N, kl), k1 contiguous

    def inverse(self, s: torch.Tensor) -> torch.Tensor:
        """ifft along x, transpose, irfft along y."""
        a = torch.fft.ifft(s.transpose(-1, -2), dim=-1)  # (B, kl, N): x contiguous
        if self.size == 1:
            return torch.fft.irfft(a.transpose(-1, -2).contiguous(), n=self.n, dim=-1)
        B, R, nl, kl = s.shape[0], self.size, self.nl, self.kl
        a = a.contiguous()
        recv = a.new_empty((R, B, kl, nl))  # recv[s] = (B, columns of rank s, my rows)
        # rank r's rows go straight from columns r nl .. (r+1) nl of every (field, k2) row: no packing copy
        self.comm.Alltoall([a.numpy(), 1, self._rows(B)], [recv.numpy(), B * kl * nl, _mpi("C_DOUBLE_COMPLEX")])
        half = recv.permute(1, 3, 0, 2).reshape(B, nl, self.kp)
        return torch.fft.irfft(half if self.kp == self.nk else half[..., : self.nk], n=self.n, dim=-1)

    def _rows(self, B: int):
        """MPI datatype of one rank's share of B kl rows of length N: nl values per row, consecutive ranks' shares
        nl values apart (a vector type resized to nl values), so that Alltoall reads or writes them in place."""
        if B not in self._row_types:
            base = _mpi("C_DOUBLE_COMPLEX")
            vec = base.Create_vector(B * self.kl, self.nl, self.n)
            self._row_types[B] = vec.Create_resized(0, self.nl * base.Get_extent()[1]).Commit()
            vec.Free()
        return self._row_types[B]


class SlabNavierStokes:
    """The right-hand side of NavierStokes2D (equation.py) on this rank's spectral slab (N, Kl), float64."""

    def __init__(self, fft: SlabFFT, Re: float = 200.0, forcing_amplitude: float = 4.0, forcing_wavenumber: int = 4,
                 dealias: str = "disc"):
        if dealias not in DEALIAS:
            raise ValueError(f"unknown dealiasing {dealias!r}; choose one of {DEALIAS}")
        n = fft.n
        if forcing_amplitude and not 0 < forcing_wavenumber < n / 2:
            raise ValueError(f"forcing wavenumber {forcing_wavenumber} is not resolved on a {n}^2 grid")
        self.fft, self.n, self.Re, self.dealias = fft, n, float(Re), dealias
        self.forcing_amplitude, self.forcing_wavenumber = float(forcing_amplitude), int(forcing_wavenumber)
        f64 = torch.float64
        cols = torch.arange(fft.k2_lo, fft.k2_lo + fft.kl)
        valid = cols < fft.nk  # padding columns carry zero everything
        k1 = fft.layout(torch.fft.fftfreq(n, d=1.0 / n, dtype=f64)[:, None].expand(n, fft.kl))
        k2 = fft.layout(torch.where(valid, cols, 0).to(f64)[None, :].expand(n, fft.kl))
        k2_abs = k1**2 + k2**2
        inv_lap = torch.where(k2_abs > 0, 1.0 / k2_abs.clamp_min(1.0), 0.0)
        zn1 = torch.where(k1.abs() == n // 2, 0.0, k1) if n % 2 == 0 else k1
        zn2 = torch.where(k2.abs() == n // 2, 0.0, k2) if n % 2 == 0 else k2
        ik1, ik2 = 1j * zn1, 1j * zn2
        if dealias == "two_thirds":
            keep = (3 * k1.abs() < n) & (3 * k2.abs() < n)
        else:
            keep = k1**2 + k2**2 <= 2 * (n / 3) ** 2
        mask = keep.to(f64) * valid[None, :]
        if fft.k2_lo == 0:
            mask[0, 0] = 0.0
        self.f_mode = -self.forcing_amplitude * n * n / 2
        c = self.forcing_wavenumber - fft.k2_lo
        self.f_col = c if self.forcing_amplitude and 0 <= c < fft.kl else None
        # as NavierStokes2D: masked (w, u, v) for the tendency and unmasked (u, v) for the step rule, complex
        to_u, to_v = mask * inv_lap * ik2, -mask * inv_lap * ik1
        stack = lambda *ts: fft.layout(torch.stack(ts))  # noqa: E731
        self._tendency_mult = stack(mask.to(torch.complex128), to_u, to_v)
        self._first_mult = stack(mask.to(torch.complex128), to_u, to_v, inv_lap * ik2, -inv_lap * ik1)
        out_mask = mask if dealias == "two_thirds" else torch.ones_like(mask)
        self._flux_mult = stack(-out_mask * ik1, -out_mask * ik2)
        self.half_viscous_c = fft.layout(0.5 * (-(1.0 / self.Re) * k2_abs)).to(torch.complex128)  # L/2, L = nu Lap

    @property
    def nu(self) -> float:
        return 1.0 / self.Re

    def step_viscosity(self) -> float:
        """mu = nu sqrt(max|f|) with forcing, nu without (solver.step_viscosity)."""
        return self.nu * (math.sqrt(abs(self.forcing_amplitude)) if self.forcing_amplitude else 1.0)

    def tendency(self, w_hat: torch.Tensor, speed: bool = False) -> tuple[torch.Tensor, float | None]:
        """(N(w_hat) = -F[div(u w)] + f_hat on this rank's slab (N, Kl), and with speed=True the max of u^2 + v^2 over
        this rank's rows, from the same transpose: NavierStokes2D.tendency_and_max_speed2)."""
        fields = self.fft.inverse(w_hat.unsqueeze(0) * (self._first_mult if speed else self._tendency_mult))
        flux_hat = self.fft.forward(fields[1:3] * fields[0:1]).mul_(self._flux_mult)
        nonlin = flux_hat[0].add_(flux_hat[1])
        if self.f_col is not None:
            nonlin[0, self.f_col] += self.f_mode
        if not speed:
            return nonlin, None
        uv = fields[3:5]
        return nonlin, float((uv * uv).sum(dim=0).max())

    def heun_cn_step(self, w_hat: torch.Tensor, dt: float, n1: torch.Tensor | None = None) -> torch.Tensor:
        """integrator.heun_cn_step for one field (n1: N(w_hat) if already known)."""
        e, g = cn_factors(self.half_viscous_c, dt, None)
        if n1 is None:
            n1 = self.tendency(w_hat)[0]
        ew = w_hat * e
        n2 = self.tendency(torch.addcmul(ew, g, n1))[0]
        return ew.addcmul_(g, n1.add_(n2), value=0.5)


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
    return bool(comm.allreduce(int(bool(flag)), op=_mpi("MAX")))


def _max_of(comm, s2: float, flag: bool) -> tuple[float, bool]:
    """(max over the ranks of s2, whether any rank raised flag), in one Allreduce. A NaN s2 counts as inf (MPI's MAX
    is unspecified for NaN; inf fails the same way)."""
    s2 = s2 if math.isfinite(s2) else math.inf
    if comm.Get_size() == 1:
        return s2, bool(flag)
    buf = np.array([s2, float(bool(flag))])
    comm.Allreduce(_mpi("IN_PLACE"), buf, op=_mpi("MAX"))
    return float(buf[0]), bool(buf[1])


def _mpi(name: str):
    """mpi4py.MPI.<name> (imported here, lazily)."""
    from mpi4py import MPI

    return getattr(MPI, name)


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
        w_hat = eq.heun_cn_step(w_hat, step, n1)
        t = T if last else t + step
        steps += 1
        local_bad = not bool(torch.isfinite(torch.view_as_real(w_hat).sum()))  # a sum of finite values may overflow:
        local_bad = local_bad and not bool(torch.isfinite(torch.view_as_real(w_hat)).all())  # then look at each
        if adaptive and not last and not bad_speed:
            n1, s2 = eq.tendency(w_hat, speed=True)
            s2, bad = _max_of(comm, s2, local_bad)
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
