import pytest
import torch

from enkg_dist import rng
from enkg_dist.priors.gaussian import GaussianFieldPrior, shell_average


@pytest.fixture
def prior():
    return GaussianFieldPrior.matern_like(8, 2.0, 3.0, 0.5)


def test_pointwise_std_and_dense_covariance(prior):
    C = prior.dense_covariance()
    assert torch.allclose(torch.diagonal(C), torch.full((64,), 0.25, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(C, C.T, atol=1e-14)
    # sampling from white noise gives C: sample(e_i) columns are C^{1/2}
    eye = torch.eye(64, dtype=torch.float64).reshape(64, 1, 8, 8)
    root = prior.sample(eye).reshape(64, 64)
    assert torch.allclose(root @ root.T, C, atol=1e-12)
    # stationary: covariance depends on the lag only
    assert torch.allclose(C[0, 1], C[9, 10]) and torch.allclose(C[0, 8], C[63, 7])


@pytest.mark.parametrize("sigma", [0.01, 0.5, 3.0, 80.0])
def test_denoiser_is_the_exact_posterior_mean(prior, sigma):
    """D(x; sigma) = mu + C (C + sigma^2 I)^{-1} (x - mu), checked against the dense formula."""
    prior.mean = torch.linspace(-1, 1, 64, dtype=torch.float64).reshape(8, 8)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    C = prior.dense_covariance()
    mu = prior.mean.reshape(-1)
    dense = mu + (C @ torch.linalg.solve(C + sigma**2 * torch.eye(64, dtype=torch.float64),
                                         (x.reshape(3, -1) - mu).T)).T
    assert torch.allclose(prior.denoise(x, sigma).reshape(3, -1), dense, atol=1e-11)


def test_denoiser_is_batch_independent(prior):
    """To round-off only: on CPUs with AVX-512, batched FFTs differ from single ones in the last bit (seen here), so
    the prior actors batch members by global index instead (devices.member_chunks)."""
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    whole = prior.denoise(x, 0.7)
    assert all(torch.allclose(whole[i], prior.denoise(x[i : i + 1], 0.7)[0], rtol=0, atol=1e-14) for i in range(5))


def test_whitening(prior):
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    quad = (x @ torch.linalg.solve(prior.dense_covariance(), x.T)).diagonal()
    assert torch.allclose((prior.whiten(x) ** 2).sum(1), quad, rtol=1e-10)


@pytest.mark.parametrize("radial", [False, True])
def test_fit_recovers_the_spectrum(radial):
    true = GaussianFieldPrior.matern_like(16, 2.5, 3.0, 1.0)
    S = 4000
    data = true.sample(rng.member_normal(0, rng.DATA, range(S), (1, 16, 16)))
    fitted = GaussianFieldPrior.fit(data, radial=radial)
    ratio = fitted.lam / (shell_average(true.lam) if radial else true.lam)
    # per-mode variance estimates from S samples: relative std <= sqrt(2/S) ~ 0.022 (less after radial averaging)
    assert float((ratio - 1).abs().max()) < 6 * (2 / S) ** 0.5
    assert float(fitted.mean.abs().max()) < 6 * (true.pointwise_variance() / S) ** 0.5
    with pytest.raises(ValueError, match="at least 2 square samples"):
        GaussianFieldPrior.fit(data[:1])


def test_shape_mismatch_is_named(prior):
    with pytest.raises(ValueError, match=r"field shape mismatch: got \(16, 16\), prior is 8x8"):
        prior.denoise(torch.zeros(1, 1, 16, 16, dtype=torch.float64), 1.0)


def test_whitening_is_finite_with_a_fixed_mean_mode():
    """Tikhonov-EKI on Navier-Stokes whitens by a prior whose mean mode has zero variance: the pseudo-inverse."""
    prior = GaussianFieldPrior.matern_like(8, 2.5, 3.0, 0.5, zero_mean_mode=True)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 2.0
    w = prior.whiten(x)
    assert bool(torch.isfinite(w).all())
    assert torch.allclose(w.mean(dim=(-2, -1)), torch.zeros(3, 1, dtype=torch.float64), atol=1e-12)
    zero_mean = x - x.mean(dim=(-2, -1), keepdim=True)  # off the fixed mode, whitening is C^{-1/2}
    assert torch.allclose(prior.apply_cov(prior.whiten(prior.whiten(zero_mean))), zero_mean, atol=1e-9)
