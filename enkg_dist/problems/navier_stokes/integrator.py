"""Time integrator for d_t w = N(w) + L w: Heun (RK2) on N, Crank–Nicolson on L; second order overall.

    w~      = [(1 + dt L/2) w_n + dt N(w_n)] / (1 - dt L/2)
    w_{n+1} = [(1 + dt L/2) w_n + dt (N(w_n) + N(w~))/2] / (1 - dt L/2)

as in the authors' solver; dt is one value per member, broadcast over the grid.
"""

from __future__ import annotations

import torch

from enkg_dist.problems.navier_stokes.equation import NavierStokes2D


def heun_cn_step(eq: NavierStokes2D, w_hat: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """One Heun/Crank–Nicolson step of every member: w_hat (B, n, n//2+1) complex, dt (B,) -> w_hat at t + dt."""
    d = dt.to(device=w_hat.device, dtype=eq.dtype).reshape(*dt.shape, 1, 1)
    half_dl = 0.5 * d * eq.viscous_symbol()
    explicit = w_hat * (1 + half_dl)
    implicit = 1 / (1 - half_dl)
    n1 = eq.tendency(w_hat)
    w_tilde = (explicit + d * n1) * implicit
    n2 = eq.tendency(w_tilde)
    return (explicit + (0.5 * d) * (n1 + n2)) * implicit
