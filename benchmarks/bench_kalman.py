"""Time of the EnKG update against J at d = 128^2, m = 64^2, as a fraction of this machine's matmul rate.

The update is two GEMMs, A = R P^T (J x m x J) and Delta = A X (J x J x d), plus O(J(d+m)) work, so its time should
grow as J^2 (d + m). The matmul rate is measured here on the same shapes. Usage:
    python benchmarks/bench_kalman.py [--dtype float32|float64] [--max-J 4096]
"""

from __future__ import annotations

import argparse

import torch

from timing import best_of

from enkg_dist.kalman import enkg_update
from enkg_dist.noise import NoiseCovariance


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    ap.add_argument("--max-J", type=int, default=4096)
    ap.add_argument("--d", type=int, default=128 * 128)
    ap.add_argument("--m", type=int, default=64 * 64)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    d, m = args.d, args.m
    g = torch.Generator().manual_seed(0)
    Gamma = NoiseCovariance.scalar(0.01, m)
    print(f"threads={torch.get_num_threads()} dtype={args.dtype} d={d} m={m}")
    print("| J | update (s) | GEMM-only time at measured rate (s) | fraction of matmul rate | "
          "time / J^2(d+m) (ns) | growth vs previous J |")
    print("|---|---|---|---|---|---|")
    prev = None
    J = 64
    while J <= args.max_J:
        x = torch.randn(J, d, generator=g, dtype=dtype)
        psi = torch.randn(J, m, generator=g, dtype=dtype)
        y = torch.randn(m, generator=g, dtype=dtype)
        reps = 5 if J <= 1024 else 2
        t_upd = best_of(lambda: enkg_update(x, psi, y, Gamma, 2.0), reps)
        # the machine's own rate on the same two GEMM shapes
        R = torch.randn(J, m, generator=g, dtype=dtype)
        A = torch.randn(J, J, generator=g, dtype=dtype)
        t_mm = best_of(lambda: (R @ psi.T, A @ x), reps)
        flops = 2 * J * J * m + 2 * J * J * d
        per = t_upd / (J * J * (d + m)) * 1e9
        growth = "" if prev is None else f"{t_upd / prev:.2f}x (ideal 4x)"
        print(f"| {J} | {t_upd:.4f} | {t_mm:.4f} ({flops / t_mm / 1e9:.1f} GFLOP/s) | {t_mm / t_upd:.2f} | "
              f"{per:.3f} | {growth} |", flush=True)
        prev = t_upd
        J *= 2


if __name__ == "__main__":
    main()
