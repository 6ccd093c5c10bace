"""Example plug-ins for `problem.kind: python` and `prior.kind: python` (jobs/python_plugin_example.yaml).

`heat_forward` builds G: the heat equation u_t = Laplace(u) on the periodic square [0, 2 pi]^2, run for `time` from
u(0) = x and observed on every k-th grid point. `gaussian_denoiser` builds D(x, sigma) = E[x0 | x0 + sigma n] for a
zero-mean stationary Gaussian field whose spectrum is (|k|^2 + tau^2)^(-alpha), scaled to a pointwise std `std`: a
Fourier multiplier lam / (lam + sigma^2). Any module with factories of these signatures will do: a factory returns
G(x) -> (B, obs_size) for x (B, *state_shape), or D(x, sigma) -> (B, *state_shape) for sigma (B,).
"""

from __future__ import annotations

import numpy as np
import torch


def _k2(n: int) -> np.ndarray:
    k = np.fft.fftfreq(n, 1.0 / n)
    return k[:, None] ** 2 + k[None, :] ** 2


def heat_forward(n: int = 32, k: int = 4, time: float = 0.02):
    """G(x) for x (B, 1, n, n): the heat equation's solution at `time`, every k-th point, (B, (n // k)^2)."""
    decay = torch.from_numpy(np.exp(-_k2(n) * time))

    def G(x: torch.Tensor) -> torch.Tensor:
        u = torch.fft.ifft2(torch.fft.fft2(x) * decay.to(x.device)).real
        return u[:, 0, ::k, ::k].reshape(x.shape[0], -1)

    return G


def gaussian_spectrum(n: int = 32, alpha: float = 2.0, tau: float = 3.0, std: float = 0.5) -> torch.Tensor:
    """lam (n, n): the field's variance per Fourier mode (orthonormal FFT), with mean std^2 (the pointwise
    variance)."""
    lam = (_k2(n) + tau**2) ** (-alpha)
    return torch.from_numpy(lam * std**2 / lam.mean())


def gaussian_denoiser(n: int = 32, alpha: float = 2.0, tau: float = 3.0, std: float = 0.5, device: str = "cpu"):
    """D(x, sigma) = E[x0 | x0 + sigma n] for the zero-mean Gaussian field of `gaussian_spectrum` (EDM convention)."""
    lam = gaussian_spectrum(n, alpha, tau, std).to(device)

    def D(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s2 = sigma.reshape(-1, 1, 1, 1) ** 2
        xh = torch.fft.fft2(x, norm="ortho")
        return torch.fft.ifft2(xh * (lam / (lam + s2)).to(x.dtype), norm="ortho").real

    return D


def gaussian_sample(n: int = 32, alpha: float = 2.0, tau: float = 3.0, std: float = 0.5, seed: int = 0):
    """One draw (1, n, n) of that field (how jobs/plugins/heat_truth.npy was made)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, n, n, generator=g, dtype=torch.float64)
    return torch.fft.ifft2(torch.fft.fft2(z, norm="ortho") * gaussian_spectrum(n, alpha, tau, std).sqrt(),
                           norm="ortho").real
