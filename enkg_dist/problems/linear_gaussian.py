"""Linear-Gaussian test problem: y = S_k(B x) + eps on a Gaussian-field prior, with its closed-form posterior.

B is an optional Gaussian blur (a Fourier multiplier), S_k keeps every k-th grid point. Because prior and blur are
stationary, H C H^T is circulant on the coarse grid, so the posterior mean needs only FFTs, and the posterior
covariance is a rank-one update within each alias class of k^2 Fourier modes (never a d x d inverse).
"""

from __future__ import annotations

import torch

from enkg_dist.localisation import grid_geometry
from enkg_dist.noise import NoiseCovariance
from enkg_dist.fields import GaussianField, wavenumbers
from enkg_dist.problems.base import ForwardModel, ForwardResult, InverseProblem


class SubsampleBlur(ForwardModel):
    """G(x) = S_k(B x): blur by exp(-|k|^2 w^2 / 2) (w in domain units of [0, 2pi]), then keep every k-th point."""

    on_gpu = True  # FFTs and slicing on whatever device x is on

    def __init__(self, n: int, k: int, blur: float = 0.0):
        if n % k:
            raise ValueError(f"grid size {n} is not a multiple of the subsampling factor {k}")
        self.n, self.k, self.blur = n, k, float(blur)
        self.state_shape = (1, n, n)
        self.obs_size = (n // k) ** 2
        k1, k2 = wavenumbers(n)
        self.b = torch.exp(-0.5 * (k1**2 + k2**2) * self.blur**2)

    def geometry(self):
        """The n x n state grid; observations at every k-th point (blur does not move them)."""
        return grid_geometry(self.n, self.k)

    def blur_field(self, x: torch.Tensor) -> torch.Tensor:
        if self.blur == 0.0:
            return x
        return torch.fft.irfft2(torch.fft.rfft2(x, norm="ortho") * self.b.to(device=x.device, dtype=x.dtype),
                                s=x.shape[-2:], norm="ortho")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """H x for fields (B, 1, N, N) -> (B, m)."""
        return self.blur_field(x)[..., :: self.k, :: self.k].reshape(x.shape[0], -1)

    def adjoint(self, v: torch.Tensor) -> torch.Tensor:
        """H^T v for (B, m) -> fields (B, 1, N, N): zero-fill up-sampling, then the (symmetric) blur."""
        up = torch.zeros(v.shape[0], 1, self.n, self.n, dtype=v.dtype, device=v.device)
        up[..., :: self.k, :: self.k] = v.reshape(v.shape[0], 1, self.n // self.k, self.n // self.k)
        return self.blur_field(up)

    def __call__(self, x: torch.Tensor, members=None) -> ForwardResult:
        self.check_input(x)
        return ForwardResult.from_outputs(self.apply(x))


class LinearGaussianPosterior:
    """Exact posterior N(m_post, C_post) for prior N(mu, C) and y = H x + N(0, s^2 I)."""

    def __init__(self, prior: GaussianField, G: SubsampleBlur, noise_std: float):
        self.prior, self.G, self.s2 = prior, G, float(noise_std) ** 2
        n, k = G.n, G.k
        M = n // k
        # nu_q' = (1/k^2) sum over aliases q = q' + M a of b_q^2 lam_q: the spectrum of H C H^T on the coarse grid
        full = self._full_grid(prior.lam * G.b**2)
        self.nu = full.reshape(k, M, k, M).sum(dim=(0, 2)) / k**2  # (M, M) full coarse grid

    @staticmethod
    def _full_grid(half: torch.Tensor) -> torch.Tensor:
        """Expand an rfft2 half-grid (N, N//2+1) of a Hermitian-even function to the full (N, N) grid."""
        n = half.shape[0]
        f = torch.fft.fftfreq(n, d=1.0 / n).long()
        rows = torch.arange(n)
        out = half[:, f.abs()].clone()
        neg = f < 0  # lam(k1, k2) = lam(-k1, -k2) for columns with negative k2
        out[:, neg] = half[(-rows) % n][:, (-f[neg])]
        return out

    def _solve_coarse(self, r: torch.Tensor) -> torch.Tensor:
        """(H C H^T + s^2 I)^{-1} r for r (B, m), a multiplier on the coarse grid."""
        M = self.G.n // self.G.k
        rh = torch.fft.fft2(r.reshape(-1, M, M), norm="ortho") / (self.nu + self.s2)
        return torch.fft.ifft2(rh, norm="ortho").real.reshape(r.shape)

    def mean(self, y: torch.Tensor) -> torch.Tensor:
        """m_post = mu + C H^T (H C H^T + Gamma)^{-1} (y - H mu), a field (1, N, N)."""
        mu = self.prior.mean.reshape(1, 1, self.G.n, self.G.n)
        r = y.reshape(1, -1) - self.G.apply(mu)
        return (mu + self.prior.apply_cov(self.G.adjoint(self._solve_coarse(r))))[0]

    def variance(self) -> torch.Tensor:
        """Pointwise posterior variance (1, N, N): prior variance minus |(HCH^T+Gamma)^{-1/2} H C e_r|^2, k-periodic."""
        n, k, M = self.G.n, self.G.k, self.G.n // self.G.k
        e = torch.zeros(k * k, 1, n, n, dtype=torch.float64)
        for a in range(k):
            for b in range(k):
                e[a * k + b, 0, a, b] = 1.0
        HCe = self.G.apply(self.prior.apply_cov(e))  # (k^2, m)
        white = torch.fft.fft2(HCe.reshape(-1, M, M), norm="ortho") / (self.nu + self.s2).sqrt()
        reduction = (white.abs() ** 2).sum(dim=(1, 2)).reshape(k, k)
        var = self.prior.pointwise_variance() - reduction
        return var.repeat(M, M).reshape(1, n, n)

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(H (m, d), C_post (d, d)) by the dense formula: for small grids in tests."""
        d = self.prior.d
        eye = torch.eye(d, dtype=torch.float64).reshape(d, 1, self.G.n, self.G.n)
        H = self.G.apply(eye).T  # (m, d)
        C = self.prior.dense_covariance()
        S = H @ C @ H.T + self.s2 * torch.eye(H.shape[0], dtype=torch.float64)
        return H, C - C @ H.T @ torch.linalg.solve(S, H @ C)


class ObservationSpacePosterior:
    """Exact posterior N(m_post, C_post) for prior N(mu, C) and y = H x + N(0, Gamma) with any Gamma (scalar,
    diagonal or full): the m x m system H C H^T + Gamma is solved by its Cholesky factor, with the m columns of
    C H^T kept as fields (m x d values: fine up to a few thousand observations on a 64 x 64 grid)."""

    def __init__(self, prior: GaussianField, G: SubsampleBlur, Gamma: NoiseCovariance):
        self.prior, self.G, self.Gamma = prior, G, Gamma
        m = G.obs_size
        self.CHt = prior.apply_cov(G.adjoint(torch.eye(m, dtype=torch.float64)))  # (m, 1, n, n): C H^T e_i
        S = G.apply(self.CHt).T + Gamma.dense()  # H C H^T + Gamma
        self.L = torch.linalg.cholesky(0.5 * (S + S.T))

    def _solve(self, r: torch.Tensor) -> torch.Tensor:
        return torch.cholesky_solve(r.reshape(-1, 1), self.L).reshape(-1)

    def mean(self, y: torch.Tensor) -> torch.Tensor:
        """m_post = mu + C H^T (H C H^T + Gamma)^{-1} (y - H mu), a field (1, N, N)."""
        mu = self.prior.mean.reshape(1, 1, self.G.n, self.G.n)
        r = y.reshape(-1).to(torch.float64) - self.G.apply(mu)[0]
        w = self._solve(r)
        return mu[0] + torch.einsum("i,ichw->chw", w, self.CHt)

    def variance(self) -> torch.Tensor:
        """Pointwise posterior variance (1, N, N): prior variance minus diag(C H^T S^{-1} H C)."""
        Z = torch.linalg.solve_triangular(self.L, self.CHt.reshape(self.CHt.shape[0], -1), upper=False)
        return (self.prior.pointwise_variance() - (Z**2).sum(0)).reshape(1, self.G.n, self.G.n)


def make_problem(
    n: int = 64,
    k: int = 2,
    blur: float = 0.0,
    alpha: float = 2.0,
    tau: float = 3.0,
    std: float = 0.5,
    noise_std: float = 0.1,
    truth_seed: int = 0,
    dtype=torch.float64,
    Gamma: NoiseCovariance | None = None,
) -> tuple[InverseProblem, GaussianField, LinearGaussianPosterior | ObservationSpacePosterior]:
    """A truth drawn from the prior, its noisy subsampled observation, and the exact posterior. `Gamma` (any
    NoiseCovariance of the observation's size) replaces noise_std^2 I; its posterior is solved in observation
    space."""
    from enkg_dist import rng

    prior = GaussianField.matern_like(n, alpha, tau, std)
    G = SubsampleBlur(n, k, blur)
    x_true = prior.sample(rng.member_normal(truth_seed, rng.DATA, [0], (1, n, n)))[0]
    z = rng.member_normal(truth_seed, rng.OBS_NOISE, [0], (G.obs_size,))[0]
    if Gamma is None:
        eps = z * noise_std
        Gamma = NoiseCovariance.scalar(noise_std**2, G.obs_size)
        post = LinearGaussianPosterior(prior, G, noise_std)
    else:
        if Gamma.m != G.obs_size:
            raise ValueError(f"Gamma is {Gamma.m}x{Gamma.m}, the observation has {G.obs_size} values")
        eps = Gamma.color(z)
        post = (LinearGaussianPosterior(prior, G, float(Gamma.value) ** 0.5) if Gamma.kind == "scalar" else
                ObservationSpacePosterior(prior, G, Gamma))  # FFTs where they do, else an m x m solve
    y = G.apply(x_true[None])[0] + eps
    problem = InverseProblem("linear_gaussian", G, y.to(dtype), Gamma, x_true.to(dtype))
    return problem, prior, post
