"""Localisation of ensemble Kalman gains: rho o C_xpsi in blocks of state rows, never d x m at once.

Pure maths on (J, d) and (J, m) arrays (localisation.md). A localiser gives, for a block of state rows, the taper
rho (rows x cols) on the observations it may touch:
- `GaspariCohn`: distance-based, rho = GC(dist / c) (Gaspari & Cohn 1999, eq. 4.10), compact support 2c, on a
  periodic grid; blocks are square tiles and only observations within 2c of a tile are touched;
- `SEC`: rho = |R|^alpha on the sample correlations R (Lee 2021), optional cutoff r0; no geometry needed;
- `NICE`: tuning-free, rho = ((1 - a) R^(g-2) + a R^g) with the even power g and the blend a chosen by a
  discrepancy principle against the correlations' sampling noise (Vishny, Morzfeld et al. 2024); no geometry.
The update applies rho o C to J vectors: Delta (J, d) = V (rho o C)^T, with C = X'^T P' / J and V = Gamma^{-1} r.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from enkg_dist.fields import wavenumbers

BLOCK_ELEMENTS = 2**22  # entries of one block of C (rows x cols): 32 MiB in float64


def gaspari_cohn(r: torch.Tensor) -> torch.Tensor:
    """Gaspari-Cohn 5th-order piecewise rational taper of r = distance / c: 1 at 0, 0 from r = 2 (GC99 eq. 4.10)."""
    r = r.abs()
    inner = ((-0.25 * r + 0.5) * r + 0.625) * r**3 - (5.0 / 3.0) * r**2 + 1.0
    rs = r.clamp_min(1e-12)
    outer = ((((r / 12.0 - 0.5) * r + 0.625) * r + 5.0 / 3.0) * r - 5.0) * r + 4.0 - 2.0 / (3.0 * rs)
    return torch.where(r <= 1, inner, torch.where(r < 2, outer, torch.zeros((), dtype=r.dtype)))


@dataclass(frozen=True)
class Geometry:
    """Where state entries and observations sit, in grid units of a periodic n x n grid (the torus of side n).

    The state is (channels, n, n) in C order; `obs` (m, 2) are observation coordinates (row, column), fractional
    allowed. Distances are per-axis min(|a - b|, n - |a - b|), then Euclidean.
    """

    n: int
    channels: int
    obs: torch.Tensor  # (m, 2) float64

    @property
    def d(self) -> int:
        return self.channels * self.n * self.n

    def state_coords(self, rows: torch.Tensor) -> torch.Tensor:
        """(len(rows), 2) coordinates of state entries."""
        p = rows % (self.n * self.n)
        return torch.stack([(p // self.n).to(torch.float64), (p % self.n).to(torch.float64)], dim=1)

    def torus(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Pairwise torus distances between points a (A, 2) and b (B, 2)."""
        diff = (a[:, None, :] - b[None, :, :]).abs() % self.n
        return torch.minimum(diff, self.n - diff).pow(2).sum(-1).sqrt()

    def with_obs(self, extra: torch.Tensor) -> Geometry:
        """The same grid with more observation locations (e.g. the state itself, for Tikhonov-EKI)."""
        return Geometry(self.n, self.channels, torch.cat([self.obs, extra.to(torch.float64)]))


def grid_geometry(n: int, k: int, channels: int = 1) -> Geometry:
    """Observations at every k-th point of the n x n grid (row-major, like x[..., ::k, ::k].reshape(-1))."""
    a = torch.arange(0, n, k, dtype=torch.float64)
    obs = torch.stack(torch.meshgrid(a, a, indexing="ij"), dim=-1).reshape(-1, 2)
    return Geometry(n, channels, obs)


class Localiser:
    """Interface: row blocks, the observations each block may touch, and the taper on them."""

    needs_correlations = False
    raw_mean = False  # EnKG: the mean moves by the unlocalised gain, only the deviations by rho o C
    large_scales: tuple[int, int, float] | None = None  # (n, channels, k_L): scales |k| <= k_L left unlocalised

    def __init__(self, *, raw_mean: bool = False, large_scales: tuple[int, int, float] | None = None):
        """The gain's options, the same for every taper (the subclasses pass them on as keywords)."""
        if large_scales is not None and (len(large_scales) != 3 or not large_scales[2] >= 0):
            raise ValueError(f"large_scales must be (n, channels, k_L) with k_L >= 0, got {large_scales}")
        self.raw_mean = bool(raw_mean)
        self.large_scales = None if large_scales is None else (int(large_scales[0]), int(large_scales[1]),
                                                               float(large_scales[2]))

    def blocks(self, d: int, m: int) -> list[torch.Tensor]:
        """State row indices, block by block (each block's C has at most BLOCK_ELEMENTS entries)."""
        size = max(1, min(d, BLOCK_ELEMENTS // max(m, 1)))
        return [torch.arange(s, min(s + size, d)) for s in range(0, d, size)]

    def support(self, rows: torch.Tensor, m: int) -> torch.Tensor | None:
        """Observation columns a block may touch (None: all)."""
        return None

    def prepare(self, X: torch.Tensor, P: torch.Tensor) -> None:
        """Global statistics before the blocks are tapered (NICE's discrepancy principle)."""

    def taper(self, rows, cols, R: torch.Tensor | None) -> torch.Tensor:
        """rho on (rows, cols); R: the sample correlations there when `needs_correlations`."""
        raise NotImplementedError

    def taper_obs(self, R: torch.Tensor | None, J: int) -> torch.Tensor:
        """rho_psipsi (m, m) for the output-output covariance of J members (EKI); 1 on the diagonal."""
        raise NotImplementedError


class GaspariCohn(Localiser):
    """rho(p, q) = GC(|p - q|_torus / radius) between state entry p and observation q (radius in grid units)."""

    def __init__(self, geometry: Geometry, radius: float, tile: int | None = None, **options):
        super().__init__(**options)
        if not radius > 0:
            raise ValueError(f"localisation radius must be > 0, got {radius}")
        self.geometry, self.radius = geometry, float(radius)
        self.tile = tile or max(4, min(geometry.n, 2 ** round(math.log2(min(max(radius, 1.0), geometry.n) * 2))))

    def blocks(self, d: int, m: int) -> list[torch.Tensor]:
        """Square tiles of the grid (per channel): a tile touches only the observations within 2c of it."""
        g, t = self.geometry, self.tile
        if d != g.d:
            raise ValueError(f"localisation geometry is for {g.d} state entries, the state has {d}")
        out = []
        for c in range(g.channels):
            for i in range(0, g.n, t):
                for j in range(0, g.n, t):
                    ii = torch.arange(i, min(i + t, g.n))
                    jj = torch.arange(j, min(j + t, g.n))
                    out.append((c * g.n * g.n + ii[:, None] * g.n + jj[None, :]).reshape(-1))
        return out

    def support(self, rows: torch.Tensor, m: int) -> torch.Tensor | None:
        """Observations within 2c (torus) of the block's bounding box."""
        g = self.geometry
        if m != g.obs.shape[0]:
            raise ValueError(f"localisation geometry has {g.obs.shape[0]} observation locations, the forward "
                             f"model gives {m} values")
        if 2 * self.radius * math.sqrt(2) >= g.n:
            return None
        xy = g.state_coords(rows)
        lo, hi = xy.min(0).values, xy.max(0).values
        centre, half = (lo + hi) / 2, (hi - lo) / 2
        diff = (g.obs - centre).abs() % g.n
        gap = (torch.minimum(diff, g.n - diff) - half).clamp_min(0)
        return (gap.pow(2).sum(1).sqrt() < 2 * self.radius).nonzero().reshape(-1)

    def taper(self, rows, cols, R=None) -> torch.Tensor:
        g = self.geometry
        obs = g.obs if cols is None else g.obs[cols]
        return gaspari_cohn(g.torus(g.state_coords(rows), obs) / self.radius)

    def taper_obs(self, R, J: int) -> torch.Tensor:
        g = self.geometry
        return gaspari_cohn(g.torus(g.obs, g.obs) / self.radius)


class SEC(Localiser):
    """Sampling-error correction rho = |R|^alpha, entries with |R|^(1+alpha) < cutoff dropped (Lee 2021)."""

    needs_correlations = True

    def __init__(self, alpha: float = 1.0, cutoff: float = 0.0, **options):
        super().__init__(**options)
        if alpha < 0 or not 0 <= cutoff < 1:
            raise ValueError(f"SEC needs alpha >= 0 and 0 <= cutoff < 1, got {alpha}, {cutoff}")
        self.alpha, self.cutoff = float(alpha), float(cutoff)

    def _rho(self, R: torch.Tensor) -> torch.Tensor:
        rho = R.abs().pow(self.alpha)
        return rho * ((rho * R.abs()) >= self.cutoff) if self.cutoff > 0 else rho

    def taper(self, rows, cols, R) -> torch.Tensor:
        return self._rho(R)

    def taper_obs(self, R, J: int) -> torch.Tensor:
        rho = self._rho(R)
        rho.diagonal().fill_(1.0)
        return rho


def correlation_noise_std(r: torch.Tensor, J: int, nodes: int = 48) -> torch.Tensor:
    """Std of the sample correlation of J Gaussian pairs with correlation r, by the Fisher transform:
    std of tanh(Z), Z ~ N(atanh r, 1/(J - 3)), by Gauss-Hermite quadrature (EKP.jl samples it instead)."""
    t, w = np.polynomial.hermite_e.hermegauss(nodes)
    t, w = torch.as_tensor(t, dtype=torch.float64), torch.as_tensor(w / w.sum(), dtype=torch.float64)
    s = 1.0 / math.sqrt(max(J - 3, 1))
    z = torch.atanh(r.to(torch.float64).clamp(-1 + 1e-12, 1 - 1e-12))[..., None] + s * t
    m1, m2 = (torch.tanh(z) * w).sum(-1), (torch.tanh(z) ** 2 * w).sum(-1)
    return (m2 - m1**2).clamp_min(0).sqrt()


class _NoiseTable:
    """correlation_noise_std on a grid of r in [-1, 1], linearly interpolated (as EKP.jl does)."""

    def __init__(self, J: int, points: int = 2001):
        self.r = torch.linspace(-1, 1, points, dtype=torch.float64)
        self.s = correlation_noise_std(self.r, J)

    def __call__(self, R: torch.Tensor) -> torch.Tensor:
        u = (R.clamp(-1, 1) + 1) / 2 * (len(self.r) - 1)
        i = u.floor().long().clamp(max=len(self.r) - 2)
        f = u - i
        return self.s[i] * (1 - f) + self.s[i + 1] * f


POWERS = (3, 5, 7, 9, 11)  # odd powers R^(g +- 1) for the even g = 2, ..., 10 of NICE


class NICE(Localiser):
    """Tuning-free sampling-error correction (Vishny, Morzfeld et al. 2024; EKP.jl's SECNice), per block of the
    covariance (x-psi, and psi-psi for EKI): the smallest even g in 2..10 with |R^(g+1) - R| > delta tol, then the
    largest blend a in 1, 8/9, ..., 0 with |((1-a) R^(g-2) + a R^g) o R - R| < delta tol; tol^2 = sum of the
    entries' sampling variances. The norms are accumulated over row blocks, so C is never held whole."""

    needs_correlations = True

    def __init__(self, delta: float = 1.0, delta_obs: float = 1.0, **options):
        super().__init__(**options)
        if not (delta > 0 and delta_obs > 0):
            raise ValueError("NICE needs delta > 0")
        self.delta, self.delta_obs = float(delta), float(delta_obs)
        self.choice: tuple[int, float] | None = None  # (g, a) for the x-psi block, set by prepare
        self._table = None

    def noise_table(self, J: int) -> _NoiseTable:
        if self._table is None or self._table[0] != J:
            self._table = (J, _NoiseTable(J))
        return self._table[1]

    @staticmethod
    def _gram(R: torch.Tensor, table) -> tuple[torch.Tensor, float]:
        """Gram matrix of D_p = R^p - R over POWERS, and the summed sampling variance, of one block (in row
        slices: five temporaries of a slice at a time)."""
        G, var = torch.zeros(len(POWERS), len(POWERS), dtype=torch.float64), 0.0
        step = max(1, BLOCK_ELEMENTS // (len(POWERS) * max(R.shape[1], 1)))
        for s in range(0, R.shape[0], step):
            Rs = R[s : s + step]
            D = torch.stack([(Rs**p - Rs).reshape(-1) for p in POWERS])
            G, var = G + D @ D.T, var + float(table(Rs).pow(2).sum())
        return G, var

    @staticmethod
    def choose(G: torch.Tensor, var: float, delta: float) -> tuple[int, float]:
        """(g, a) from the accumulated Gram matrix of D_p and the tolerance (EKP.jl's sweep, in closed form: the
        blend's distance to R is |(1 - a) D_(g-1) + a D_(g+1)| with D_1 = 0)."""
        tol2 = delta**2 * var
        g = next((p - 1 for i, p in enumerate(POWERS) if float(G[i, i]) > tol2), 10)
        iB = POWERS.index(g + 1)
        bb = float(G[iB, iB])
        aa = ab = 0.0
        if g > 2:
            iA = POWERS.index(g - 1)
            aa, ab = float(G[iA, iA]), float(G[iA, iB])
        for a in np.linspace(1.0, 0.0, 10):
            if (1 - a) ** 2 * aa + 2 * a * (1 - a) * ab + a**2 * bb < tol2:
                return g, float(a)
        return g, 0.0

    @staticmethod
    def _rho(R: torch.Tensor, g: int, a: float) -> torch.Tensor:
        return (1 - a) * R ** (g - 2) + a * R**g

    def prepare_from(self, blocks_R, J: int) -> None:
        """Choose (g, a) for the x-psi block from an iterable of its correlation blocks."""
        table, G, var = self.noise_table(J), torch.zeros(len(POWERS), len(POWERS), dtype=torch.float64), 0.0
        for R in blocks_R:
            g, v = self._gram(R.to(torch.float64), table)
            G, var = G + g, var + v
        self.choice = self.choose(G, var, self.delta)

    def taper(self, rows, cols, R) -> torch.Tensor:
        g, a = self.choice
        return self._rho(R, g, a)

    def taper_obs(self, R, J: int) -> torch.Tensor:
        G, var = self._gram(R.to(torch.float64), self.noise_table(J))
        g, a = self.choose(G, var, self.delta_obs)
        rho = self._rho(R, g, a)
        rho.diagonal().fill_(1.0)
        return rho


@dataclass
class BlockStats:
    """What a blocked product did: the blocks, and its largest temporaries (entries) for memory checks."""

    blocks: int = 0
    largest_block: int = 0  # rows x cols of the largest C block
    touched: int = 0  # sum of rows x cols over blocks (d x m without compact support)


def _correlations(Cb: torch.Tensor, sx: torch.Tensor, sp: torch.Tensor) -> torch.Tensor:
    """C / (sx sp^T) with zero where a standard deviation is zero."""
    den = sx[:, None] * sp[None, :]
    return torch.where(den > 0, Cb / den.clamp_min(1e-300), torch.zeros((), dtype=Cb.dtype))


def low_pass(X: torch.Tensor, n: int, channels: int, k_max: float) -> torch.Tensor:
    """The scales |k| <= k_max (integer wavenumbers of the periodic n x n grid) of each row of X, a (channels, n, n)
    field: X_L with X - X_L the rest."""
    f = torch.fft.rfft2(X.reshape(-1, channels, n, n))
    k1, k2 = wavenumbers(n)
    keep = (k1**2 + k2**2 <= k_max**2).to(device=X.device)
    return torch.fft.irfft2(f * keep, s=(n, n)).reshape(X.shape)


def localised_apply(X: torch.Tensor, P: torch.Tensor, V: torch.Tensor, localiser: Localiser,
                    stats: BlockStats | None = None) -> torch.Tensor:
    """Delta (n, d) with Delta_j = (rho o C_xpsi) v_j, C_xpsi = X'^T P' / n, for the rows v_j of V (n, m).

    X (n, d) and P (n, m) are anomalies. Memory: O(n (d + m)) plus one block of C (at most BLOCK_ELEMENTS entries).
    Works on transposed copies, so that a block's rows and columns are contiguous gathers. With
    `localiser.large_scales` the gain is scale-dependent (Buehner & Shlyaeva 2015, with no taper on the large
    scales): C_xpsi = X_L'^T P' / n + X_S'^T P' / n, the large scales X_L' = low_pass(X') unlocalised and rho on the
    rest only, rho computed from the rest's correlations.
    """
    if localiser.large_scales is not None:
        XL = low_pass(X, *localiser.large_scales)
        return _localised_apply(X - XL, P, V, localiser, stats) + ((V @ P.T) / X.shape[0]) @ XL
    return _localised_apply(X, P, V, localiser, stats)


def _localised_apply(X, P, V, localiser: Localiser, stats: BlockStats | None) -> torch.Tensor:
    n, d = X.shape
    m = P.shape[1]
    XT, PT, VT = X.T.contiguous(), P.T.contiguous(), V.T.contiguous()
    sx = sp = None
    if localiser.needs_correlations:
        sx, sp = XT.pow(2).sum(1).div(n).sqrt(), PT.pow(2).sum(1).div(n).sqrt()
        if isinstance(localiser, NICE):
            localiser.prepare_from((_correlations(XT[rows] @ PT.T / n, sx[rows], sp)
                                    for rows in localiser.blocks(d, m)), n)
    outT = torch.zeros(d, n, dtype=X.dtype, device=X.device)
    for rows in localiser.blocks(d, m):
        cols = localiser.support(rows, m)
        if cols is not None and len(cols) == 0:
            continue
        Pc, Vc = (PT, VT) if cols is None else (PT[cols], VT[cols])
        Cb = XT[rows] @ Pc.T / n  # (rows, cols)
        R = _correlations(Cb, sx[rows], sp if cols is None else sp[cols]) if localiser.needs_correlations else None
        rho = localiser.taper(rows, cols, R).to(device=Cb.device, dtype=Cb.dtype)
        outT[rows] = (rho * Cb) @ Vc
        if stats is not None:
            stats.blocks += 1
            stats.largest_block = max(stats.largest_block, Cb.numel())
            stats.touched += Cb.numel()
    return outT.T


def localised_output_covariance(P: torch.Tensor, localiser: Localiser) -> torch.Tensor:
    """rho_psipsi o C_psipsi (m, m), C_psipsi = P'^T P' / n: for EKI's m x m solve."""
    n = P.shape[0]
    C = P.T @ P / n
    R = None
    if localiser.needs_correlations:
        s = C.diagonal().clamp_min(0).sqrt()
        R = _correlations(C, s, s)
    return localiser.taper_obs(R, n).to(C.dtype) * C
