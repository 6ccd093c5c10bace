"""Localised Kalman gains against dense references, the limits that must give the unlocalised update, bounded memory,
and the spread controls."""

import math

import numpy as np
import pytest
import torch

from enkg_dist import inflation, kalman, localisation
from enkg_dist.localisation import NICE, SEC, GaspariCohn, grid_geometry
from enkg_dist.noise import NoiseCovariance


def _gc_reference(r: float) -> float:
    """localisation.md's Gaspari-Cohn formula, written out per branch."""
    r = abs(r)
    if r <= 1:
        return -0.25 * r**5 + 0.5 * r**4 + 0.625 * r**3 - 5 / 3 * r**2 + 1
    if r < 2:
        return r**5 / 12 - 0.5 * r**4 + 0.625 * r**3 + 5 / 3 * r**2 - 5 * r + 4 - 2 / (3 * r)
    return 0.0


def test_gaspari_cohn_formula_continuity_and_positive_definiteness():
    r = torch.linspace(0, 2.5, 251, dtype=torch.float64)
    assert torch.allclose(localisation.gaspari_cohn(r), torch.tensor([_gc_reference(float(v)) for v in r],
                                                                         dtype=torch.float64), atol=1e-15)
    for at in (1.0, 2.0):  # continuous where the branches meet
        lo, hi = localisation.gaspari_cohn(torch.tensor([at - 1e-9, at + 1e-9], dtype=torch.float64))
        assert abs(float(lo - hi)) < 1e-7
    assert float(localisation.gaspari_cohn(torch.tensor(0.0))) == 1.0
    g = grid_geometry(16, 1)  # a taper matrix on the torus is positive semi-definite (GC99: up to 3 dimensions)
    T = localisation.gaspari_cohn(g.torus(g.obs, g.obs) / 3.0)
    assert float(torch.linalg.eigvalsh(T).min()) > -1e-10


def _ensemble(J=9, n=12, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = (n // k) ** 2
    X = torch.randn(J, 1, n, n, generator=g, dtype=torch.float64)
    psi = X[..., ::k, ::k].reshape(J, -1) + 0.3 * torch.randn(J, m, generator=g, dtype=torch.float64)
    y = torch.randn(m, generator=g, dtype=torch.float64)
    return X, psi, y


def _dense_rho(loc, X, P):
    """rho over the whole d x m block, from the localiser's own taper on all rows and columns at once."""
    n, d = X.shape
    C = X.T @ P / n
    R = None
    if loc.needs_correlations:
        sx, sp = X.pow(2).mean(0).sqrt(), P.pow(2).mean(0).sqrt()
        R = C / (sx[:, None] * sp[None, :])
    return loc.taper(torch.arange(d), None, R), C


def _nice_literal(R: torch.Tensor, J: int, delta: float = 1.0) -> torch.Tensor:
    """EKP.jl's SECNice sweep, written plainly on a dense block (noise std by the same quadrature)."""
    tol = delta * float(localisation.correlation_noise_std(R, J).pow(2).sum().sqrt())
    g = next((gg for gg in range(2, 11, 2) if float((R ** (gg + 1) - R).norm()) > tol), 10)
    for a in np.linspace(1.0, 0.0, 10):
        interp = ((1 - a) * R ** (g - 2) + a * R**g) * R
        if float((interp - R).norm()) < tol:
            return interp / R
    return R ** (g - 1) / R


@pytest.mark.parametrize("make", ["gc", "gc_small_tiles", "sec", "sec_cutoff", "nice"])
def test_blocked_localised_gain_equals_the_dense_product(make, monkeypatch):
    X, psi, y = _ensemble()
    J, d, m = X.shape[0], 144, 36
    geo = grid_geometry(12, 2)
    loc = {"gc": lambda: GaspariCohn(geo, 2.5), "gc_small_tiles": lambda: GaspariCohn(geo, 2.5, tile=4),
           "sec": lambda: SEC(1.0), "sec_cutoff": lambda: SEC(2.0, 0.05), "nice": lambda: NICE()}[make]()
    monkeypatch.setattr(localisation, "BLOCK_ELEMENTS", 200)  # many blocks
    Xa, Pa = kalman.anomalies(X.reshape(J, -1)), kalman.anomalies(psi)
    V = torch.randn(J, m, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    stats = localisation.BlockStats()
    got = localisation.localised_apply(Xa, Pa, V, loc, stats)
    if make == "nice":
        C = Xa.T @ Pa / J
        R = C / (Xa.pow(2).mean(0).sqrt()[:, None] * Pa.pow(2).mean(0).sqrt()[None, :])
        rho = _nice_literal(R, J)
    else:
        rho, C = _dense_rho(loc, Xa, Pa)
    assert torch.allclose(got, V @ (rho * C).T, rtol=0, atol=1e-10)
    assert stats.blocks > 1
    if make.startswith("gc"):  # compact support: not every (pixel, observation) pair is touched
        assert stats.touched < d * m


def test_infinite_radius_gives_the_unlocalised_update():
    X, psi, y = _ensemble(J=7)
    Gamma = NoiseCovariance.scalar(0.09, 36)
    loc = GaspariCohn(grid_geometry(12, 2), math.inf)
    for rule in ("frobenius", "trace"):
        ref, info = kalman.enkg_update(X, psi, y, Gamma, 2.0, rule)
        got, info_l = kalman.enkg_update(X, psi, y, Gamma, 2.0, rule, localiser=loc)
        assert torch.allclose(got, ref, rtol=0, atol=1e-10) and info.weight == info_l.weight
    ref, _ = kalman.eki_update(X, psi, y, Gamma, dt=0.5)
    got, _ = kalman.eki_update(X, psi, y, Gamma, dt=0.5, localiser=loc)
    assert torch.allclose(got, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("make", ["gc", "sec", "nice"])
def test_raw_mean_moves_the_mean_unlocalised_and_the_deviations_localised(make):
    """mean_update: raw. The mean of the update is the unlocalised update's mean, its deviations are the localised
    update's deviations (same w), and with rho = 1 it is the unlocalised update."""
    X, psi, y = _ensemble(J=9)
    A = torch.randn(36, 36, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    Gamma = NoiseCovariance.full(A @ A.T + 36 * torch.eye(36, dtype=torch.float64))
    geo = grid_geometry(12, 2)
    make_loc = {"gc": lambda **o: GaspariCohn(geo, 2.0, **o), "sec": lambda **o: SEC(1.0, **o),
                "nice": lambda **o: NICE(**o)}[make]
    split = make_loc(raw_mean=True)
    for rule, guard in (("frobenius", None), ("trace", 1.0)):
        raw, info_r = kalman.enkg_update(X, psi, y, Gamma, 2.0, rule, guard)
        loc, info_l = kalman.enkg_update(X, psi, y, Gamma, 2.0, rule, guard, localiser=make_loc())
        got, info_s = kalman.enkg_update(X, psi, y, Gamma, 2.0, rule, guard, localiser=split)
        assert info_s.weight == info_l.weight == info_r.weight
        assert torch.allclose(got.mean(0), raw.mean(0), rtol=0, atol=1e-12)
        assert torch.allclose(kalman.anomalies(got), kalman.anomalies(loc), rtol=0, atol=1e-12)
        assert not torch.allclose(kalman.anomalies(got), kalman.anomalies(raw), rtol=0, atol=1e-6)
    one = GaspariCohn(geo, math.inf, raw_mean=True)
    raw, _ = kalman.enkg_update(X, psi, y, Gamma, 2.0, "frobenius")
    assert torch.allclose(kalman.enkg_update(X, psi, y, Gamma, 2.0, "frobenius", localiser=one)[0], raw, rtol=0,
                          atol=1e-12)


def test_raw_mean_is_set_from_the_config_and_refused_for_eki():
    from enkg_dist import config as cfgmod
    from enkg_dist import runner

    built = runner.build(cfgmod.load_config(None, ["enkg.localisation={kind: sec, mean_update: raw}"]))
    assert isinstance(built.localiser, SEC) and built.localiser.raw_mean
    assert not runner.build(cfgmod.load_config(None, ["enkg.localisation={kind: sec}"])).localiser.raw_mean
    with pytest.raises(cfgmod.ConfigError, match="mean_update: raw is an EnKG option"):
        cfgmod.load_config(None, ["method=eki", "eki.localisation={kind: sec, mean_update: raw}"])


@pytest.mark.parametrize("make", ["gc", "sec", "nice"])
def test_scale_dependent_gain_is_the_unlocalised_large_scales_plus_the_localised_rest(make):
    """large_scales: low_pass against a literal FFT mask; C = C_L + rho(S) o C_S with C_L from the low-passed
    anomalies, which differs from tapering all scales; every scale large gives the unlocalised product."""
    X, psi, y = _ensemble(J=9)
    J = X.shape[0]
    geo = grid_geometry(12, 2)
    make_loc = {"gc": lambda **o: GaspariCohn(geo, 2.0, **o), "sec": lambda **o: SEC(1.0, **o),
                "nice": lambda **o: NICE(**o)}[make]
    Xa, Pa = kalman.anomalies(X.reshape(J, -1)), kalman.anomalies(psi)
    V = torch.randn(J, 36, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    f = torch.fft.rfft2(Xa.reshape(J, 12, 12))
    k = torch.fft.fftfreq(12, 1 / 12, dtype=torch.float64)
    keep = (k[:, None] ** 2 + k[None, :7].abs() ** 2) <= 9.0
    XL = torch.fft.irfft2(torch.where(keep, f, 0), s=(12, 12)).reshape(J, -1)
    assert torch.allclose(localisation.low_pass(Xa, 12, 1, 3.0), XL, atol=1e-13)
    loc = make_loc(large_scales=(12, 1, 3.0))
    got = localisation.localised_apply(Xa, Pa, V, loc)
    ref_rest = localisation.localised_apply(Xa - XL, Pa, V, make_loc())
    assert torch.allclose(got, ref_rest + V @ (XL.T @ Pa / J).T, rtol=0, atol=1e-12)
    assert not torch.allclose(got, localisation.localised_apply(Xa, Pa, V, make_loc()), atol=1e-6)
    loc = make_loc(large_scales=(12, 1, 100.0))  # every scale is large: the unlocalised gain
    assert torch.allclose(localisation.localised_apply(Xa, Pa, V, loc), V @ (Xa.T @ Pa / J).T, rtol=0, atol=1e-12)


def test_large_scales_is_set_from_the_config_and_needs_a_grid(tmp_path):
    from enkg_dist import config as cfgmod
    from enkg_dist import runner

    built = runner.build(cfgmod.load_config(None, ["enkg.localisation={kind: gaspari_cohn, radius: 4, "
                                                   "large_scales: 3}"]))
    n = built.problem.forward.geometry().n
    assert built.localiser.large_scales == (n, 1, 3.0)
    y = tmp_path / "y.npy"
    np.save(y, np.zeros(16))
    base = ["problem={kind: external, command: ['{python}', '-m', 'enkg_dist.problems.example_program', "
            "'{input}', '{output}'], n: 8, obs_size: 16, observation: " + str(y) + "}", "prior={kind: gaussian}"]
    msg = _one_line(base + ["enkg.localisation={kind: nice, large_scales: 2}"], job=None)
    assert msg.startswith("config error: enkg.localisation.large_scales: needs the state's periodic grid")


def test_full_gamma_enters_as_its_inverse():
    X, psi, y = _ensemble(J=6)
    A = torch.randn(36, 36, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    Gamma = NoiseCovariance.full(A @ A.T + 36 * torch.eye(36, dtype=torch.float64))
    r = torch.randn(4, 36, dtype=torch.float64)
    assert torch.allclose(Gamma.inverse(r), torch.linalg.solve(Gamma.dense(), r.T).T, atol=1e-12)
    loc = GaspariCohn(grid_geometry(12, 2), math.inf)
    ref, _ = kalman.enkg_update(X, psi, y, Gamma, 1.0, "trace")
    got, _ = kalman.enkg_update(X, psi, y, Gamma, 1.0, "trace", localiser=loc)
    assert torch.allclose(got, ref, rtol=0, atol=1e-10)


def test_localised_eki_equals_the_dense_kalman_gain():
    X, psi, y = _ensemble(J=8)
    J = 8
    Gamma = NoiseCovariance.diagonal(torch.linspace(0.05, 0.2, 36))
    loc = GaspariCohn(grid_geometry(12, 2), 3.0)
    got, _ = kalman.eki_update(X, psi, y, Gamma, dt=1.0, localiser=loc)
    Xa, Pa = kalman.anomalies(X.reshape(J, -1)), kalman.anomalies(psi)
    rho_xp, C_xp = _dense_rho(loc, Xa, Pa)
    g = loc.geometry
    rho_pp = localisation.gaspari_cohn(g.torus(g.obs, g.obs) / 3.0)
    K = (rho_xp * C_xp) @ torch.linalg.inv(rho_pp * (Pa.T @ Pa / J) + Gamma.dense())
    ref = X.reshape(J, -1) + (K @ (y - psi).T).T
    assert torch.allclose(got.reshape(J, -1), ref, rtol=0, atol=1e-10)


def test_failed_members_take_no_part_with_localisation():
    X, psi, y = _ensemble(J=8)
    Gamma = NoiseCovariance.scalar(0.09, 36)
    loc = GaspariCohn(grid_geometry(12, 2), 2.0)
    ok = torch.tensor([True, True, False, True, True, True, False, True])
    bad = psi.clone()
    bad[~ok] = float("nan")
    got, info = kalman.enkg_update(X, torch.where(ok[:, None], bad, 0.0), y, Gamma, 1.0, ok=ok, localiser=loc)
    sub, _ = kalman.enkg_update(X[ok], psi[ok], y, Gamma, 1.0, localiser=loc)
    assert torch.equal(got[~ok], X[~ok]) and torch.allclose(got[ok], sub, atol=1e-13) and info.n_ok == 6


def test_blocked_memory_is_bounded_at_the_papers_scale_of_d_and_m(monkeypatch):
    """d = 128^2, m = 64^2 (J small to keep the test quick): no temporary of d x m; the largest C block obeys
    BLOCK_ELEMENTS, and Gaspari-Cohn touches a small fraction of the pairs."""
    J, n = 8, 128
    g = torch.Generator().manual_seed(0)
    Xa = kalman.anomalies(torch.randn(J, n * n, generator=g))
    Pa = kalman.anomalies(torch.randn(J, (n // 2) ** 2, generator=g))
    V = torch.randn(J, (n // 2) ** 2, generator=g)
    for loc in (GaspariCohn(grid_geometry(n, 2), 4.0), SEC(1.0)):
        stats = localisation.BlockStats()
        out = localisation.localised_apply(Xa, Pa, V, loc, stats)
        assert out.shape == (J, n * n) and bool(torch.isfinite(out).all())
        assert stats.largest_block <= localisation.BLOCK_ELEMENTS < n * n * (n // 2) ** 2
    assert stats.touched == n * n * (n // 2) ** 2  # SEC touches every pair, block by block


def test_correlation_noise_matches_sampling():
    J = 20
    g = torch.Generator().manual_seed(0)
    for r in (0.0, 0.5, 0.9):
        a = torch.randn(20000, J, generator=g, dtype=torch.float64)
        b = r * a + math.sqrt(1 - r * r) * torch.randn(20000, J, generator=g, dtype=torch.float64)
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        sample = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
        assert abs(float(sample.std()) - float(localisation.correlation_noise_std(torch.tensor(r), J))) < 0.01


def test_bad_localiser_settings_are_refused():
    with pytest.raises(ValueError, match="radius must be > 0"):
        GaspariCohn(grid_geometry(8, 2), -1.0)
    with pytest.raises(ValueError, match="large_scales must be"):
        SEC(1.0, large_scales=(8, 1, -2.0))
    with pytest.raises(TypeError):
        NICE(raw_means=True)  # a misspelt option is not swallowed
    with pytest.raises(ValueError, match="geometry has 16 observation locations"):
        loc = GaspariCohn(grid_geometry(8, 2), 1.0)
        localisation.localised_apply(torch.zeros(3, 64, dtype=torch.float64), torch.zeros(3, 9, dtype=torch.float64),
                                     torch.zeros(3, 9, dtype=torch.float64), loc)


def test_spread_controls():
    g = torch.Generator().manual_seed(0)
    before = torch.randn(10, 1, 4, 4, generator=g, dtype=torch.float64)
    after = 0.3 * before + 0.1 * torch.randn(10, 1, 4, 4, generator=g, dtype=torch.float64)
    assert torch.equal(inflation.apply("none", 1.0, before, after), after)
    inflated = inflation.multiplicative(after, 1.5)
    assert torch.allclose(inflated.std(0), 1.5 * after.std(0)) and torch.allclose(inflated.mean(0), after.mean(0))
    restored = inflation.rtps(before, after, 1.0)
    assert torch.allclose(restored.std(0), before.std(0)) and torch.allclose(restored.mean(0), after.mean(0))
    assert torch.allclose(inflation.rtps(before, after, 0.0), after)
    half = inflation.rtps(before, after, 0.5)
    assert torch.allclose(half.std(0), 0.5 * before.std(0) + 0.5 * after.std(0))
    ok = torch.ones(10, dtype=torch.bool)
    ok[3] = False
    part = inflation.multiplicative(after, 2.0, ok)
    assert torch.equal(part[3], after[3]) and torch.allclose(part[ok].std(0), 2 * after[ok].std(0))
    with pytest.raises(ValueError, match="unknown spread control"):
        inflation.apply("additive", 1.0, before, after)


def test_gaspari_cohn_taper_uses_the_torus_distance():
    loc = GaspariCohn(grid_geometry(12, 2), 2.5)
    rows = torch.tensor([0, 11, 12 * 11 + 11])  # pixels (0, 0), (0, 11), (11, 11)
    cols = torch.tensor([0, 5, 35])  # observations at (0, 0), (0, 10), (10, 10)
    rho = loc.taper(rows, cols)
    for a, (pi, pj) in enumerate([(0, 0), (0, 11), (11, 11)]):
        for b, (qi, qj) in enumerate([(0, 0), (0, 10), (10, 10)]):
            di, dj = abs(pi - qi) % 12, abs(pj - qj) % 12
            dist = math.hypot(min(di, 12 - di), min(dj, 12 - dj))
            assert abs(float(rho[a, b]) - _gc_reference(dist / 2.5)) < 1e-14


def test_nice_chooses_a_real_correction_for_a_small_ensemble():
    X, psi, _ = _ensemble(J=9)
    nice = NICE()
    Xa, Pa = kalman.anomalies(X.reshape(9, -1)), kalman.anomalies(psi)
    localisation.localised_apply(Xa, Pa, torch.zeros(9, 36, dtype=torch.float64), nice)
    g, a = nice.choice
    assert g >= 2 and (g, a) != (2, 0.0)  # spurious correlations of 9 members get shrunk


# --- the job-file side -------------------------------------------------------------------------------------------

def _one_line(overrides, job="builtin:linear_gaussian_64"):
    from enkg_dist import config as cfgmod
    from enkg_dist import runner

    with pytest.raises(cfgmod.ConfigError) as e:
        runner.build(cfgmod.load_config(job, overrides))
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("overrides, message", [
    (["enkg.localisation={kind: gaspari_cohn, radius: -2}"],
     "enkg.localisation.radius: Input should be greater than 0"),
    (["enkg.localisation={kind: gaspari_cohn}"], "enkg.localisation: kind gaspari_cohn needs"),
    (["enkg.localisation.kind=taper"], "enkg.localisation.kind: Input should be 'none', 'gaspari_cohn'"),
    (["enkg.inflation=rtps", "enkg.inflation_factor=1.5"], "rtps relaxes by alpha in [0, 1]"),
    (["method=eki", "eki.tikhonov=true", "eki.localisation.kind=sec"], "localisation is not available with tikhonov"),
])
def test_bad_localisation_settings_get_one_line_naming_the_key(overrides, message):
    assert message in _one_line(overrides)


def test_distance_localisation_without_a_geometry_names_the_way_out(tmp_path):
    """An external program declares no geometry unless given problem.coordinates; NICE needs none."""
    import numpy as np

    from enkg_dist import config as cfgmod
    from enkg_dist import runner

    y = tmp_path / "y.npy"
    np.save(y, np.zeros(16))
    base = ["problem={kind: external, command: ['{python}', '-m', 'enkg_dist.problems.example_program', "
            "'{input}', '{output}'], n: 8, obs_size: 16, observation: " + str(y) + "}", "prior={kind: gaussian}"]
    msg = _one_line(base + ["enkg.localisation={kind: gaspari_cohn, radius: 2}"], job=None)
    assert msg.startswith("config error: enkg.localisation.kind: gaspari_cohn needs a geometry") and "nice" in msg
    built = runner.build(cfgmod.load_config(None, base + ["enkg.localisation={kind: nice}"]))
    assert isinstance(built.localiser, NICE)
    coords = tmp_path / "xy.npy"
    np.save(coords, np.stack(np.meshgrid(np.arange(0, 8, 2), np.arange(0, 8, 2), indexing="ij"), -1).reshape(-1, 2))
    built = runner.build(cfgmod.load_config(None, base + [f"problem.coordinates={coords}",
                                                          "enkg.localisation={kind: gaspari_cohn, radius: 2}"]))
    assert isinstance(built.localiser, GaspariCohn) and built.localiser.geometry.obs.shape == (16, 2)
    np.save(coords, np.zeros((15, 2)))
    assert "problem.coordinates" in _one_line(base + [f"problem.coordinates={coords}"], job=None)
