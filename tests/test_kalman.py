import pytest
import torch

from enkg_dist import kalman
from enkg_dist.noise import NoiseCovariance, NotPositiveDefiniteError


def random_ensemble(gen, J=12, d=30, m=7, dtype=torch.float64):
    x = torch.randn(J, d, generator=gen, dtype=dtype)
    psi = torch.randn(J, m, generator=gen, dtype=dtype) + x[:, :m] ** 2
    y = torch.randn(m, generator=gen, dtype=dtype)
    return x, psi, y


def gammas(gen, m):
    B = torch.randn(m, m, generator=gen, dtype=torch.float64)
    return {
        "scalar": NoiseCovariance.scalar(0.3, m),
        "diagonal": NoiseCovariance.diagonal(torch.rand(m, generator=gen, dtype=torch.float64) + 0.1),
        "full": NoiseCovariance.full(B @ B.T + 0.5 * torch.eye(m, dtype=torch.float64)),
    }


def dense_enkg(x, psi, y, Gamma_dense, w):
    """x_j - w C_xpsi Gamma^{-1} (psi_j - y), with 1/J covariances (EnKG eq. 10), all dense."""
    J = x.shape[0]
    Xc, Pc = x - x.mean(0), psi - psi.mean(0)
    C_xpsi = Xc.T @ Pc / J
    return x - w * (C_xpsi @ torch.linalg.solve(Gamma_dense, (psi - y).T)).T


@pytest.mark.parametrize("kind", ["scalar", "diagonal", "full"])
@pytest.mark.parametrize("rule", ["frobenius", "trace"])
def test_enkg_update_equals_dense_formula(gen, kind, rule):
    x, psi, y = random_ensemble(gen)
    Gamma = gammas(gen, y.shape[0])[kind]
    x_new, info = kalman.enkg_update(x, psi, y, Gamma, scale=1.7, rule=rule, guard=None)
    Gd = Gamma.dense()
    J = x.shape[0]
    Pc = psi - psi.mean(0)
    A = (psi - y) @ torch.linalg.solve(Gd, Pc.T) / J
    C_pp = Pc.T @ Pc / J
    w = 1.7 / torch.linalg.matrix_norm(A) if rule == "frobenius" else 1.7 / torch.trace(torch.linalg.solve(Gd, C_pp))
    assert info.weight == pytest.approx(float(w), rel=1e-12)
    assert torch.allclose(x_new, dense_enkg(x, psi, y, Gd, w), rtol=0, atol=1e-12)


def test_guard_caps_step_at_trace_rule(gen):
    x, psi, y = random_ensemble(gen)
    Gamma = NoiseCovariance.scalar(1e-4, y.shape[0])  # tiny noise: the Frobenius step is far longer than 1/tr
    _, free = kalman.enkg_update(x, psi, y, Gamma, scale=2.0, guard=None)
    x_g, guarded = kalman.enkg_update(x, psi, y, Gamma, scale=2.0, guard=0.5)
    assert guarded.guarded and not free.guarded
    assert guarded.weight == pytest.approx(0.5 / guarded.trace_Cpp)
    x_t, _ = kalman.enkg_update(x, psi, y, Gamma, scale=0.5, rule="trace", guard=None)
    assert torch.equal(x_g, x_t)


def test_masked_members_give_exactly_the_run_without_them(gen):
    x, psi, y = random_ensemble(gen, J=10)
    Gamma = gammas(gen, y.shape[0])["full"]
    ok = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    psi_bad = psi.clone()
    psi_bad[~ok] = float("nan")
    x_masked, info = kalman.enkg_update(x, torch.nan_to_num(psi_bad), y, Gamma, 2.0, ok=ok)
    x_sub, _ = kalman.enkg_update(x[ok], psi[ok], y, Gamma, 2.0)
    assert torch.equal(x_masked[ok], x_sub)
    assert torch.equal(x_masked[~ok], x[~ok])
    assert info.n_ok == 8
    e_masked, _ = kalman.eki_update(x, torch.nan_to_num(psi_bad), y, Gamma, ok=ok)
    e_sub, _ = kalman.eki_update(x[ok], psi[ok], y, Gamma)
    assert torch.equal(e_masked[ok], e_sub)


def test_fewer_than_two_members_is_a_clear_error(gen):
    x, psi, y = random_ensemble(gen, J=5)
    Gamma = NoiseCovariance.scalar(1.0, y.shape[0])
    ok = torch.tensor([0, 0, 1, 0, 0], dtype=torch.bool)
    with pytest.raises(kalman.EnsembleCollapseError, match="only 1 of 5 members succeeded"):
        kalman.enkg_update(x, psi, y, Gamma, 1.0, ok=ok)


def test_bad_inputs_are_named(gen):
    x, psi, y = random_ensemble(gen)
    Gamma = NoiseCovariance.scalar(1.0, y.shape[0])
    with pytest.raises(ValueError, match="12 particles but 11 forward outputs"):
        kalman.enkg_update(x, psi[:-1], y, Gamma, 1.0)
    with pytest.raises(ValueError, match="observation size mismatch|shape mismatch"):
        kalman.enkg_update(x, psi, y[:-1], Gamma, 1.0)
    bad = psi.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        kalman.enkg_update(x, bad, y, Gamma, 1.0)
    with pytest.raises(ValueError, match="unknown step rule 'foo'"):
        kalman.enkg_update(x, psi, y, Gamma, 1.0, rule="foo")


def test_gamma_not_positive_definite():
    with pytest.raises(NotPositiveDefiniteError):
        NoiseCovariance.scalar(0.0, 3)
    with pytest.raises(NotPositiveDefiniteError, match="diagonal entry 1"):
        NoiseCovariance.diagonal([1.0, -2.0])
    with pytest.raises(NotPositiveDefiniteError, match="not positive definite"):
        NoiseCovariance.full([[1.0, 2.0], [2.0, 1.0]])
    with pytest.raises(NotPositiveDefiniteError, match="not symmetric"):
        NoiseCovariance.full([[1.0, 0.5], [0.0, 1.0]])


@pytest.mark.parametrize("kind", ["scalar", "diagonal", "full"])
def test_whitening_and_colouring(gen, kind):
    m = 6
    Gamma = gammas(gen, m)[kind]
    r = torch.randn(4, m, generator=gen, dtype=torch.float64)
    quad = (r @ torch.linalg.solve(Gamma.dense(), r.T)).diagonal()
    assert torch.allclose((Gamma.whiten(r) ** 2).sum(1), quad, rtol=1e-12)
    assert torch.allclose(Gamma.whiten(Gamma.color(r)), r, atol=1e-12)
    assert Gamma.trace() == pytest.approx(float(torch.trace(Gamma.dense())))


@pytest.mark.parametrize("dt", [1.0, 0.25])
def test_eki_update_equals_dense_kalman_gain(gen, dt):
    x, psi, y = random_ensemble(gen, J=9, d=20, m=5)
    Gamma = gammas(gen, 5)["full"]
    eta = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    x_new, _ = kalman.eki_update(x, psi, y, Gamma, dt=dt, perturbation=eta)
    J = x.shape[0]
    Xc, Pc = x - x.mean(0), psi - psi.mean(0)
    K = (Xc.T @ Pc / J) @ torch.linalg.inv(Pc.T @ Pc / J + Gamma.dense() / dt)
    assert torch.allclose(x_new, x + (K @ (y + eta - psi).T).T, atol=1e-12)


def test_resample_failed_draws_from_the_fitted_gaussian(gen):
    J, d = 6, 3
    x = torch.randn(J, d, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    ok = torch.tensor([1, 1, 1, 1, 0, 1], dtype=torch.bool)
    n = 40000
    z = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    draws = torch.stack([kalman.resample_failed(x, ok, z[i : i + 1])[4] for i in range(0, 400)])
    assert torch.equal(kalman.resample_failed(x, ok, z[:1])[ok], x[ok])
    # Statistics of many draws (vectorised: the formula is linear in z).
    good = x[ok]
    mean = good.mean(0)
    samples = mean + z @ (good - mean) / 2.0
    assert torch.allclose(draws, samples[:400], atol=1e-12)
    assert torch.allclose(samples.mean(0), mean, atol=4 * good.std(0).max() / n**0.5)
    assert torch.allclose(torch.cov(samples.T), torch.cov(good.T), rtol=0.05, atol=0.02)
    with pytest.raises(kalman.EnsembleCollapseError):
        kalman.resample_failed(x, torch.tensor([1, 0, 0, 0, 0, 0], dtype=torch.bool), z[:5, :1])
