"""Stationary Gaussian random field on the periodic N x N grid, with its exact denoiser (a Fourier multiplier).

A neutral pure module (torch only): the Gaussian prior (priors/gaussian.py), the problems that draw their truth
from a field (linear-Gaussian, Navier-Stokes initial vorticities) and the data generator all use it, so none of them
imports another's package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch


def wavenumbers(n: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer wavenumbers (k1, k2) on the rfft2 half-grid (n, n//2+1) of [0, 2pi]^2; k1 along axis -2."""
    k1 = torch.fft.fftfreq(n, d=1.0 / n, dtype=dtype)
    k2 = torch.fft.rfftfreq(n, d=1.0 / n, dtype=dtype)
    return k1[:, None].expand(n, k2.numel()), k2[None, :].expand(n, k2.numel())


def rfft_weights(n: int, dtype=torch.float64) -> torch.Tensor:
    """How many full-grid modes each rfft2 coefficient stands for (1 on the self-conjugate columns, else 2)."""
    w = torch.full((n, n // 2 + 1), 2.0, dtype=dtype)
    w[:, 0] = 1.0
    if n % 2 == 0:
        w[:, -1] = 1.0
    return w


def _fft(x):
    return torch.fft.rfft2(x, norm="ortho")


def _ifft(xh, n):
    return torch.fft.irfft2(xh, s=(n, n), norm="ortho")


def _shells(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shell index round(|k|) and multiplicity of each rfft2 coefficient, flattened."""
    k1, k2 = wavenumbers(n)
    return torch.round(torch.sqrt(k1**2 + k2**2)).long().reshape(-1), rfft_weights(n).reshape(-1)


def shell_sum(half: torch.Tensor) -> torch.Tensor:
    """Sum of a half-grid quantity over shells of integer |k| (the radially summed spectrum)."""
    shell, w = _shells(half.shape[0])
    return torch.zeros(int(shell.max()) + 1, dtype=half.dtype).index_add_(0, shell, w * half.reshape(-1))


def shell_average(half: torch.Tensor) -> torch.Tensor:
    """Replace each coefficient by the mean over its shell of integer |k| (isotropic smoothing)."""
    shell, w = _shells(half.shape[0])
    count = torch.zeros(int(shell.max()) + 1, dtype=half.dtype).index_add_(0, shell, w)
    return (shell_sum(half) / count.clamp_min(1))[shell].reshape(half.shape)


@dataclass
class GaussianField:
    """x = mu + F^{-1}[sqrt(lam) F z], z white: covariance C = F^{-1} diag(lam) F with orthonormal F.

    `lam` (N, N//2+1) holds the per-mode variances on the rfft2 half-grid; state shape is (1, N, N). As a prior it
    offers everything `enkg_dist.priors.GaussianPrior` declares: its exact denoiser, draws, whitening and mean.
    """

    lam: torch.Tensor
    mean: torch.Tensor  # (N, N) mean field
    max_batch: ClassVar[None] = None  # members per call: all at once (a Fourier multiplier per member)

    @property
    def device(self) -> torch.device:
        """Where the spectrum is held; every call computes on its input's device (the multipliers move there)."""
        return self.lam.device

    def to(self, device) -> GaussianField:
        """The same field: it already computes wherever its input is (a prior actor's device changes nothing)."""
        return self

    @property
    def n(self) -> int:
        return self.lam.shape[0]

    @property
    def state_shape(self) -> tuple[int, int, int]:
        return (1, self.n, self.n)

    @property
    def d(self) -> int:
        return self.n * self.n

    @classmethod
    def matern_like(cls, n: int, alpha: float, tau: float, std: float, zero_mean_mode: bool = False):
        """Spectrum lam_k proportional to (|k|^2 + tau^2)^(-alpha), scaled so that the pointwise std is `std`."""
        k1, k2 = wavenumbers(n)
        lam = (k1**2 + k2**2 + tau**2) ** (-alpha)
        if zero_mean_mode:
            lam[0, 0] = 0.0
        pointwise_var = float((lam * rfft_weights(n)).sum()) / n**2  # (1/N^2) sum over the full grid
        lam = lam * (std**2 / pointwise_var)
        return cls(lam, torch.zeros(n, n, dtype=torch.float64))

    @classmethod
    def fit(cls, data: torch.Tensor, radial: bool = False, floor: float = 1e-12):
        """Fit to samples (S, N, N) or (S, 1, N, N): empirical mean field and per-mode variance, or its radial
        average."""
        data = torch.as_tensor(data, dtype=torch.float64)
        data = data.reshape(-1, data.shape[-2], data.shape[-1])
        if data.shape[0] < 2 or data.shape[-1] != data.shape[-2]:
            raise ValueError(f"need at least 2 square samples to fit a prior, got shape {tuple(data.shape)}")
        mean = data.mean(0)
        power = (_fft(data - mean).abs() ** 2).sum(0) / (data.shape[0] - 1)
        if radial:
            power = shell_average(power)
        # a mode with no variance in the data (e.g. the removed mean) keeps a tiny floor so whitening stays finite
        lam = power.clamp_min(floor * float(power.max()))
        return cls(lam, mean)

    def _check(self, x: torch.Tensor) -> None:
        if tuple(x.shape[-2:]) != (self.n, self.n):
            raise ValueError(f"field shape mismatch: got {tuple(x.shape[-2:])}, prior is {self.n}x{self.n}")

    def _mult(self, x: torch.Tensor, multiplier: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return _ifft(_fft(x) * multiplier.to(device=x.device, dtype=x.dtype), self.n)

    def denoise(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """Exact D(x; sigma) = mu + F^{-1}[lam/(lam + sigma^2) F(x - mu)] for x = x0 + sigma n, x0 ~ prior."""
        self._check(x)
        mu = self.mean.to(device=x.device, dtype=x.dtype)
        return mu + self._mult(x - mu, self.lam / (self.lam + float(sigma) ** 2))

    def sample(self, z: torch.Tensor) -> torch.Tensor:
        """Prior draws from white noise z (B, 1, N, N)."""
        return self.mean.to(device=z.device, dtype=z.dtype) + self._mult(z, self.lam.sqrt())

    def whiten(self, x: torch.Tensor) -> torch.Tensor:
        """(C^+)^{1/2} x for rows x (B, d) or fields (B, 1, N, N); returns the same shape. Modes the prior holds
        fixed (lam = 0, e.g. the removed mean of a vorticity field) are dropped: the pseudo-inverse, so that
        Tikhonov-EKI stays finite (an ensemble drawn from the prior never moves along them)."""
        inv = torch.where(self.lam > 0, self.lam.clamp_min(1e-300).rsqrt(), torch.zeros((), dtype=self.lam.dtype))
        return self._mult(x.reshape(-1, self.n, self.n), inv).reshape(x.shape)

    def apply_cov(self, x: torch.Tensor, power: float = 1.0) -> torch.Tensor:
        """C^power x for fields (..., N, N)."""
        return self._mult(x, self.lam**power)

    def pointwise_variance(self) -> float:
        """Prior variance of x at any grid point."""
        return float((self.lam * rfft_weights(self.n)).sum()) / self.n**2

    def dense_covariance(self) -> torch.Tensor:
        """The (d, d) covariance, for tests on small grids only."""
        if self.d > 4096:
            raise ValueError("dense_covariance is for small grids only")
        eye = torch.eye(self.d, dtype=torch.float64).reshape(self.d, self.n, self.n)
        return self.apply_cov(eye).reshape(self.d, self.d)

    def radial_spectrum(self) -> torch.Tensor:
        """Sum of lam over shells of integer |k|, for comparisons with data."""
        return shell_sum(self.lam)
