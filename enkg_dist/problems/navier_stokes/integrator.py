"""Time integrator for d_t w = N(w) + L w: Heun (RK2) on N, Crank–Nicolson on L; second order overall.

    w~      = [(1 + dt L/2) w_n + dt N(w_n)] / (1 - dt L/2)
    w_{n+1} = [(1 + dt L/2) w_n + dt (N(w_n) + N(w~))/2] / (1 - dt L/2)

as in the authors' solver; dt is one value per member, broadcast over the grid.
"""

from __future__ import annotations

import torch

from enkg_dist.problems.navier_stokes.equation import NavierStokes2D
from enkg_dist.problems.navier_stokes.kernels import cn_factors, heun_cn


def heun_cn_step(eq: NavierStokes2D, w_hat: torch.Tensor, dt: torch.Tensor | float, n1: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """One Heun/Crank–Nicolson step of every member: w_hat (B, n, n//2+1) complex, dt (B,) or one float for all ->
    w_hat at t + dt.

    Written as w~ = e w_n + g N(w_n), w_{n+1} = e w_n + (g/2) (N(w_n) + N(w~)) with q = 1/(1 - dt L/2),
    e = (1 + dt L/2) q = 2q - 1 and g = dt q: four passes over the complex arrays besides the two tendencies.
    n1: N(w_hat) when the caller already has it (the solver gets it with the step rule's speed, from one FFT call).
    """
    dts = None
    if isinstance(dt, torch.Tensor):
        dts, dt = dt.to(device=w_hat.device, dtype=eq.dtype).reshape(*dt.shape, 1, 1), 0.0
    if n1 is None:
        n1 = eq.tendency(w_hat)
    tendency_mult, _, flux_mult, f_mode, kf, n = eq.kernel_constants()
    e, g = cn_factors(eq.half_viscous_c, float(dt), dts)
    return heun_cn(w_hat, n1, e, g, tendency_mult, flux_mult, f_mode, kf, n)
