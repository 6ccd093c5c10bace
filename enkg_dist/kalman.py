"""Ensemble Kalman updates on (J, d) particles and (J, m) forward outputs, in the J x J form; never d x d.

Memory of the unlocalised updates: the inputs, the result, a few (J, m) arrays, one J x J matrix and temporaries of
at most BLOCK_BYTES each. Past that size the product with the ensemble's anomalies goes in blocks of state columns,
and the EnKG step's output Gram matrix is formed on its smaller side (m x m when m < J); below it the arithmetic is
exactly the one-block form (bit-identical results). J = 10^4, d = 128^2, m = 64^2 in float64 thus needs the ensemble
twice (2.6 GB), one 0.8 GB J x J and about 1.3 GB of (J, m) arrays, instead of five ensembles and two J x J.

With a localiser the gain is rho o C_xpsi, applied in blocks of state rows (enkg_dist.localisation): no J x J form
then, and never d x m at once. Pure maths: arrays in, arrays out; the forward model is never called here
(EnsembleKalmanProcesses.jl style).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from enkg_dist.hyperparameters import FAILURE_POLICIES, STEP_RULES  # noqa: F401 - kalman's API
from enkg_dist.localisation import Localiser, localised_apply, localised_output_covariance
from enkg_dist.noise import NoiseCovariance

BLOCK_BYTES = 64 * 2**20  # the largest temporary of the unlocalised updates; work past it goes in blocks


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


def _block_width(rows: int, cols: int, item: int, block_bytes: int | None) -> int:
    """Columns per block so that a (rows, width) temporary holds at most block_bytes (cols: all of them fit)."""
    limit = BLOCK_BYTES if block_bytes is None else block_bytes
    return max(1, min(cols, limit // max(1, rows * item)))


def apply_to_anomalies(X: torch.Tensor, coef: torch.Tensor, w: float | None = None,
                       block_bytes: int | None = None) -> torch.Tensor:
    """X - w coef (X - mean X) for X (n, d) and coef (n, n), in blocks of state columns.

    One block (the whole ensemble within block_bytes) is exactly X - w * (coef @ anomalies(X)). Past it the result is
    written block by block: memory X, the result and two (n, width) temporaries; the GEMM per block may round
    differently from the whole product (round-off only).
    """
    n, d = X.shape
    width = _block_width(n, d, X.element_size(), block_bytes)
    if width >= d:
        delta = coef @ anomalies(X)
        return X - (delta if w is None else w * delta)
    mean = X.mean(dim=0, keepdim=True)
    out = torch.empty_like(X)
    for start in range(0, d, width):
        cols = slice(start, min(start + width, d))
        delta = coef @ (X[:, cols] - mean[:, cols])
        if w is not None:
            delta.mul_(w)
        torch.sub(X[:, cols], delta, out=out[:, cols])
        del delta
    return out


def _output_gram(P: torch.Tensor, n: int, block_bytes: int | None) -> tuple[float, float]:
    """(tr S, |S|_F) of S = P P^T / n, the whitened output covariance's Gram matrix.

    Formed as J x J when that is small (or no larger than P itself); otherwise as P^T P / n (m x m, same nonzero
    spectrum, so the same trace and Frobenius norm up to round-off), which keeps the update to one J x J matrix.
    """
    limit = BLOCK_BYTES if block_bytes is None else block_bytes
    m = P.shape[1]
    if n <= m or n * n * P.element_size() <= limit:
        S = (P @ P.T) / n
    else:
        S = P.T @ P
        S.div_(n)
    return float(torch.diagonal(S).sum()), float(torch.linalg.matrix_norm(S))


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
    block_bytes: int | None = None,
) -> tuple[torch.Tensor, UpdateInfo]:
    """EnKG corrector x_j <- x_j - w C_xpsi Gamma^{-1} (psi_j - y) (EnKG eq. 9-10), as Delta = A (X - mean X).

    A_jk = (1/J) <Gamma^{-1/2}(psi_j - y), Gamma^{-1/2}(psi_k - mean psi)>.  Step w = s/|A|_F (the authors' code) or
    s/tr(C_psipsi) (the paper), both with Gamma-whitened outputs. `guard` caps w at guard/tr(C_psipsi): no step is
    longer than the paper's rule at scale `guard`, which keeps small ensembles from collapsing. Members with
    ok=False take no part and are returned unchanged. With a `localiser`, Delta_j = (rho o C_xpsi) Gamma^{-1}
    (psi_j - y) in blocks; w is unchanged (tr C_psipsi uses the diagonal, which rho_psipsi keeps). Without one,
    temporaries past `block_bytes` (default BLOCK_BYTES) are split into blocks (see apply_to_anomalies). A
    localiser with `raw_mean` localises only the deviations: Delta_j = C_xpsi Gamma^{-1} (mean psi - y)
    + (rho o C_xpsi) Gamma^{-1} (psi_j - mean psi), so the mean moves as in the unlocalised update.
    """
    if rule not in STEP_RULES:
        raise ValueError(f"unknown step rule {rule!r}; allowed: {', '.join(STEP_RULES)}")
    idx, xs, ps = _taking_part(x, psi, y, ok)
    n = xs.shape[0]
    X = xs.reshape(n, -1)
    R = Gamma.whiten(ps - y)  # whitened residuals (n, m)
    Pa = anomalies(ps)
    P = Gamma.whiten(Pa)  # whitened output anomalies (n, m)
    A = R @ P.T  # (n, n), the one J x J matrix
    A.div_(n)
    norm_A = float(torch.linalg.matrix_norm(A))
    # Gram matrix P P^T / n: same nonzero spectrum as Gamma^{-1/2} C_psipsi Gamma^{-1/2}
    trace_Cpp, norm_Cpp = _output_gram(P, n, block_bytes)
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
        X_new = apply_to_anomalies(X, A, w, block_bytes).reshape(xs.shape)
    else:
        Xa = anomalies(X)
        if localiser.raw_mean:  # C_xpsi Gamma^{-1} (mean psi - y) + (rho o C_xpsi) Gamma^{-1} (psi_j - mean psi)
            delta = localised_apply(Xa, Pa, Gamma.inverse(Pa), localiser)
            delta += ((P @ Gamma.whiten(ps.mean(0) - y)) / n) @ Xa
        else:
            delta = localised_apply(Xa, Pa, Gamma.inverse(ps - y), localiser)
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
        X_new = apply_to_anomalies(X, coef).reshape(xs.shape)
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
    out[bad] = (mean + z.to(device=Xg.device, dtype=Xg.dtype) @ (Xg - mean)
                / (len(good) - 1) ** 0.5).reshape(len(bad), *x.shape[1:])
    return out
