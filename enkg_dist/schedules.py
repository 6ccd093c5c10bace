"""Noise-level grids and step schedules of EnKG (enkg.md §2; Karras et al. 2022, eq. 5)."""

from __future__ import annotations

import numpy as np


def karras_sigmas(n: int, sigma_max: float, sigma_min: float, rho: float = 7.0, append_zero: bool = True) -> np.ndarray:
    """sigma_i = (sigma_max^{1/rho} + i/(n-1) (sigma_min^{1/rho} - sigma_max^{1/rho}))^rho, i = 0..n-1 (EDM eq. 5)."""
    if n < 1:
        raise ValueError(f"need at least one noise level, got n={n}")
    if not (sigma_max >= sigma_min > 0):
        raise ValueError(f"need sigma_max >= sigma_min > 0, got {sigma_max}, {sigma_min}")
    if n == 1:
        s = np.array([float(sigma_max)])
    else:
        i = np.arange(n, dtype=np.float64)
        s = (sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return np.concatenate([s, [0.0]]) if append_zero else s


def in_guidance_window(i: int, n: int, t_start: float, t_end: float) -> bool:
    """Corrector active iff t_start*N < i < N - int(t_end*N) (the authors' window)."""
    return t_start * n < i < n - int(t_end * n)


def guidance_scale(i: int, n: int, scale: float, lr_min_ratio: float | None = None) -> float:
    """s_i = s, or the linear decay s (1-r)(N-i)/N + r when r = lr_min_ratio is set."""
    if lr_min_ratio is None:
        return float(scale)
    return float(scale * (1 - lr_min_ratio) * (n - i) / n + lr_min_ratio)


def inner_ode_steps(i: int, n: int, divisor: int = 4, max_steps: int = 20) -> int:
    """n_ode = min(1 + (N-i)//divisor, max_steps): more inner steps at high noise (4 in EnKG, 8 in InverseBench)."""
    return int(min(1 + (n - i) // divisor, max_steps))


def guided_steps(n: int, t_start: float, t_end: float) -> list[int]:
    """Indices i at which the corrector runs."""
    return [i for i in range(n) if in_guidance_window(i, n, t_start, t_end)]


def data_misfit_step(phi: np.ndarray, m: int, t_done: float, terminate_at: float = 1.0) -> float:
    """EKI step dt = min(max(m / (2 mean Phi), sqrt(m / (2 var Phi))), T - t) from the members' misfits
    Phi_j = |Gamma^{-1/2}(y - G(x_j))|^2 / 2 (Iglesias & Yang 2021, EKP.jl's DataMisfitController); the steps sum to
    T = terminate_at (the posterior, for a linear-Gaussian problem), then 0: no more updates."""
    if t_done >= terminate_at:
        return 0.0
    phi = np.asarray(phi, dtype=np.float64)
    mean, var = float(phi.mean()), float(phi.var(ddof=1)) if phi.size > 1 else 0.0
    q = max(m / (2 * mean) if mean > 0 else np.inf, np.sqrt(m / (2 * var)) if var > 0 else 0.0)
    return float(min(q, terminate_at - t_done))
