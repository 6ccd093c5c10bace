"""Member-steps per second of the batched torch NS solver on CPU against a plain per-member numpy solve of the same
scheme, and the work to reach T = 1 with per-member steps against the authors' batch-minimum rule.

A member-step is one Heun/Crank–Nicolson step of one field. The numpy reference (below) is the same scheme, one
member at a time, with numpy's FFT. The T = 1 ensemble: GRF draws (alpha 2.5, tau 3, std 5) times amplitudes spread
log-uniformly over [0.5, 2], standing in for particles of unequal roughness. Usage:
    python benchmarks/bench_ns_solver.py [--sizes 64 128] [--batches 1 4 16 64] [--t1-n 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from enkg_dist.problems.navier_stokes import NavierStokes2D, grf_vorticity, solve


class NumpyNS:
    """The same equation and step as the torch solver (2/3 rule, f = -4 cos 4y, Re 200), one member, numpy FFTs."""

    def __init__(self, n: int, Re: float = 200.0):
        k1 = np.fft.fftfreq(n, 1.0 / n)[:, None] * np.ones((1, n // 2 + 1))
        k2 = np.fft.rfftfreq(n, 1.0 / n)[None, :] * np.ones((n, 1))
        self.n, self.lap = n, k1**2 + k2**2
        self.inv_lap = np.where(self.lap > 0, 1.0 / np.maximum(self.lap, 1.0), 0.0)
        d1, d2 = k1.copy(), k2.copy()
        d1[np.abs(d1) == n // 2], d2[np.abs(d2) == n // 2] = 0.0, 0.0
        self.ik1, self.ik2 = 1j * d1, 1j * d2
        self.mask = ((3 * np.abs(k1) < n) & (3 * np.abs(k2) < n)).astype(float)
        self.mask[0, 0] = 0.0
        self.f_hat = np.zeros_like(self.ik1)
        self.f_hat[0, 4] = -4.0 * n * n / 2
        self.L = -self.lap / Re

    def tendency(self, w_hat):
        w_m = w_hat * self.mask
        psi = w_m * self.inv_lap
        w, u, v = (np.fft.irfft2(a, s=(self.n, self.n)) for a in (w_m, self.ik2 * psi, -self.ik1 * psi))
        nl = -(self.ik1 * np.fft.rfft2(u * w) + self.ik2 * np.fft.rfft2(v * w))
        return nl * self.mask + self.f_hat

    def step(self, w_hat, dt):
        half = 0.5 * dt * self.L
        explicit, implicit = w_hat * (1 + half), 1 / (1 - half)
        n1 = self.tendency(w_hat)
        n2 = self.tendency((explicit + dt * n1) * implicit)
        return (explicit + 0.5 * dt * (n1 + n2)) * implicit

    def solve(self, w0, dt, steps):
        w_hat = np.fft.rfft2(w0)
        for _ in range(steps):
            w_hat = self.step(w_hat, dt)
        return np.fft.irfft2(w_hat, s=(self.n, self.n))


def fields(n: int, B: int, dtype=torch.float64) -> torch.Tensor:
    amps = np.exp(np.linspace(np.log(0.5), np.log(2.0), B)) if B > 1 else np.ones(1)
    return torch.cat([float(a) * grf_vorticity(n, seed) for seed, a in enumerate(amps)]).to(dtype)


def best_time(fn, repeats: int = 3) -> float:
    fn()  # warm-up (FFT plans, allocations)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def torch_rate(n: int, B: int, steps: int, dt: float, dtype) -> float:
    w0 = fields(n, B, dtype)
    return B * steps / best_time(lambda: solve(w0, steps * dt, mode="fixed", dt=dt))


def numpy_rate(n: int, steps: int, dt: float, members: int = 2) -> tuple[float, float]:
    """(member-steps/s, max |numpy - torch| after `steps` steps) for the per-member numpy solve."""
    ref, w0 = NumpyNS(n), fields(n, members)
    rate = members * steps / best_time(lambda: [ref.solve(w.numpy(), dt, steps) for w in w0])
    out = [ref.solve(w.numpy(), dt, steps) for w in w0]
    diff = float(np.abs(np.stack(out) - solve(w0, steps * dt, mode="fixed", dt=dt).omega.numpy()).max())
    return rate, diff


def to_T1(n: int, B: int, dtype) -> None:
    w0 = fields(n, B, dtype)
    eq = NavierStokes2D(n, dealias="disc", dtype=dtype)  # the authors' equation for both rules
    print(f"\nT = 1, {B} members at {n}^2 ({dtype}), authors' step rule dt = min(0.5 h/max|u|, 0.5 h^2/mu), h = 1/N:")
    print(f"{'rule':>12} {'member-steps':>13} {'batched steps':>14} {'wall s':>8} {'steps/member min-med-max':>26}")
    for mode in ("per_member", "paper"):
        t0 = time.perf_counter()
        res = solve(w0, 1.0, mode=mode, equation=eq)
        wall = time.perf_counter() - t0
        s = res.steps.sort().values
        print(f"{mode:>12} {res.member_steps:>13} {res.batch_steps:>14} {wall:>8.1f} "
              f"{int(s[0]):>10}-{int(s[len(s) // 2])}-{int(s[-1])}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    ap.add_argument("--t1-n", type=int, default=64, help="grid of the T = 1 comparison (0 skips it)")
    ap.add_argument("--t1-batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (numpy FFT uses one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype, dt = getattr(torch, args.dtype), 1e-3
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}; numpy reference in float64, "
          f"one member at a time; fixed dt = {dt}, {args.steps} steps per timing, best of 3")
    print(f"{'N':>4} {'B':>4} {'torch m-steps/s':>16} {'numpy m-steps/s':>16} {'ratio':>7}")
    for n in args.sizes:
        np_rate, diff = numpy_rate(n, args.steps, dt)
        for B in args.batches:
            rate = torch_rate(n, B, args.steps, dt, dtype)
            print(f"{n:>4} {B:>4} {rate:>16.0f} {np_rate:>16.0f} {rate / np_rate:>7.2f}")
        print(f"{'':>9}(numpy and torch agree to {diff:.1e} after {args.steps} steps)")
    if args.t1_n:
        to_T1(args.t1_n, args.t1_batch, dtype)


if __name__ == "__main__":
    main()
