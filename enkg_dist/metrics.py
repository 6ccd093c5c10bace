"""Accuracy and calibration of an ensemble against a truth (and an exact posterior where one is known).

Pure maths on (J, *state) tensors. An answer is judged by its error and its uncertainty together: the relative L2
of the paper, the spread-skill ratio, the ensemble CRPS and the rank histogram of the truth (localisation.md,
"Calibration metrics").
"""

from __future__ import annotations

import torch

_PIXEL_BLOCK = 2**22  # members x pixels sorted at once by crps (bounded memory at J = 2048, d = 128^2)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).to(torch.float64)


def relative_l2(x: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """|x_j - x*| / |x*| for each member (rows of x)."""
    diff = (x.reshape(x.shape[0], -1) - truth.reshape(1, -1)).norm(dim=1)
    return diff / truth.reshape(-1).norm()


def spread(x: torch.Tensor) -> float:
    """RMS over pixels of the ensemble standard deviation (unbiased, 1/(J-1))."""
    return float(_flat(x).var(dim=0, unbiased=True).mean().sqrt())


def spread_skill(x: torch.Tensor, truth: torch.Tensor) -> float:
    """sqrt((J+1)/J) RMS ensemble std / RMS error of the ensemble mean; 1 when calibrated (Fortin et al. 2014)."""
    X, t = _flat(x), truth.reshape(-1).to(torch.float64)
    J = X.shape[0]
    rmse = float((X.mean(0) - t).pow(2).mean().sqrt())
    return spread(x) * ((J + 1) / J) ** 0.5 / rmse if rmse > 0 else float("inf")


def crps(x: torch.Tensor, truth: torch.Tensor) -> float:
    """Ensemble CRPS averaged over pixels: (1/J) sum_j |x_j - t| - (1/2J^2) sum_jk |x_j - x_k| (Gneiting-Raftery 2007).

    The pair sum is 2 sum_i (2i - J - 1) x_(i) over the sorted members, so a block of pixels costs O(J log J) each.
    """
    X, t = _flat(x), truth.reshape(-1).to(torch.float64)
    J, d = X.shape
    w = (2 * torch.arange(1, J + 1, dtype=torch.float64) - J - 1)[:, None]
    total, step = 0.0, max(1, _PIXEL_BLOCK // J)
    for s in range(0, d, step):
        B = X[:, s : s + step]
        skill = (B - t[s : s + step]).abs().mean(0)
        pairs = (w * B.sort(dim=0).values).sum(0) / J**2
        total += float((skill - pairs).sum())
    return total / d


def rank_histogram(x: torch.Tensor, truth: torch.Tensor) -> list[int]:
    """Counts of the truth's rank r = #{j : x_j < t} in 0..J over all pixels; flat when calibrated (Hamill 2001)."""
    X, t = _flat(x), truth.reshape(-1).to(torch.float64)
    ranks = (X < t).sum(0)
    return torch.bincount(ranks, minlength=X.shape[0] + 1).tolist()


def ensemble_metrics(x: torch.Tensor, truth: torch.Tensor | None) -> dict:
    """The paper's metric (relative L2 per particle, averaged), the mean's relative L2, the spread, and with a truth
    the spread-skill ratio and the CRPS."""
    out = {"J": x.shape[0], "spread": spread(x)}
    if truth is not None:
        X = _flat(x)
        rel = relative_l2(X, truth.to(torch.float64))
        out["rel_l2_particles"] = float(rel.mean())
        out["rel_l2_particles_std"] = float(rel.std()) if x.shape[0] > 1 else 0.0
        out["rel_l2_mean"] = float(relative_l2(X.mean(0, keepdim=True), truth.to(torch.float64))[0])
        out["spread_skill"] = spread_skill(X, truth)
        out["crps"] = crps(X, truth)
    return out


def posterior_metrics(metrics: dict, truth: torch.Tensor, post_mean: torch.Tensor, post_var: torch.Tensor) -> dict:
    """Against the exact posterior N(post_mean, diag post_var): the ensemble mean's error over the Bayes error
    (`ratio_to_bayes`), the spread over the posterior's RMS std (`spread_ratio`), and the exact posterior's own
    CRPS (a Gaussian's closed form) as the floor the ensemble's CRPS is compared with."""
    t = truth.reshape(-1).to(torch.float64)
    m, v = post_mean.reshape(-1).to(torch.float64), post_var.reshape(-1).to(torch.float64)
    bayes = float(relative_l2(m[None], t)[0])
    post_std = float(v.mean().sqrt())
    s = v.clamp_min(1e-300).sqrt()
    z = (t - m) / s
    normal = torch.distributions.Normal(torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64))
    gauss_crps = s * (z * (2 * normal.cdf(z) - 1) + 2 * normal.log_prob(z).exp() - 1 / torch.pi**0.5)
    out = {"posterior_mean_rel_l2": bayes, "posterior_spread": post_std,
           "spread_ratio": metrics["spread"] / post_std, "posterior_crps": float(gauss_crps.mean())}
    if "rel_l2_mean" in metrics:
        out["ratio_to_bayes"] = metrics["rel_l2_mean"] / bayes
    return out
