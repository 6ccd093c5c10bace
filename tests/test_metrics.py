"""Calibration metrics against brute force and against distributions where their value is known."""

import math

import torch

from enkg_dist import metrics


def _crps_brute(x, t):
    """(1/J) sum_j |x_j - t| - (1/2J^2) sum_jk |x_j - x_k| per pixel, averaged."""
    X, t = x.reshape(x.shape[0], -1), t.reshape(-1)
    J = X.shape[0]
    skill = (X - t).abs().mean(0)
    pairs = (X[:, None, :] - X[None, :, :]).abs().sum((0, 1)) / (2 * J**2)
    return float((skill - pairs).mean())


def test_crps_equals_the_pair_sum(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(17, 3, 5, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, 5, generator=g,
                                                                                    dtype=torch.float64)
    assert abs(metrics.crps(x, t) - _crps_brute(x, t)) < 1e-13
    monkeypatch.setattr(metrics, "_PIXEL_BLOCK", 40)  # blocks of 2 pixels: same sum
    assert abs(metrics.crps(x, t) - _crps_brute(x, t)) < 1e-13


def test_crps_of_a_large_gaussian_ensemble_approaches_the_closed_form():
    """CRPS(N(0,1), t) = t(2Phi(t)-1) + 2phi(t) - 1/sqrt(pi); the ensemble estimate is biased by O(1/J)."""
    g = torch.Generator().manual_seed(1)
    t = torch.linspace(-2, 2, 9, dtype=torch.float64)
    x = torch.randn(20000, 9, generator=g, dtype=torch.float64)
    n = torch.distributions.Normal(0.0, 1.0)
    exact = t * (2 * n.cdf(t) - 1) + 2 * n.log_prob(t).exp() - 1 / math.sqrt(math.pi)
    assert abs(metrics.crps(x, t) - float(exact.mean())) < 0.01
    post = metrics.posterior_metrics({"spread": 1.0}, t, torch.zeros(9, dtype=torch.float64),
                                     torch.ones(9, dtype=torch.float64))
    assert abs(post["posterior_crps"] - float(exact.mean())) < 1e-12


def test_calibrated_ensemble_has_spread_skill_one_and_a_flat_rank_histogram():
    """Truth and members exchangeable draws of the same distribution at every pixel."""
    g = torch.Generator().manual_seed(2)
    J, d = 16, 40000
    centre = 3 * torch.randn(d, generator=g, dtype=torch.float64)
    x = centre + 0.7 * torch.randn(J, d, generator=g, dtype=torch.float64)
    t = centre + 0.7 * torch.randn(d, generator=g, dtype=torch.float64)
    assert abs(metrics.spread_skill(x, t) - 1.0) < 0.02
    h = torch.tensor(metrics.rank_histogram(x, t), dtype=torch.float64)
    assert h.sum() == d and len(h) == J + 1
    chi2 = float(((h - d / (J + 1)) ** 2 / (d / (J + 1))).sum())
    assert chi2 < 60  # 16 degrees of freedom: p < 1e-6 above 60


def test_overconfident_ensemble_is_flagged():
    g = torch.Generator().manual_seed(3)
    J, d = 16, 10000
    centre = torch.randn(d, generator=g, dtype=torch.float64)
    x = centre + 0.1 * torch.randn(J, d, generator=g, dtype=torch.float64)
    t = centre + torch.randn(d, generator=g, dtype=torch.float64)
    assert metrics.spread_skill(x, t) < 0.15
    h = metrics.rank_histogram(x, t)
    assert h[0] + h[-1] > 0.8 * d  # U-shaped: the truth falls outside the ensemble


def test_ensemble_metrics_keys_and_relative_l2():
    x = torch.stack([torch.ones(1, 2, 2), 3 * torch.ones(1, 2, 2)]).double()
    t = 2 * torch.ones(1, 2, 2, dtype=torch.float64)
    m = metrics.ensemble_metrics(x, t)
    assert m["rel_l2_mean"] == 0.0 and abs(m["rel_l2_particles"] - 0.5) < 1e-15
    assert m["spread_skill"] == float("inf") and abs(m["spread"] - math.sqrt(2)) < 1e-15
    assert set(metrics.ensemble_metrics(x, None)) == {"J", "spread"}
