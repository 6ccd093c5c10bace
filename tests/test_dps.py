"""DPS, the gradient-access baseline: its gradient through the denoiser and our torch Navier-Stokes solver against
central finite differences, and a DPS run that fits the data better than the unconditional prior."""

import pytest
import torch

from enkg_dist import dps, sampler
from enkg_dist.priors.gaussian import GaussianFieldPrior
from enkg_dist.priors.learned import LearnedPrior
from enkg_dist.problems.linear_gaussian import make_problem
from enkg_dist.problems.navier_stokes.problem import make_problem as ns_problem


def _fd_check(loss, x, eps=1e-6, directions=3):
    """Directional derivatives of loss at x: autograd against central differences."""
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(x), x)
    gen = torch.Generator().manual_seed(0)
    for _ in range(directions):
        v = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        with torch.no_grad():
            fd = (loss(x.detach() + eps * v) - loss(x.detach() - eps * v)) / (2 * eps)
        assert abs(float((g * v).sum()) - float(fd)) <= 1e-6 * max(1.0, abs(float(fd))), (float((g * v).sum()),
                                                                                          float(fd))


def test_misfit_gradient_through_the_navier_stokes_solver_matches_finite_differences():
    problem = ns_problem(n=16, k=2, T=0.2, truth=3, seed=3, spinup=0.5, mode="fixed", dt=0.01)  # a smooth G
    prior = GaussianFieldPrior.matern_like(16, 2.5, 3.0, 0.5, zero_mean_mode=True)
    x = prior.sample(torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    x = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def loss(z):
        return (problem.forward(prior.denoise(z, 0.3)).psi - problem.y).pow(2).sum(1).sqrt().sum()  # Gamma = s^2 I

    _fd_check(loss, x)
    g, _, norm = dps.misfit_gradient(prior.denoise, lambda z: problem.forward(z).psi, x, 0.3, problem.y,
                                     problem.Gamma)
    x_req = x.detach().requires_grad_(True)
    (ref,) = torch.autograd.grad(loss(x_req), x_req)
    assert torch.allclose(g, ref, rtol=1e-10, atol=1e-12) and bool(torch.isfinite(norm).all())


def test_learned_denoiser_gradient_matches_finite_differences():
    lp = LearnedPrior.from_checkpoint("builtin:ns32", device="cpu", precision="float64")
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _fd_check(lambda z: (lp.denoise_with_grad(z, 0.7) * w).sum(), x, eps=1e-5)
    assert torch.equal(lp.denoise_with_grad(x, 0.7).detach(), lp.denoise(x, 0.7))


def test_failed_members_get_no_gradient():
    prior = GaussianFieldPrior.matern_like(8, 2.0, 3.0, 0.5)
    problem, _, _ = make_problem(n=8, k=2)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)

    def forward(z):
        psi = problem.forward(z).psi
        return torch.cat([psi[:1] * float("nan"), psi[1:]])

    g, _, norm = dps.misfit_gradient(prior.denoise, forward, x, 0.5, problem.y, problem.Gamma)
    assert float(g[0].abs().max()) == 0.0 and norm[0] == float("inf") and bool(torch.isfinite(g).all())


@pytest.mark.parametrize("scale", [0.5])
def test_dps_fits_the_data_better_than_the_unconditional_prior(scale):
    problem, prior, post = make_problem(n=16, k=2, noise_std=0.1, truth_seed=0)
    cfg = dps.DPSConfig(num_steps=40, scale=scale)
    x_T = sampler.initial_particles(0, 8, prior.state_shape, cfg.sigma_max)
    x = dps.dps_sample(prior.denoise, lambda z: problem.forward(z).psi, x_T, problem.y, problem.Gamma, cfg)
    free = dps.dps_sample(prior.denoise, lambda z: problem.forward(z).psi, x_T, problem.y, problem.Gamma,
                          dps.DPSConfig(num_steps=40, scale=0.0))

    def err(z):
        return float((z.mean(0) - problem.x_true).norm() / problem.x_true.norm())

    assert err(x) < 0.8 * err(free), (err(x), err(free))
