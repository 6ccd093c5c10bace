"""The GPU table of scripts/gpu_check.sh: solver member-steps/s against the batch (ours and the authors' batched
solver as bench_ns_solver.py writes it, on the same device, the same steps), denoiser members/s in float32 and
bfloat16, and the Kalman update at J = 2048 on the GPU against the CPU. Prints one markdown table.

    python benchmarks/gpu_table.py                     # on a CUDA machine (the README's GPU table)
    python benchmarks/gpu_table.py --device cpu --quick   # a smoke run of the same code on the CPU

Each figure is the best of 3 timed repeats after a warm-up, with the device synchronised around each.
"""

from __future__ import annotations

import argparse

import torch

from bench_ns_solver import AuthorsNS
from timing import best_of

from enkg_dist import kalman
from enkg_dist.noise import NoiseCovariance
from enkg_dist.priors.learned import LearnedPrior
from enkg_dist.priors.unet import EDMDenoiser, UNetConfig
from enkg_dist.problems.navier_stokes.equation import NavierStokes2D
from enkg_dist.problems.navier_stokes.problem import grf_vorticity
from enkg_dist.problems.navier_stokes.solver import solve


def solver_rows(device, n: int, batches, T: float) -> list[tuple[str, str]]:
    """Member-steps per second of the batched solver (paper mode: the batch's steps) at n^2, float32, and of the
    authors' batched solver (bench_ns_solver.AuthorsNS, the same steps) on the same device."""
    eq = NavierStokes2D(n, dealias="disc").to(torch.float32, device)
    ref = AuthorsNS(n, device=device)
    rows = []
    for B in batches:
        w0 = torch.cat([grf_vorticity(n, s) for s in range(B)]).to(device, torch.float32)
        out = {}

        def ours():
            out["res"] = solve(w0, T, mode="paper", equation=eq, chunk=B)

        def authors():
            out["steps"] = ref.solve(w0, T)[1]

        t, t_ref = best_of(ours, device=device), best_of(authors, device=device)
        rate, rate_ref = out["res"].member_steps / t, B * out["steps"] / t_ref
        rows.append((f"solver {n}², B = {B}", f"{rate:,.0f} member-steps/s; the authors' {rate_ref:,.0f} "
                     f"({rate / rate_ref:.2f}×)"))
    return rows


def denoiser_rows(device, n: int, batch: int, channels: int) -> list[tuple[str, str]]:
    """Members per second of the EDM UNet (random weights; speed does not depend on them) in float32 and bf16."""
    cfg = UNetConfig(resolution=n, model_channels=channels, channel_mult=(1, 1, 2, 2), attn_resolutions=(n // 8,))
    model = EDMDenoiser(cfg)
    rows = []
    for precision in ("float32", "bfloat16") if device.type == "cuda" else ("float32",):
        prior = LearnedPrior(model, device=device, precision=precision, max_batch=batch)
        x = torch.randn(batch, 1, n, n, device=device)
        t = best_of(lambda: prior.denoise(x, 1.0), device=device)
        rows.append((f"denoiser {n}², {channels} ch, batch {batch}, {precision}", f"{batch / t:,.0f} members/s"))
    return rows


def kalman_rows(device, J: int, d_side: int, m_side: int) -> list[tuple[str, str]]:
    """EnKG update at J members, d = d_side^2, m = m_side^2, float32, on `device` and on the CPU."""
    g = torch.Generator().manual_seed(0)
    x, psi = torch.randn(J, 1, d_side, d_side, generator=g), torch.randn(J, m_side**2, generator=g)
    y, Gamma = torch.randn(m_side**2, generator=g), NoiseCovariance.scalar(0.01, m_side**2)
    rows = []
    for dev in dict.fromkeys([torch.device("cpu"), device]):
        args = [t.to(dev) for t in (x, psi, y)]
        t = best_of(lambda: kalman.enkg_update(*args, Gamma, 2.0), device=dev)
        rows.append((f"Kalman update J = {J}, d = {d_side}², m = {m_side}², {dev.type}", f"{t * 1e3:,.1f} ms"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    a = ap.parse_args()
    device = torch.device(a.device)
    if a.quick:
        rows = solver_rows(device, 32, [1, 4], 0.05) + denoiser_rows(device, 32, 8, 8) + kalman_rows(device, 64, 32, 16)
    else:
        rows = (solver_rows(device, 128, [1, 4, 16, 64, 256, 1024, 2048], 0.1) + denoiser_rows(device, 128, 256, 128)
                + kalman_rows(device, 2048, 128, 64))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"| on {name} | figure |\n|---|---|")
    for what, figure in rows:
        print(f"| {what} | {figure} |")


if __name__ == "__main__":
    main()
