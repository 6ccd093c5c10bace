"""Observation-noise covariance Gamma: scalar, diagonal, or full (through its Cholesky factor), with whitening."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class NotPositiveDefiniteError(ValueError):
    """Gamma is not symmetric positive definite."""


@dataclass(frozen=True)
class NoiseCovariance:
    """Gamma = L L^T. `whiten(r)` returns L^{-1} r, so that |whiten(r)|^2 = r^T Gamma^{-1} r."""

    kind: str  # "scalar" | "diagonal" | "full"
    m: int
    value: torch.Tensor  # scalar: variance (0-d); diagonal: variances (m,); full: lower Cholesky factor (m, m)

    @classmethod
    def scalar(cls, variance: float, m: int) -> NoiseCovariance:
        """Gamma = variance * I_m."""
        if not variance > 0:
            raise NotPositiveDefiniteError(f"Gamma is not positive definite: scalar variance {variance} must be > 0")
        return cls("scalar", int(m), torch.tensor(float(variance), dtype=torch.float64))

    @classmethod
    def diagonal(cls, variances) -> NoiseCovariance:
        """Gamma = diag(variances)."""
        v = torch.as_tensor(variances, dtype=torch.float64).reshape(-1)
        bad = ~(v > 0)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise NotPositiveDefiniteError(f"Gamma is not positive definite: diagonal entry {i} is {float(v[i])}")
        return cls("diagonal", v.numel(), v)

    @classmethod
    def full(cls, matrix) -> NoiseCovariance:
        """Gamma given as a dense symmetric positive definite (m, m) matrix; stored as its Cholesky factor."""
        G = torch.as_tensor(matrix, dtype=torch.float64)
        if G.ndim != 2 or G.shape[0] != G.shape[1]:
            raise ValueError(f"Gamma must be a square matrix, got shape {tuple(G.shape)}")
        if not torch.allclose(G, G.T, rtol=1e-10, atol=1e-12 * float(G.abs().max().clamp_min(1e-300))):
            raise NotPositiveDefiniteError("Gamma is not symmetric")
        L, info = torch.linalg.cholesky_ex(G)
        if int(info) != 0 or not bool(torch.isfinite(L).all()):
            raise NotPositiveDefiniteError(f"Gamma is not positive definite (Cholesky failed at column {int(info)})")
        return cls("full", G.shape[0], L)

    def _check(self, r: torch.Tensor) -> None:
        if r.shape[-1] != self.m:
            raise ValueError(f"observation size mismatch: got {r.shape[-1]} values, Gamma is {self.m}x{self.m}")

    def whiten(self, r: torch.Tensor) -> torch.Tensor:
        """L^{-1} r along the last axis."""
        self._check(r)
        v = self.value.to(device=r.device, dtype=r.dtype)
        if self.kind == "scalar":
            return r / v.sqrt()
        if self.kind == "diagonal":
            return r / v.sqrt()
        rows = r.reshape(-1, self.m).T
        return torch.linalg.solve_triangular(v, rows, upper=False).T.reshape(r.shape)

    def inverse(self, r: torch.Tensor) -> torch.Tensor:
        """Gamma^{-1} r along the last axis (= L^{-T} L^{-1} r)."""
        self._check(r)
        v = self.value.to(device=r.device, dtype=r.dtype)
        if self.kind in ("scalar", "diagonal"):
            return r / v
        return torch.cholesky_solve(r.reshape(-1, self.m).T, v, upper=False).T.reshape(r.shape)

    def color(self, z: torch.Tensor) -> torch.Tensor:
        """L z: turns standard normal draws into N(0, Gamma) draws."""
        self._check(z)
        v = self.value.to(device=z.device, dtype=z.dtype)
        if self.kind in ("scalar", "diagonal"):
            return z * v.sqrt()
        return z @ v.T

    def dense(self) -> torch.Tensor:
        """The (m, m) matrix Gamma; for tests and small problems only."""
        if self.kind == "scalar":
            return self.value * torch.eye(self.m, dtype=torch.float64)
        if self.kind == "diagonal":
            return torch.diag(self.value)
        return self.value @ self.value.T

    def trace(self) -> float:
        """tr(Gamma)."""
        if self.kind == "scalar":
            return float(self.value) * self.m
        if self.kind == "diagonal":
            return float(self.value.sum())
        return float((self.value**2).sum())
