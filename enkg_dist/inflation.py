"""Spread control after an ensemble Kalman update: multiplicative inflation and relaxation to prior spread (RTPS).

Pure maths on (J, *state) particles; members with ok=False take no part and are returned unchanged
(localisation.md, "Spread control").
"""

from __future__ import annotations

import torch

from enkg_dist.hyperparameters import INFLATION_KINDS as KINDS


def _members(x: torch.Tensor, ok: torch.Tensor | None) -> torch.Tensor:
    return torch.arange(x.shape[0], device=x.device) if ok is None else ok.nonzero().reshape(-1)


def multiplicative(x: torch.Tensor, factor: float, ok: torch.Tensor | None = None) -> torch.Tensor:
    """x_j <- mean + lambda (x_j - mean) over the ok members (Anderson & Anderson 1999)."""
    idx = _members(x, ok)
    xs = x[idx]
    mean = xs.mean(0, keepdim=True)
    out = x.clone()
    out[idx] = mean + factor * (xs - mean)
    return out


def rtps(x_before: torch.Tensor, x_after: torch.Tensor, alpha: float, ok: torch.Tensor | None = None) -> torch.Tensor:
    """Relaxation to prior spread: per entry, sigma_a <- alpha sigma_b + (1 - alpha) sigma_a about the updated mean
    (Whitaker & Hamill 2012, eq. 3); sigma_b is the spread before the update."""
    idx = _members(x_after, ok)
    before, after = x_before[idx], x_after[idx]
    mean = after.mean(0, keepdim=True)
    s_b, s_a = before.std(0, unbiased=True), after.std(0, unbiased=True)
    gain = torch.where(s_a > 0, alpha * s_b / s_a.clamp_min(1e-300) + 1 - alpha, torch.ones((), dtype=s_a.dtype))
    out = x_after.clone()
    out[idx] = mean + gain * (after - mean)
    return out


def apply(kind: str, factor: float, x_before: torch.Tensor, x_after: torch.Tensor,
          ok: torch.Tensor | None = None) -> torch.Tensor:
    """The configured spread control (`kind` in KINDS) after an update from x_before to x_after."""
    if kind == "none":
        return x_after
    if kind == "multiplicative":
        return multiplicative(x_after, factor, ok)
    if kind == "rtps":
        return rtps(x_before, x_after, factor, ok)
    raise ValueError(f"unknown spread control {kind!r}; allowed: {', '.join(KINDS)}")
