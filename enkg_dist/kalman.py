"""Ensemble Kalman updates on (J, d) particles and (J, m) forward outputs, in the J x J form; never d x d.

With a localiser the gain is rho o C_xpsi, applied in blocks of state rows (enkg_dist.localisation): no J x J form
then, and never d x m at once. Pure maths: arrays in, arrays out; the forward model is never called here
(EnsembleKalmanProcesses.jl style).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from enkg_dist.localisation import Localiser, localised_apply, localised_output_covariance
from enkg_dist.noise import NoiseCovariance

STEP_RULES = ("frobenius", "trace")
FAILURE_POLICIES = ("keep", "resample")


class EnsembleCollapseError(RuntimeError):
    """Fewer than two members succeeded: no covariance can be formed."""


@dataclass(frozen=True)
class UpdateInfo:
    """Diagnostics of one update."""

    weight: float  # w, the step applied to C_xpsi Gamma^{-1} r
    norm_A: float  # |A|_F
    trace_Cpp: float  # tr(Gamma^{-1/2} C_psipsi Gamma^{-1/2})
    norm_Cpp: float  # |Gamma^{-1/2} C_psipsi Gamma^{-1/2}|_F >= its largest eigenvalue
    n_ok: int
    misfit: float  # mean over members of (psi_j - y)^T Gamma^{-1} (psi_j - y) / m
    guarded: bool  # whether the guard shortened the step


def anomalies(a: torch.Tensor) -> torch.Tensor:
    """a_j - mean_k a_k, rows are members."""
    return a - a.mean(dim=0, keepdim=True)


def _ok_index(ok: torch.Tensor | None, J: int) -> torch.Tensor | None:
    if ok is None:
        return None
    ok = torch.as_tensor(ok, dtype=torch.bool)
    if ok.shape != (J,):
        raise ValueError(f"member mask has shape {tuple(ok.shape)}, expected ({J},)")
    n_ok = int(ok.sum())
    if n_ok < 2:
        raise EnsembleCollapseError(f"only {n_ok} of {J} members succeeded; at least 2 are needed for a covariance")
    return None if n_ok == J else ok.nonzero().reshape(-1)


def _check(x: torch.Tensor, psi: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape[0] != psi.shape[0]:
        raise ValueError(f"shape mismatch: {x.shape[0]} particles but {psi.shape[0]} forward outputs")
    if psi.ndim != 2 or y.ndim != 1 or psi.shape[1] != y.shape[0]:
        raise ValueError(f"shape mismatch: forward outputs {tuple(psi.shape)} vs observation {tuple(y.shape)}")
    if x.shape[0] < 2:
        raise EnsembleCollapseError(f"an ensemble needs at least 2 members, got {x.shape[0]}")


def _taking_part(x, psi, y, ok):
    """(index of the ok members, or None for all; their x; their psi) after the shape and finiteness checks."""
    _check(x, psi, y)
    idx = _ok_index(ok, x.shape[0])
    xs, ps = (x, psi) if idx is None else (x[idx], psi[idx])
    if not bool(torch.isfinite(ps).all()):
        raise ValueError("non-finite forward outputs among members marked ok; mark them failed instead")
    return idx, xs, ps


def _put_back(x: torch.Tensor, idx, X_new: torch.Tensor) -> torch.Tensor:
    """x with the members that took part replaced by their update (failed members unchanged)."""
    if idx is None:
        return X_new
    out = x.clone()
    out[idx] = X_new
    return out


def enkg_update(
    x: torch.Tensor,
    psi: torch.Tensor,
    y: torch.Tensor,
    Gamma: NoiseCovariance,
    scale: float,
    rule: str = "frobenius",
    guard: float | None = 1.0,
    ok: torch.Tensor | None = None,
    localiser: Localiser | None = None,
) -> tuple[torch.Tensor, UpdateInfo]:
    """EnKG corrector x_j <- x_j - w C_xpsi Gamma^{-1} (psi_j - y) (EnKG eq. 9-10), as Delta = A (X - mean X).

    A_jk = (1/J) <Gamma^{-1/2}(psi_j - y), Gamma^{-1/2}(psi_k - mean psi)>.  Step w = s/|A|_F (the authors' code) or
    s/tr(C_psipsi) (the paper), both with Gamma-whitened outputs. `guard` caps w at guard/tr(C_psipsi): no step is
    longer than the paper's rule at scale `guard`, which keeps small ensembles from collapsing. Members with
    ok=False take no part and are returned unchanged. With a `localiser`, Delta_j = (rho o C_xpsi) Gamma^{-1}
    (psi_j - y) in blocks; w is unchanged (tr C_psipsi uses the diagonal, which rho_psipsi keeps).
    """
    if rule not in STEP_RULES:
        raise ValueError(f"unknown step rule {rule!r}; allowed: {', '.join(STEP_RULES)}")
    idx, xs, ps = _taking_part(x, psi, y, ok)
    n = xs.shape[0]
    X = xs.reshape(n, -1)
    R = Gamma.whiten(ps - y)  # whitened residuals (n, m)
    P = Gamma.whiten(anomalies(ps))  # whitened output anomalies (n, m)
    A = (R @ P.T) / n  # (n, n)
    S = (P @ P.T) / n  # Gram matrix, same nonzero spectrum as Gamma^{-1/2} C_psipsi Gamma^{-1/2}
    norm_A = float(torch.linalg.matrix_norm(A))
    trace_Cpp = float(torch.diagonal(S).sum())
    norm_Cpp = float(torch.linalg.matrix_norm(S))
    if trace_Cpp == 0.0:  # ensemble collapsed in output space: nothing to learn from
        w = 0.0
    elif rule == "frobenius":
        w = scale / norm_A if norm_A > 0 else 0.0
    else:
        w = scale / trace_Cpp
    guarded = False
    if guard is not None and trace_Cpp > 0 and w > guard / trace_Cpp:
        w, guarded = guard / trace_Cpp, True
    if localiser is None:
        delta = A @ anomalies(X)
    else:
        delta = localised_apply(anomalies(X), anomalies(ps), Gamma.inverse(ps - y), localiser)
    X_new = (X - w * delta).reshape(xs.shape)
    info = UpdateInfo(w, norm_A, trace_Cpp, norm_Cpp, n, float((R**2).sum(1).mean()) / R.shape[1], guarded)
    return _put_back(x, idx, X_new), info


def eki_update(
    x: torch.Tensor,
    psi: torch.Tensor,
    y: torch.Tensor,
    Gamma: NoiseCovariance,
    dt: float = 1.0,
    perturbation: torch.Tensor | None = None,
    ok: torch.Tensor | None = None,
    localiser: Localiser | None = None,
) -> tuple[torch.Tensor, UpdateInfo]:
    """EKI / EnKF analysis x_j <- x_j + C_xpsi (C_psipsi + Gamma/dt)^{-1} (y + eta_j - psi_j) (Iglesias et al. 2013).

    J x J form by Woodbury: Delta X = -R~ P~^T (J/dt I + P~ P~^T)^{-1} (X - mean X), with Gamma-whitened residuals
    R~ and anomalies P~; `perturbation` eta (J, m) gives the stochastic variant (pass it already coloured by Gamma/dt).
    With a `localiser`: (rho o C_xpsi)(rho_psipsi o C_psipsi + Gamma/dt)^{-1}, an m x m solve (Houtekamer &
    Mitchell 2001), the gain applied in blocks.
    """
    idx, xs, ps = _taking_part(x, psi, y, ok)
    n = xs.shape[0]
    X = xs.reshape(n, -1)
    target = y if perturbation is None else y + (perturbation if idx is None else perturbation[idx])
    R = Gamma.whiten(ps - target)
    P = Gamma.whiten(anomalies(ps))
    S = P @ P.T
    if localiser is None:
        M = S + (n / dt) * torch.eye(n, dtype=S.dtype, device=S.device)
        coef = torch.linalg.solve(M, (R @ P.T).T).T  # R~ P~^T M^{-1}  (M symmetric)
        X_new = (X - coef @ anomalies(X)).reshape(xs.shape)
    else:
        Pa = anomalies(ps)
        M = localised_output_covariance(Pa, localiser) + Gamma.dense().to(Pa) / dt
        V = torch.linalg.solve(M, (ps - target).T).T  # (n, m): M^{-1} (psi_j - y - eta_j)
        X_new = (X - localised_apply(anomalies(X), Pa, V, localiser)).reshape(xs.shape)
        coef = torch.zeros((), dtype=X.dtype)
    info = UpdateInfo(1.0, float(coef.norm()), float(torch.diagonal(S).sum()) / n,
                      float(torch.linalg.matrix_norm(S)) / n, n, float((R**2).sum(1).mean()) / R.shape[1], False)
    return _put_back(x, idx, X_new), info


def resample_failed(x: torch.Tensor, ok: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Redraw failed members from N(mean, C) of the successful ones (EKP.jl's SampleSuccGauss), without forming C.

    x_f = mean + (X_ok - mean)^T z_f / sqrt(n_ok - 1), z_f ~ N(0, I_{n_ok}) given as z (n_failed, n_ok).
    """
    ok = torch.as_tensor(ok, dtype=torch.bool)
    good, bad = ok.nonzero().reshape(-1), (~ok).nonzero().reshape(-1)
    if len(bad) == 0:
        return x
    if len(good) < 2:
        raise EnsembleCollapseError(f"only {len(good)} members succeeded; cannot redraw the failed ones")
    if z.shape != (len(bad), len(good)):
        raise ValueError(f"z has shape {tuple(z.shape)}, expected ({len(bad)}, {len(good)})")
    Xg = x[good].reshape(len(good), -1)
    mean = Xg.mean(0, keepdim=True)
    out = x.clone()
    out[bad] = (mean + z.to(device=Xg.device, dtype=Xg.dtype) @ (Xg - mean) / (len(good) - 1) ** 0.5).reshape(len(bad), *x.shape[1:])
    return out
