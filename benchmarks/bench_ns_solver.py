"""Our NS solver against a reference implementation of the authors' batched solver, side by side.

The reference (`AuthorsNS`, below) is written from the published description (enkg.md §4): pseudo-spectral rfft2,
Heun on the nonlinear term and forcing, Crank–Nicolson on the viscous term, the authors' disc dealiasing and zeroed
Nyquist derivatives, one step for the whole batch dt = min(0.5 h / max|u|, 0.5 h^2 / mu) with h = 1/N and
mu = nu sqrt(max|f|), the max taken over every member of the batch, the last step clipped to land on T. It does what
that description says in the plainest batched way: one irfft2 / rfft2 call per field for the whole batch.

Compared, at each torch thread count, on the same initial fields (GRF draws as the NS problem's, float32, T = 1):
  authors      the reference, the whole batch in each call
  paper        ours, step_mode paper (the same steps as the reference; results agree to float32 round-off)
  paper c1     the same with chunk=1 (a member's bits depend on nothing else)
  per_member   ours, each member's own step (the production rule)
  member c1    the same with chunk=1 (NavierStokesForward's member_chunk 1; its default "auto" runs the
               per_member lanes where its start-up check finds them bit-identical to chunk=1, as printed)
  fft floor    the transforms of paper mode's steps and nothing else (3 + 5 inverse, 2 + 2 forward per member-step,
               the same lanes, threads and layouts: in C a member at a time where the solver's whole step is, else
               scripted), on fixed inputs: what paper mode would cost if every other pass were free. The
               reference's time over it bounds what paper mode can reach with these FFTs.
The configurations run in turn, `--rounds` times over, so that a busy machine slows all of them alike; each figure
is the fastest round. "rate" is member-steps per second against the reference's; "overall" is wall time against the
reference's. The load average is printed before and after.

Both solvers run under the same allocator: our solver keeps freed memory in the process (`enkg_dist.heap`, set on its
first CPU solve, process-wide), so the benchmark sets it before anything runs and the reference has it from its
first round. Without it, the reference's batched temporaries (1 MiB a field at 128^2, 16 members) come back as
fresh pages at every operation; before this was set here, the reference paid those page faults and ours, in
smaller lanes, fewer, and the ratios flattered ours (1 thread, paper mode, three runs in a row: 1.15x and 1.14x
with both retaining, 1.29x with ENKG_RETAIN_FREED_MEMORY=0, which turns it off for both).

    python benchmarks/bench_ns_solver.py [--n 128] [--members 16] [--T 1.0] [--threads 1 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

from enkg_dist.heap import retain_freed_memory
from enkg_dist.problems.navier_stokes import NavierStokes2D, fused, grf_vorticity, solve
from enkg_dist.problems.navier_stokes.kernels import irfft2_k1, rfft2_k1, scripted
from enkg_dist.problems.navier_stokes.lane_threads import run_all, single_threaded_ops
from enkg_dist.problems.navier_stokes.solver import resolve_chunk, whole_step_in_c


class AuthorsNS:
    """The authors' batched solver as published (enkg.md §4), float32 by default: batch-minimum adaptive step."""

    def __init__(self, n: int, Re: float = 200.0, forcing_amplitude: float = 4.0, forcing_wavenumber: int = 4,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.n, self.dtype = n, dtype
        k1 = torch.fft.fftfreq(n, 1.0 / n, dtype=dtype, device=device)[:, None].expand(n, n // 2 + 1)
        k2 = torch.fft.rfftfreq(n, 1.0 / n, dtype=dtype, device=device)[None, :].expand(n, n // 2 + 1)
        self.lap = k1**2 + k2**2  # -Laplacian
        self.inv_lap = 1.0 / torch.where(self.lap > 0, self.lap, torch.ones_like(self.lap))
        self.inv_lap[0, 0] = 0.0
        self.d1 = torch.where(k1.abs() == n // 2, 0.0, k1)  # derivative wavenumbers, Nyquist zeroed
        self.d2 = torch.where(k2.abs() == n // 2, 0.0, k2)
        self.dealias = (k1**2 + k2**2 <= 2 * (n / 3) ** 2).to(dtype)  # the authors' disc
        self.dealias[0, 0] = 0.0
        self.visc = self.lap / Re
        y = torch.arange(n, dtype=dtype, device=device) * (2 * math.pi / n)
        self.f_hat = torch.fft.rfft2((-forcing_amplitude * torch.cos(forcing_wavenumber * y))[None, :].expand(n, n))
        self.h = 1.0 / n
        self.mu = math.sqrt(forcing_amplitude) / Re

    def velocity(self, w_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u = d_y psi, v = -d_x psi on the grid, -Lap psi = w."""
        psi = self.inv_lap * w_hat
        return (torch.fft.irfft2(1j * self.d2 * psi, s=(self.n, self.n)),
                torch.fft.irfft2(-1j * self.d1 * psi, s=(self.n, self.n)))

    def nonlinear(self, w_hat: torch.Tensor) -> torch.Tensor:
        """-F[u . grad w] (divergence form, dealiased input) + f_hat."""
        wm = w_hat * self.dealias
        w = torch.fft.irfft2(wm, s=(self.n, self.n))
        u, v = self.velocity(wm)
        return -1j * (self.d1 * torch.fft.rfft2(u * w) + self.d2 * torch.fft.rfft2(v * w)) + self.f_hat

    def time_step(self, w_hat: torch.Tensor) -> float:
        """min(0.5 h / max|u|, 0.5 h^2 / mu), the max over the whole batch."""
        u, v = self.velocity(w_hat)
        speed = torch.sqrt(u**2 + v**2).max().item()
        return 0.5 * self.h**2 / self.mu if speed == 0 else min(0.5 * self.h / speed, 0.5 * self.h**2 / self.mu)

    def solve(self, w0: torch.Tensor, T: float) -> tuple[torch.Tensor, int]:
        """(w(., T) for the batch w0 (B, N, N), steps taken)."""
        w_hat, t, steps = torch.fft.rfft2(w0), 0.0, 0
        dt = self.time_step(w_hat)
        while t < T:
            d = T - t if t + dt > T else dt
            n1 = self.nonlinear(w_hat)
            w_tilde = (w_hat + d * (n1 - 0.5 * self.visc * w_hat)) / (1.0 + 0.5 * d * self.visc)
            n2 = self.nonlinear(w_tilde)
            w_hat = (w_hat + d * (0.5 * (n1 + n2) - 0.5 * self.visc * w_hat)) / (1.0 + 0.5 * d * self.visc)
            t, steps = t + d, steps + 1
            dt = self.time_step(w_hat)
        return torch.fft.irfft2(w_hat, s=(self.n, self.n)), steps


def transforms(spec3: torch.Tensor, spec5: torch.Tensor, flux: torch.Tensor, n: int, steps: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The FFTs of `steps` paper-mode lane steps and nothing else: 3 + 5 inverse, 2 + 2 forward per member (returned,
    so that TorchScript does not drop them as dead code)."""
    a, b, c, d = spec3, flux, spec5, flux
    for _ in range(steps):
        a = irfft2_k1(spec3, n, False)
        b = rfft2_k1(flux)
        c = irfft2_k1(spec5, n, False)
        d = rfft2_k1(flux)
    return a, b, c, d


def fft_floor(eq: NavierStokes2D, w0: torch.Tensor, steps: int) -> int:
    """Only the transforms of our paper-mode steps, `steps` per member, in the solver's lanes and threads, as the
    solver runs them: in C where its whole step is (`fused.mkl_bound`), else scripted like its kernels. Returns the
    member-steps done."""
    threads = torch.get_num_threads()  # the caller's: single_threaded_ops sets this thread's count to 1
    whole_c = whole_step_in_c(eq)
    n, chunk = eq.n, resolve_chunk(None, eq, "paper", None, w0.shape[0], threads, whole_c)  # the solver's lanes
    if whole_c:
        sizes = [min(chunk, w0.shape[0] - i) for i in range(0, w0.shape[0], chunk)]
        with single_threaded_ops():
            run_all([lambda b=b: fused.transforms(n, w0.dtype, b, 5, steps) for b in sizes], threads)
        return steps * w0.shape[0]
    tendency_mult, look_mult = eq.kernel_constants(adaptive=True)[:2]
    kernel = scripted(transforms)
    lanes = []
    for i in range(0, w0.shape[0], chunk):
        w_hat = eq.fft(w0[i : i + chunk], k1_contiguous=True)
        fields = eq.ifft(w_hat.unsqueeze(-3) * tendency_mult)  # the lane's inputs, in the kernel's layouts
        lanes.append((w_hat.unsqueeze(-3) * tendency_mult, w_hat.unsqueeze(-3) * look_mult,
                      fields[:, 1:3] * fields[:, 0:1]))
    with single_threaded_ops():
        run_all([lambda a=a: kernel(*a, n, steps) for a in lanes], threads)
    return steps * w0.shape[0]


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--members", type=int, default=16)
    ap.add_argument("--T", type=float, default=1.0)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    n, B, T = args.n, args.members, args.T
    retained = retain_freed_memory()  # the allocator our solver sets for its process, for both (see above)
    dtype = torch.float32
    w0 = torch.cat([grf_vorticity(n, seed) for seed in range(B)]).to(dtype)
    ref = AuthorsNS(n, dtype=dtype)
    eq = NavierStokes2D(n, dealias="disc", dtype=dtype)  # the authors' equation for both step rules
    runs = {
        "authors": lambda: ref.solve(w0, T),
        "paper": lambda: solve(w0, T, mode="paper", equation=eq),
        "paper c1": lambda: solve(w0, T, mode="paper", equation=eq, chunk=1),
        "per_member": lambda: solve(w0, T, mode="per_member", equation=eq),
        "member c1": lambda: solve(w0, T, mode="per_member", equation=eq, chunk=1),
        "fft floor": lambda: fft_floor(eq, w0, out["authors"][1]),  # the reference ran first in this round
    }
    before = torch.get_num_threads()
    print(f"NS solver, {n}^2 float32, {B} members, T = {T:g}, torch {torch.__version__}; fastest of {args.rounds} "
          f"interleaved rounds; freed memory retained: {retained}; {load()}")
    best = {(k, name): float("inf") for k in args.threads for name in runs}
    out = {}
    torch.set_num_threads(1)
    for name, f in runs.items():  # warm-up (FFT plans, the lane threads)
        out[name] = f() if T <= 0.05 else None
    for _ in range(args.rounds):
        for k in args.threads:
            torch.set_num_threads(k)
            for name, f in runs.items():
                t0 = time.perf_counter()
                out[name] = f()
                best[k, name] = min(best[k, name], time.perf_counter() - t0)
    torch.set_num_threads(before)
    ref_omega, ref_steps = out["authors"]
    work = {"authors": B * ref_steps, "fft floor": out["fft floor"],
            **{name: out[name].member_steps for name in runs if name not in ("authors", "fft floor")}}
    per = {name: work[name] / B for name in runs}
    diff = float((out["paper"].omega - ref_omega).abs().max() / ref_omega.abs().max())
    assert int(out["paper"].batch_steps) == ref_steps, (out["paper"].batch_steps, ref_steps)
    print(f"{'threads':>7} {'solver':>11} {'seconds':>8} {'steps/member':>12} {'member-steps/s':>14} {'rate':>6} "
          f"{'overall':>7}")
    for k in args.threads:
        for name in runs:
            s = best[k, name]
            rate = (work[name] / s) / (work["authors"] / best[k, "authors"])
            print(f"{k:>7} {name:>11} {s:>8.2f} {per[name]:>12.0f} {work[name] / s:>14.0f} {rate:>5.2f}x "
                  f"{best[k, 'authors'] / s:>6.2f}x")
    for k in args.threads:
        print(f"{k} thread(s): our transforms alone take {best[k, 'fft floor'] / best[k, 'paper']:.0%} of paper mode's "
              f"time; with every other pass free, paper mode would run at most "
              f"{best[k, 'authors'] / best[k, 'fft floor']:.2f}x the reference's member-step rate")
    print(f"paper mode takes the reference's {ref_steps} steps; max |ours - reference| / max |reference| = {diff:.1e}")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    for k in args.threads:  # NavierStokesForward's default: checked once per process
        auto = resolve_chunk("auto", eq, "per_member", None, B, k, whole_step_in_c(eq))
        default = resolve_chunk(None, eq, "per_member", None, B, k, whole_step_in_c(eq))
        print(f"member_chunk auto (the jobs' default) runs lanes of {auto} members here at {k} thread(s) "
              f"('per_member' above: {default}); its start-up check took {time.perf_counter() - t0:.2f} s")
    torch.set_num_threads(before)
    print(load())


if __name__ == "__main__":
    main()
