"""2D incompressible Navier–Stokes in vorticity–stream-function form on the periodic square [0, 2pi]^2.

    d_t w + u . grad w = nu Lap w + f,    u = (d_y psi, -d_x psi),    -Lap psi = w,    nu = 1/Re,

pseudo-spectral with rfft2 over the last two axes (x = axis -2 with wavenumber k1, y = axis -1 with k2, integers).
The equation only: the Fourier-space tendency of the nonlinear term plus forcing, the viscous symbol, the velocity.
Time stepping lives in `integrator.py`. FFTs use torch's default ("backward") normalisation.
"""

from __future__ import annotations

import math

import torch

from enkg_dist.problems.navier_stokes.kernels import irfft2_k1, rfft2_k1, tendency_from_spectra

DEALIAS = ("two_thirds", "disc")


def _wavenumbers(n: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer (k1, k2) on the rfft2 half-grid (n, n//2+1); the Nyquist row and column carry -n/2 and n/2."""
    k1 = torch.fft.fftfreq(n, d=1.0 / n, dtype=dtype, device=device)
    k2 = torch.fft.rfftfreq(n, d=1.0 / n, dtype=dtype, device=device)
    return k1[:, None].expand(n, k2.numel()), k2[None, :].expand(n, k2.numel())


def _zero_nyquist(k: torch.Tensor, n: int) -> torch.Tensor:
    """Derivative wavenumbers: i k on the Nyquist mode is not a real operator, so it is set to zero."""
    k = k.clone()
    if n % 2 == 0:
        k[k.abs() == n // 2] = 0.0
    return k


def dealias_mask(n: int, kind: str, dtype=torch.float64, device=None) -> torch.Tensor:
    """Mask on the half-grid: "two_thirds" keeps 3|k1| < n and 3|k2| < n (Orszag's 2/3 rule, a square); "disc"
    keeps k1^2 + k2^2 <= 2 (n/3)^2 (the authors' choice). Both drop the mean mode (it never enters u . grad w)."""
    k1, k2 = _wavenumbers(n, dtype, device)
    if kind == "two_thirds":
        keep = (3 * k1.abs() < n) & (3 * k2.abs() < n)
    elif kind == "disc":
        keep = k1**2 + k2**2 <= 2 * (n / 3) ** 2
    else:
        raise ValueError(f"unknown dealiasing {kind!r}; choose one of {DEALIAS}")
    keep = keep.to(dtype)
    keep[0, 0] = 0.0
    return keep


class NavierStokes2D:
    """The right-hand side of d_t w = N(w) + nu Lap w on an n x n grid, for fields of shape (..., n, n).

    forcing f = -A cos(k_f y) (A = forcing_amplitude, off when 0). dealias "two_thirds" masks the input fields and the
    tendency (a Galerkin truncation: it conserves energy and enstrophy in the resolved band); "disc" masks the input
    fields only, as the authors' code does.
    """

    def __init__(self, n: int, Re: float = 200.0, forcing_amplitude: float = 4.0, forcing_wavenumber: int = 4,
                 dealias: str = "two_thirds", dtype: torch.dtype = torch.float64, device=None):
        if n < 4:
            raise ValueError(f"grid size {n} is too small")
        if forcing_amplitude and not 0 < forcing_wavenumber < n / 2:
            raise ValueError(f"forcing wavenumber {forcing_wavenumber} is not resolved on a {n}^2 grid")
        self.n, self.Re, self.dealias = int(n), float(Re), dealias
        self.forcing_amplitude, self.forcing_wavenumber = float(forcing_amplitude), int(forcing_wavenumber)
        self.dtype, self.device = dtype, torch.device(device) if device is not None else torch.device("cpu")
        cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        self.cdtype = cdtype
        k1, k2 = _wavenumbers(n, dtype, self.device)
        self.k2_abs = k1**2 + k2**2  # |k|^2, -Lap in Fourier space
        self.inv_lap = torch.where(self.k2_abs > 0, 1.0 / self.k2_abs.clamp_min(1.0), 0.0)
        self.ik1 = (1j * _zero_nyquist(k1, n)).to(cdtype)
        self.ik2 = (1j * _zero_nyquist(k2, n)).to(cdtype)
        self.mask = dealias_mask(n, dealias, dtype, self.device)
        # rfft2 of -A cos(k_f y) is exactly -A n^2 / 2 at (0, k_f): one mode, so the mean stays exactly zero
        self.f_mode = -self.forcing_amplitude * n * n / 2
        self.f_hat = torch.zeros(n, n // 2 + 1, dtype=cdtype, device=self.device)
        self.f_hat[0, self.forcing_wavenumber] = self.f_mode
        # fused multipliers of the tendency: masked w_hat -> (u_hat, v_hat), and -d/dx, -d/dy (masked for 2/3)
        self._to_u = self.mask * self.inv_lap * self.ik2
        self._to_v = -self.mask * self.inv_lap * self.ik1
        out_mask = self.mask if dealias == "two_thirds" else torch.ones_like(self.mask)
        self._neg_dx, self._neg_dy = -out_mask * self.ik1, -out_mask * self.ik2
        # stacked multipliers, one broadcast product and one FFT call per stage: w_hat -> masked (w, u, v) for the
        # tendency, then unmasked (u, v) for the step rule's max|u|; the flux pair -> the divergence's two terms
        # (complex, also the mask: a complex x real product first casts its real factor, one more pass). Stored
        # k1-contiguous, the layout of the solver's spectra (see `fft`)
        # (the inverse FFT's 1/n^2 is folded in: `kernels.tendency_from_spectra`)
        scale = 1.0 / (n * n)
        self._tendency_mult = k1_contiguous(torch.stack([self.mask.to(cdtype), self._to_u, self._to_v]) * scale)
        self._first_mult = k1_contiguous(torch.cat([self._tendency_mult, torch.stack([self.inv_lap * self.ik2,
                                                                                      -self.inv_lap * self.ik1])
                                                    * scale]))
        self._flux_mult = k1_contiguous(torch.stack([self._neg_dx, self._neg_dy]))
        self.half_viscous_c = k1_contiguous(0.5 * self.viscous_symbol()).to(cdtype)  # L/2, Crank–Nicolson factors

    @property
    def nu(self) -> float:
        """Kinematic viscosity nu = 1/Re."""
        return 1.0 / self.Re

    def to(self, dtype: torch.dtype | None = None, device=None) -> NavierStokes2D:
        """The same equation for another dtype or device (self when nothing changes)."""
        dtype = dtype or self.dtype
        device = torch.device(device) if device is not None else self.device
        if dtype == self.dtype and device == self.device:
            return self
        return NavierStokes2D(self.n, self.Re, self.forcing_amplitude, self.forcing_wavenumber, self.dealias,
                              dtype, device)

    def fft(self, w: torch.Tensor, k1_contiguous: bool = False) -> torch.Tensor:
        """rfft2 over the last two axes; k1_contiguous: the same values laid out with k1 (axis -2) contiguous in
        memory, the solver's layout (`kernels.rfft2_k1`)."""
        return rfft2_k1(w) if k1_contiguous else torch.fft.rfft2(w)

    def ifft(self, w_hat: torch.Tensor) -> torch.Tensor:
        """irfft2 over the last two axes, for either layout (k1-contiguous spectra: `kernels.irfft2_k1`)."""
        if w_hat.dim() < 2 or not w_hat.transpose(-1, -2).is_contiguous() or w_hat.is_contiguous():
            return torch.fft.irfft2(w_hat, s=(self.n, self.n))
        return irfft2_k1(w_hat, self.n)

    def kernel_constants(self, adaptive: bool = True) -> tuple:
        """What `kernels.lane_step` takes after its state and the step's factors (`kernels.cn_factors` of
        `half_viscous_c`): (the tendency's 3 multipliers, the look's multipliers (5 with the step rule's unmasked
        velocity when adaptive, else the tendency's 3), the flux's 2, the forcing mode's value, its wavenumber, n)."""
        look = self._first_mult if adaptive else self._tendency_mult
        return self._tendency_mult, look, self._flux_mult, self.f_mode, self.forcing_wavenumber, self.n

    def viscous_symbol(self) -> torch.Tensor:
        """L = -nu |k|^2: the Fourier symbol of nu Lap, on the half-grid (n, n//2+1)."""
        return -self.nu * self.k2_abs

    def forcing(self) -> torch.Tensor:
        """f(x, y) = -A cos(k_f y) on the grid (n, n)."""
        return self.ifft(self.f_hat)

    def stream_function(self, w_hat: torch.Tensor) -> torch.Tensor:
        """psi_hat = w_hat / |k|^2 (from -Lap psi = w), with the mean mode set to zero."""
        return w_hat * self.inv_lap

    def velocity_hat(self, w_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(u_hat, v_hat) = (i k2 psi_hat, -i k1 psi_hat), i.e. u = (d_y psi, -d_x psi)."""
        psi = self.stream_function(w_hat)
        return self.ik2 * psi, -self.ik1 * psi

    def velocity(self, w_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, v) on the grid from the vorticity's Fourier coefficients."""
        u, v = self.ifft(torch.stack(self.velocity_hat(w_hat)))
        return u, v

    def max_speed(self, w_hat: torch.Tensor) -> torch.Tensor:
        """max over the grid of |u| = sqrt(u^2 + v^2), one value per member (shape w_hat.shape[:-2])."""
        u, v = self.velocity(w_hat)
        return (u * u + v * v).amax(dim=(-2, -1)).sqrt()

    def energy(self, w_hat: torch.Tensor) -> torch.Tensor:
        """Kinetic energy per unit area, E = (1/2) mean |u|^2, per member."""
        u, v = self.velocity(w_hat)
        return 0.5 * (u * u + v * v).mean(dim=(-2, -1))

    def tendency(self, w_hat: torch.Tensor) -> torch.Tensor:
        """N(w_hat) = -F[div(u w)] + f_hat (= -F[u . grad w] + f_hat since div u = 0), dealiased."""
        return self._tendency(w_hat.unsqueeze(-3) * self._tendency_mult)[0]

    def tendency_and_max_speed2(self, w_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N(w_hat), max over the grid of u^2 + v^2 per member): the tendency and the step rule's speed from one
        batched inverse FFT of five fields (masked w, u, v for N; unmasked u, v for the speed, as `max_speed`)."""
        return self._tendency(w_hat.unsqueeze(-3) * self._first_mult)

    def _tendency(self, spec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """N(w_hat) from the spectra (..., K, n, n//2+1) of masked w, u, v, and max(u^2 + v^2) over fields 4-5 (the
        unmasked velocity) when K = 5 (`kernels.tendency_from_spectra`)."""
        return tendency_from_spectra(spec, self._flux_mult, self.f_mode, self.forcing_wavenumber, self.n)

    def __repr__(self) -> str:
        return (f"NavierStokes2D(n={self.n}, Re={self.Re:g}, forcing={self.forcing_amplitude:g}cos"
                f"({self.forcing_wavenumber}y), dealias={self.dealias!r}, dtype={self.dtype}, device={self.device})")


def k1_contiguous(t: torch.Tensor) -> torch.Tensor:
    """t (..., n, n//2+1) with the same values, laid out with axis -2 (k1) contiguous in memory."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def grid(n: int, dtype=torch.float64, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid coordinates (x, y), each (n, n), with x along axis -2 and y along axis -1, spacing 2 pi / n."""
    t = torch.arange(n, dtype=dtype, device=device) * (2 * math.pi / n)
    return torch.meshgrid(t, t, indexing="ij")
