"""The Navier–Stokes inverse problem of EnKG / InverseBench (enkg.md §4): recover w(., 0) from w(., T) on a subgrid.

Model space x = w(., 0)/10 (so the prior sees std ~ 0.5); G(x) = S_k w(., T) with w(., 0) = 10 x, S_k keeping every
k-th point in both axes. The relative L2 error of the paper is scale-free, so it is the same on x as on w and
`enkg_dist.metrics.ensemble_metrics` applies to x directly.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from enkg_dist import rng
from enkg_dist.evaluation import judge
from enkg_dist.fields import GaussianField
from enkg_dist.localisation import grid_geometry
from enkg_dist.metrics import ensemble_metrics
from enkg_dist.noise import NoiseCovariance
from enkg_dist.problems.base import ForwardModel, ForwardResult, InverseProblem
from enkg_dist.problems.navier_stokes.equation import NavierStokes2D
from enkg_dist.problems.navier_stokes.solver import solve

SCALE = 10.0  # w = SCALE * x
NOISE_FLOOR = 1e-3  # Gamma's std when noise_std = 0 is asked (Gamma must be positive definite; y stays noiseless)


class NavierStokesForward(ForwardModel):
    """G(x) = S_k w(., T), w(., 0) = 10 x; x (B, 1, n, n) -> (B, (n/k)^2).

    Steps are per member by default, so each row's output is independent of the other rows. dealias defaults to the
    authors' disc mask, so that G is their operator up to the step rule. dtype/device: where the solve runs (default:
    x's); the output has x's dtype and device. A member whose solve fails gets NaN and the solver's reason.
    """

    def __init__(self, n: int = 128, k: int = 2, T: float = 1.0, Re: float = 200.0, forcing_amplitude: float = 4.0,
                 forcing_wavenumber: int = 4, dealias: str = "disc", mode: str = "per_member",
                 max_steps: int = 20_000, dtype: torch.dtype | None = None, device=None,
                 chunk: int | str | None = "auto", dt: float | None = None):
        if n % k:
            raise ValueError(f"grid size {n} is not a multiple of the subsampling factor {k}")
        self.n, self.k, self.T, self.mode, self.max_steps = n, k, float(T), mode, int(max_steps)
        self.dt = dt  # the step of mode "fixed" (a smooth map of x: exact gradients for DPS checks)
        self.dtype, self.device = dtype, device
        # members per FFT call: 1 keeps each member's bits independent of the batch it came in (FFT kernels may
        # vectorise across a batch, so a batched result can differ at round-off); "auto": the solver's fastest
        # lanes where its start-up check finds them bit-identical to 1 on this machine (solver.batch_invariant), else
        # 1; None: the fastest, unchecked
        self.chunk = chunk
        self.equation = NavierStokes2D(n, Re, forcing_amplitude, forcing_wavenumber, dealias)
        self._equations = {}  # (dtype, device) -> the equation there, built once
        self.state_shape = (1, n, n)
        self.obs_size = (n // k) ** 2

    on_gpu = True

    def for_device(self, device: torch.device) -> NavierStokesForward:
        """A copy solving on `device`, the whole batch per FFT call off the CPU (member_chunk applies on the CPU)."""
        other = copy.copy(self)
        other.device, other._equations = torch.device(device), {}
        if other.device.type != "cpu":
            other.chunk = None
        return other

    def geometry(self):
        """The n x n grid of w(., 0); observations of w(., T) at every k-th point. The flow carries information
        over distance during [0, T]: a localisation radius must cover that transport."""
        return grid_geometry(self.n, self.k)

    def observe(self, omega: torch.Tensor) -> torch.Tensor:
        """S_k: fields (B, n, n) -> (B, m), every k-th point in both axes."""
        return omega[..., :: self.k, :: self.k].reshape(omega.shape[0], -1)

    def solve(self, x: torch.Tensor):
        """The solver's result for w(., 0) = 10 x, x (B, 1, n, n)."""
        w0 = SCALE * x[:, 0].to(dtype=self.dtype or x.dtype, device=self.device or x.device)
        key = (w0.dtype, w0.device)
        if key not in self._equations:
            self._equations[key] = self.equation.to(*key)
        return solve(w0, self.T, mode=self.mode, equation=self._equations[key], max_steps=self.max_steps,
                     chunk=self.chunk, dt=self.dt)

    def __call__(self, x: torch.Tensor, members: Sequence[int] | None = None) -> ForwardResult:
        self.check_input(x)
        res = self.solve(x)
        psi = self.observe(res.omega).to(dtype=x.dtype, device=x.device)
        return judge(ForwardResult(psi, res.ok.to(x.device), res.reasons))


def grf_vorticity(n: int, seed: int, alpha: float = 2.5, tau: float = 3.0, std: float = 5.0) -> torch.Tensor:
    """A zero-mean Gaussian random field (1, n, n) with pointwise std `std` and mode variances (|k|^2 + tau^2)^(-alpha).

    enkg.md §4 writes the spectrum as (|k|^2 + tau^2)^(-alpha/2): we read that as the amplitude (as in the PINO
    generator, whose sqrt_eig carries the power -alpha/2), so the variance goes as its square.
    """
    prior = GaussianField.matern_like(n, alpha, tau, std, zero_mean_mode=True)
    return prior.sample(rng.member_normal(seed, rng.DATA, [0], (n, n)))


def initial_vorticity(n: int, seed: int, spinup: float = 5.0, equation: NavierStokes2D | None = None) -> torch.Tensor:
    """A test field like the paper's: a GRF draw evolved for `spinup` time units (float64, (n, n))."""
    w = grf_vorticity(n, seed)
    if spinup > 0:
        res = solve(w, spinup, equation=equation or NavierStokes2D(n, dealias="disc"))
        if not bool(res.ok.all()):
            raise RuntimeError(f"spin-up of the truth failed: {res.reasons[0]}")
        w = res.omega
    return w[0]


def make_problem(n: int = 128, k: int = 2, noise_std: float = 0.0, T: float = 1.0,
                 truth: torch.Tensor | int | None = None, seed: int = 0, spinup: float = 5.0,
                 dtype: torch.dtype = torch.float64, **forward_kwargs) -> InverseProblem:
    """y = G(x_true) + N(0, noise_std^2 I), Gamma = max(noise_std, NOISE_FLOOR)^2 I.

    truth: an initial vorticity (n, n) or (1, n, n) in vorticity units, or a seed for `initial_vorticity` (None: use
    `seed`). The noise is drawn from `seed`'s OBS_NOISE stream. forward_kwargs go to NavierStokesForward.
    """
    G = NavierStokesForward(n, k, T, **forward_kwargs)
    if truth is None or isinstance(truth, int):
        omega0 = initial_vorticity(n, seed if truth is None else truth, spinup, G.equation)
    else:
        omega0 = torch.as_tensor(truth, dtype=torch.float64).reshape(n, n)
    x_true = (omega0 / SCALE).reshape(1, n, n).to(dtype)
    res = G(x_true[None])
    if not bool(res.ok[0]):
        raise RuntimeError(f"forward solve of the truth failed: {res.reasons[0]}")
    eps = rng.member_normal(seed, rng.OBS_NOISE, [0], (G.obs_size,), dtype=dtype)[0]
    y = res.psi[0] + float(noise_std) * eps
    gamma_std = max(float(noise_std), NOISE_FLOOR)
    return InverseProblem("navier_stokes", G, y, NoiseCovariance.scalar(gamma_std**2, G.obs_size), x_true,
                          extras={"noise_std": float(noise_std), "gamma_std": gamma_std, "k": k, "T": float(T),
                                  "scale": SCALE})


def metrics(x: torch.Tensor, problem: InverseProblem) -> dict:
    """The paper's metric: relative L2 of each particle against the truth, averaged (scale-free: same on x and w)."""
    return ensemble_metrics(x, problem.x_true)
