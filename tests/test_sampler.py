import numpy as np
import pytest
import torch

from enkg_dist import kalman, rng, sampler
from enkg_dist.priors.gaussian import GaussianFieldPrior, rfft_weights
from enkg_dist.metrics import relative_l2
from enkg_dist.problems.linear_gaussian import make_problem


def _evaluator(problem):
    def evaluate(x_hat):
        r = problem.forward(x_hat)
        return r.psi, r.ok

    return evaluate


def _mode_factor(cfg: sampler.EnKGConfig, lam: torch.Tensor, to_zero: bool = True) -> torch.Tensor:
    """Per-mode gain of the unguided sampler: for a Gaussian prior every PF-ODE step is a scalar map per mode."""
    s = cfg.sigmas() if to_zero else cfg.sigmas()[:-1]
    f = torch.ones_like(lam)
    for a, b in zip(s[:-1], s[1:]):
        e = 1 + (b - a) * a / (lam + a * a)  # Euler: x + (b - a) (x - D x)/a, with x - D x = a^2/(lam + a^2) x
        if cfg.predictor == "heun" and b > 0:
            xe = e
            f_next = xe * b / (lam + b * b)
            e = 1 + (b - a) * 0.5 * (a / (lam + a * a) + f_next)
        f = f * e
    return f


@pytest.mark.parametrize("predictor", ["euler", "heun"])
def test_unguided_sampler_is_the_exact_per_mode_map(predictor):
    prior = GaussianFieldPrior.matern_like(16, 2.0, 3.0, 0.5)
    cfg = sampler.EnKGConfig(num_steps=30, num_corrections=0, predictor=predictor)
    x_T = sampler.initial_particles(0, 8, prior.state_shape, cfg.sigma_max)
    x = sampler.enkg_sample(prior.denoise, None, x_T, torch.zeros(1), None, cfg)
    expect = torch.fft.irfft2(torch.fft.rfft2(x_T, norm="ortho") * _mode_factor(cfg, prior.lam), s=(16, 16),
                              norm="ortho")
    assert torch.allclose(x, expect, atol=1e-11)


def test_heun_converges_to_the_exact_flow_at_second_order():
    """Exact PF-ODE flow of a Gaussian prior: x_b = sqrt((lam + b^2)/(lam + a^2)) x_a per mode, a = 80, b = 0.002."""
    lam = GaussianFieldPrior.matern_like(16, 2.0, 3.0, 0.5).lam
    exact = ((lam + 0.002**2) / (lam + 80.0**2)).sqrt()
    errs = {}
    for method in ("euler", "heun"):
        errs[method] = [float(((_mode_factor(sampler.EnKGConfig(num_steps=n, predictor=method), lam, False) - exact)
                               / exact).abs().max()) for n in (64, 128, 256)]
    order_heun = np.log2(errs["heun"][1] / errs["heun"][2])
    order_euler = np.log2(errs["euler"][1] / errs["euler"][2])
    assert 1.8 < order_heun < 2.3, errs
    assert 0.8 < order_euler < 1.3, errs


def test_guidance_off_reproduces_the_prior_mode_variances():
    """Per-mode sample variance of J unguided samples is within sampling error of lam_k (Heun, N = 80)."""
    n, J = 16, 2000
    prior = GaussianFieldPrior.matern_like(n, 2.0, 3.0, 0.5)
    cfg = sampler.EnKGConfig(num_steps=80, num_corrections=0, predictor="heun")
    x_T = sampler.initial_particles(3, J, prior.state_shape, cfg.sigma_max)
    x = sampler.enkg_sample(prior.denoise, None, x_T, torch.zeros(1), None, cfg)
    power = (torch.fft.rfft2(x[:, 0], norm="ortho").abs() ** 2).mean(0)
    ratio = power / prior.lam
    # |x_hat|^2 / lam is Exp(1) on complex modes (relative std 1/sqrt(J)), chi^2_1 on the real ones (sqrt(2/J)).
    rel_std = torch.where(rfft_weights(n) == 1, (2 / J) ** 0.5, (1 / J) ** 0.5)
    z = (ratio - 1) / rel_std
    assert float(z.abs().max()) < 5.0
    assert abs(float(z.mean())) < 4.0 / z.numel() ** 0.5 + 0.05
    assert float((z**2).mean()) == pytest.approx(1.0, abs=0.25)


def test_same_seed_is_bit_identical_and_independent_of_evaluation_order():
    problem, prior, _ = make_problem(n=16, k=2, truth_seed=1)
    cfg = sampler.EnKGConfig(num_steps=20)
    x_T = sampler.initial_particles(5, 24, prior.state_shape, cfg.sigma_max)
    plain = _evaluator(problem)
    gen = torch.Generator().manual_seed(0)

    def shuffled(x_hat):
        """Evaluates members in a random order and in random batch splits, then puts them back in place."""
        J = x_hat.shape[0]
        perm = torch.randperm(J, generator=gen)
        cuts = sorted(torch.randperm(J - 1, generator=gen)[:3].add(1).tolist())
        psi = torch.empty(J, problem.forward.obs_size, dtype=x_hat.dtype)
        ok = torch.empty(J, dtype=torch.bool)
        for chunk in torch.tensor_split(perm, cuts):
            r = problem.forward(x_hat[chunk])
            psi[chunk], ok[chunk] = r.psi, r.ok
        return psi, ok

    a = sampler.enkg_sample(prior.denoise, plain, x_T, problem.y, problem.Gamma, cfg, seed=5)
    b = sampler.enkg_sample(prior.denoise, plain, x_T.clone(), problem.y, problem.Gamma, cfg, seed=5)
    c = sampler.enkg_sample(prior.denoise, shuffled, x_T.clone(), problem.y, problem.Gamma, cfg, seed=5)
    assert torch.equal(a, b) and torch.equal(a, c)
    # resuming from any step's particles gives the same end
    steps = []
    sampler.enkg_sample(prior.denoise, plain, x_T, problem.y, problem.Gamma, cfg, 5, callback=steps.append)
    d = sampler.enkg_sample(prior.denoise, plain, steps[9].x, problem.y, problem.Gamma, cfg, 5, start=10)
    assert torch.equal(a, d)


@pytest.mark.parametrize("policy", ["keep", "resample"])
def test_failed_members_follow_the_policy(policy):
    problem, prior, _ = make_problem(n=16, k=2, truth_seed=2)
    cfg = sampler.EnKGConfig(num_steps=12, failure_policy=policy)
    J = 16
    x_T = sampler.initial_particles(0, J, prior.state_shape, cfg.sigma_max)
    failing = {3, 11}

    def flaky(x_hat):
        r = problem.forward(x_hat)
        psi = r.psi.clone()
        psi[sorted(failing)] = float("nan")  # NaN output: the sampler marks these members failed itself
        return psi, r.ok

    records = []
    x = sampler.enkg_sample(prior.denoise, flaky, x_T, problem.y, problem.Gamma, cfg, 0, records.append)
    assert torch.isfinite(x).all()
    corr = [c for r in records for c in r.corrections]
    assert corr and all(c.ok.sum() == J - 2 and not c.ok[3] and not c.ok[11] for c in corr)
    # first guided step: the failed members were kept (moved by the predictor only) or redrawn
    first = next(r for r in records if r.corrections)
    prev = next(r for r in records if r.i == first.i - 1).x
    noguide = sampler.predictor(prior.denoise, prev, first.sigma, first.sigma_next, "euler")
    same = torch.equal(first.x[3], noguide[3])
    assert same if policy == "keep" else not same


def test_too_few_successes_is_a_clear_error():
    problem, prior, _ = make_problem(n=8, k=2)
    cfg = sampler.EnKGConfig(num_steps=10)

    def broken(x_hat):
        r = problem.forward(x_hat)
        ok = torch.zeros(x_hat.shape[0], dtype=torch.bool)
        ok[0] = True
        return r.psi, ok

    x_T = sampler.initial_particles(0, 6, prior.state_shape, cfg.sigma_max)
    with pytest.raises(kalman.EnsembleCollapseError, match="only 1 of 6"):
        sampler.enkg_sample(prior.denoise, broken, x_T, problem.y, problem.Gamma, cfg)
    with pytest.raises(ValueError, match=r"forward outputs have shape \(6, 3\)"):
        sampler.enkg_sample(prior.denoise, lambda x: (torch.zeros(6, 3), torch.ones(6)), x_T, problem.y,
                            problem.Gamma, cfg)


def test_tikhonov_eki_converges_to_the_exact_posterior_mean():
    """Tikhonov-EKI's fixed point is the Tikhonov minimiser = the posterior mean (J > d so the span is full);
    the error falls like 1/(n dt)."""
    problem, prior, post = make_problem(n=8, k=2, noise_std=0.1, truth_seed=0)
    m_post = post.mean(problem.y)
    x0 = prior.sample(rng.member_normal(0, rng.INIT, range(200), prior.state_shape))
    errs = []
    for dt in (1e2, 1e3, 1e4):
        x = sampler.eki(_evaluator(problem), x0, problem.y, problem.Gamma, 50, dt=dt,
                        tikhonov=(prior.mean, prior.whiten))
        errs.append(float(relative_l2(x.mean(0, keepdim=True), m_post)[0]))
    assert errs[-1] < 1e-4, errs
    assert errs[0] / errs[1] > 5 and errs[1] / errs[2] > 5, errs


def test_one_shot_enkf_reaches_the_sampling_floor():
    """A stochastic EnKF analysis of a J = 256 prior ensemble: ratio to Bayes about 1.5 (enkg.md §8)."""
    ratios = []
    for t in range(3):
        problem, prior, post = make_problem(n=32, k=2, noise_std=0.1, truth_seed=t)
        x0 = prior.sample(rng.member_normal(10 + t, rng.INIT, range(256), prior.state_shape))
        x = sampler.eki(_evaluator(problem), x0, problem.y, problem.Gamma, 1, stochastic=True, seed=t)
        bayes = relative_l2(post.mean(problem.y)[None], problem.x_true)[0]
        ratios.append(float(relative_l2(x.mean(0, keepdim=True), problem.x_true)[0] / bayes))
    assert 1.3 < np.mean(ratios) < 1.8, ratios


def test_outputs_in_float64_on_the_cpu_meet_float32_particles():
    """The evaluation boundary: a simulator answering in float64 (as Ray workers and external programs do) drives
    float32 particles; the step equals the one taken with float32 outputs, and stays float32."""
    problem, prior, _ = make_problem(n=16, k=2, noise_std=0.1, truth_seed=0)
    y32 = problem.y.float()
    cfg = sampler.EnKGConfig(num_steps=10, scale=1.0, failure_policy="resample")
    x = sampler.initial_particles(0, 6, prior.state_shape, cfg.sigma_max, torch.float32)

    def as64(x_hat):
        r = problem.forward(x_hat.double())
        ok = r.ok.clone()
        ok[2] = False  # one failed member: the resample draw meets the particles too
        return r.psi, ok

    def as32(x_hat):
        psi, ok = as64(x_hat)
        return psi.float(), ok

    a = sampler.enkg_step(prior.denoise, as64, x, 3, y32, problem.Gamma, cfg, seed=1)
    b = sampler.enkg_step(prior.denoise, as32, x, 3, y32, problem.Gamma, cfg, seed=1)
    assert a.x.dtype == torch.float32 and torch.allclose(a.x, b.x, rtol=1e-5, atol=1e-5)
    assert a.corrections[0].psi.dtype == torch.float32 and not bool(a.corrections[0].ok[2])
    eki_x, _ = sampler.eki_step(as64, prior.sample(torch.randn(6, 1, 16, 16)).float(), 0, y32, problem.Gamma,
                                stochastic=True, tikhonov=(prior.mean, prior.whiten))
    assert eki_x.dtype == torch.float32 and bool(torch.isfinite(eki_x).all())


def test_data_misfit_controller_tempers_to_the_posterior():
    """Stochastic EKI with the data-misfit controller's steps (summing to 1) samples the linear-Gaussian posterior:
    with J = 1000 on 8x8 the ensemble mean is within sampling error of the exact posterior mean (measured 0.12
    posterior stds, falling as 1/sqrt(J)), the spread is the posterior's, and no step is taken once the clock is 1."""
    problem, prior, post = make_problem(n=8, k=2, noise_std=0.05, truth_seed=1)
    J = 1000
    x0 = prior.sample(rng.member_normal(3, rng.INIT, range(J), prior.state_shape))
    steps = []
    x = sampler.eki(_evaluator(problem), x0, problem.y, problem.Gamma, 12, dt="auto", stochastic=True, seed=2,
                    callback=lambda n, x, info: steps.append(info.weight))
    assert abs(sum(steps) - 1.0) < 1e-12 and 1 < sum(s > 0 for s in steps) < 12 and steps[-1] == 0.0
    m_post, post_sd = post.mean(problem.y), post.variance().sum().sqrt()
    err, prior_err = float((x.mean(0) - m_post).norm() / post_sd), float((x0.mean(0) - m_post).norm() / post_sd)
    assert err < 0.2 and err < 0.3 * prior_err, (err, prior_err)
    spread = float(x.var(0).mean().sqrt() / post.variance().mean().sqrt())
    assert 0.85 < spread < 1.15, spread


def test_data_misfit_step_formula():
    from enkg_dist import schedules

    phi = np.array([10.0, 20.0, 30.0])  # mean 20, variance 100
    assert schedules.data_misfit_step(phi, 8, 0.0) == max(8 / 40, np.sqrt(8 / 200))
    assert schedules.data_misfit_step(phi, 400, 0.9) == pytest.approx(0.1)  # the last step lands on 1
    assert schedules.data_misfit_step(phi, 8, 1.0) == 0.0
