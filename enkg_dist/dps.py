"""Diffusion posterior sampling (DPS, Chung et al. 2023) in the EDM/VE form: the gradient-access reference that EnKG
is compared with (it needs dG/dx, here by autograd through our differentiable torch solver).

Each member runs the Euler probability-flow step from sigma_i to sigma_(i+1), then moves against the gradient of its
data misfit through the denoiser: x <- x_euler - zeta grad_x s |Gamma^{-1/2}(y - G(D(x; sigma_i)))| (Chung et al.
2023, Algorithm 1, with the norm's gradient, i.e. their zeta_i = zeta / |y - A(x0_hat)| on the squared norm);
s = sqrt(tr Gamma / m) puts the whitened misfit back in data units, so that zeta does not depend on the noise level
(for Gamma = s^2 I the misfit is their plain |y - A(x0_hat)|).
Members are independent: J samples of DPS, not an ensemble method. Pure maths: collaborators are arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from enkg_dist import schedules
from enkg_dist.noise import NoiseCovariance


@dataclass(frozen=True)
class DPSConfig:
    """Hyperparameters of DPS on the EDM noise grid."""

    num_steps: int = 80
    sigma_max: float = 80.0
    sigma_min: float = 0.002
    rho: float = 7.0
    scale: float = 1.0  # zeta: the step along the misfit norm's gradient, in units of x

    def sigmas(self):
        return schedules.karras_sigmas(self.num_steps, self.sigma_max, self.sigma_min, self.rho)


def misfit_gradient(denoise: Callable, forward: Callable, x: torch.Tensor, sigma: float, y: torch.Tensor,
                    Gamma: NoiseCovariance) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x s |Gamma^{-1/2}(G(D(x; sigma)) - y)| per member, D(x; sigma), the misfit norms), s = sqrt(tr Gamma /
    m); members whose forward output is not finite get a zero gradient and an infinite norm."""
    x = x.detach().requires_grad_(True)
    units = (Gamma.trace() / Gamma.m) ** 0.5
    with torch.enable_grad():
        x0 = denoise(x, sigma)
        r = Gamma.whiten(forward(x0) - y)
        norm = units * r.pow(2).sum(1).sqrt()
        ok = torch.isfinite(norm)
        (g,) = torch.autograd.grad(torch.where(ok, norm, torch.zeros((), dtype=norm.dtype)).sum(), x)
    g = torch.where(ok.reshape(-1, *[1] * (x.dim() - 1)), torch.nan_to_num(g), torch.zeros((), dtype=g.dtype))
    return g, x0.detach(), torch.where(ok, norm.detach(), torch.full((), float("inf"), dtype=norm.dtype))


def dps_step(denoise: Callable, forward: Callable, x: torch.Tensor, sigma: float, sigma_next: float, y: torch.Tensor,
             Gamma: NoiseCovariance, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One DPS step (Chung et al. 2023, Alg. 1 line 7 in EDM form); returns (x at sigma_next, misfit norms)."""
    g, x0, norm = misfit_gradient(denoise, forward, x, sigma, y, Gamma)
    x_euler = x.detach() + (sigma_next - sigma) * (x.detach() - x0) / sigma
    return x_euler - scale * g, norm


def dps_sample(denoise: Callable, forward: Callable, x_T: torch.Tensor, y: torch.Tensor, Gamma: NoiseCovariance,
               cfg: DPSConfig, callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None
               ) -> torch.Tensor:
    """DPS from x_T at sigma_max to sigma = 0 (the last step is the plain Euler step to 0, no guidance)."""
    sigmas = cfg.sigmas()
    x = x_T
    for i in range(cfg.num_steps):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x, norm = dps_step(denoise, forward, x, sigma, sigma_next, y, Gamma, cfg.scale if sigma_next > 0 else 0.0)
        if callback is not None:
            callback(i, x, norm)
    return x
