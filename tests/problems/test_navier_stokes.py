"""The batched 2D Navier–Stokes solver (exact solutions, orders of accuracy, invariants, per-member stepping and
failures) and the NS inverse problem built on it. Small grids, float64 where accuracy is checked."""

import math

import pytest
import torch

from enkg_dist.problems.navier_stokes import (
    NavierStokes2D,
    NavierStokesForward,
    grf_vorticity,
    grid,
    heun_cn_step,
    make_problem,
    metrics,
    solve,
)
from enkg_dist.problems.navier_stokes import fused, solver as solver_mod
from enkg_dist.problems.navier_stokes.solver import batch_invariant, default_chunk, resolve_chunk, whole_step_in_c


@pytest.fixture(autouse=True)
def one_thread():
    """These grids are too small to share between threads: on a busy machine two threads mostly wait on each other
    (measured: 0.2 ms per tendency at 32^2 on one thread, 20 ms on two under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def smooth_field(n, amplitude=1.0):
    """A band-limited field (|k| <= sqrt(13)) with mean zero and no symmetry that would make u . grad w vanish."""
    x, y = grid(n)
    w = 3 * torch.sin(x) * torch.cos(2 * y) + 2 * torch.cos(3 * x + y) + 1.5 * torch.sin(2 * x - 3 * y + 0.3)
    return amplitude * w[None]


def spectral_upsample(w, m):
    """Trigonometric interpolation of an n x n field onto an m x m grid (Nyquist modes dropped)."""
    n, h = w.shape[-1], w.shape[-1] // 2
    wh = torch.fft.rfft2(w) * (m / n) ** 2
    up = torch.zeros(*w.shape[:-2], m, m // 2 + 1, dtype=wh.dtype)
    up[..., :h, :h] = wh[..., :h, :h]
    up[..., m - h + 1 :, :h] = wh[..., n - h + 1 :, :h]
    return torch.fft.irfft2(up, s=(m, m))


def rel(a, b):
    return float((a - b).norm() / b.norm())


def ensemble(n=32, amplitudes=(0.5, 1.0, 2.0)):
    return torch.cat([a * grf_vorticity(n, seed) for seed, a in enumerate(amplitudes)])


# --- exact solution and orders of accuracy -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_taylor_green_decays_exactly(dtype, tol):
    # w = 2 cos x cos y has u . grad w = 0, so w(t) = w(0) exp(-2 nu t). The nonlinear term is zero to round-off and
    # CN's amplification (1 - a/2)/(1 + a/2), a = 2 nu dt, differs from exp(-a) by a^3/12 per step: over T = 1 with
    # dt ~ 0.016 that is a relative error 2 nu T (2 nu dt)^2 / 12 ~ 2e-11, plus round-off (~1e-7 in float32).
    eq = NavierStokes2D(32, forcing_amplitude=0.0)
    x, y = grid(32, dtype)
    w0 = (2 * torch.cos(x) * torch.cos(y))[None]
    res = solve(w0, 1.0, equation=eq)
    assert res.ok.all() and res.omega.dtype == dtype
    assert rel(res.omega, w0 * math.exp(-2 * eq.nu * 1.0)) < tol


def test_second_order_in_time_with_forcing():
    # fixed steps T/n, n = 25..200: the differences of successive halvings shrink by 2^p, p the observed order
    w0 = smooth_field(32)
    sols = [solve(w0, 0.5, mode="fixed", dt=dt).omega for dt in (0.02, 0.01, 0.005, 0.0025)]
    diffs = [float((a - b).norm()) for a, b in zip(sols, sols[1:])]
    orders = [math.log2(d0 / d1) for d0, d1 in zip(diffs, diffs[1:])]
    assert all(1.8 <= p <= 2.2 for p in orders), orders


def test_spectral_convergence_in_space():
    # the same fixed dt on every grid, so the error against a 96^2 reference is the spatial one; with the 2/3 rule the
    # resolved band grows by 2 modes per +6 points and the error falls geometrically: the local algebraic order
    # log(e_i/e_i+1)/log(N_i+1/N_i) keeps growing (~6 -> ~12 here), where a p-th order method would keep it at p.
    eq = lambda n: NavierStokes2D(n, forcing_amplitude=0.0)  # noqa: E731
    T, dt, ns = 0.5, 0.01, (12, 18, 24, 30, 36, 48)
    ref = solve(smooth_field(96, 0.3), T, mode="fixed", dt=dt, equation=eq(96)).omega
    errs = [rel(spectral_upsample(solve(smooth_field(n, 0.3), T, mode="fixed", dt=dt, equation=eq(n)).omega, 96), ref)
            for n in ns]
    orders = [math.log(e0 / e1) / math.log(n1 / n0) for e0, e1, n0, n1 in zip(errs, errs[1:], ns, ns[1:])]
    assert all(e0 / e1 > 4 for e0, e1 in zip(errs, errs[1:])), errs
    assert orders[-1] > orders[0] + 4 and orders[-1] > 10, orders
    assert errs[-1] < 1e-5, errs


# --- invariants ----------------------------------------------------------------------------------------------------

def test_mean_vorticity_stays_zero_with_forcing():
    w0 = ensemble(32)
    res = solve(w0, 0.25)
    assert res.ok.all()
    assert float(w0.mean(dim=(-2, -1)).abs().max()) < 1e-14
    assert float(res.omega.mean(dim=(-2, -1)).abs().max()) < 1e-13 * float(res.omega.abs().max())


def test_energy_decays_without_forcing():
    eq = NavierStokes2D(32, forcing_amplitude=0.0)
    w = torch.cat([smooth_field(32, 0.5), ensemble(32, (1.0,))])
    energies = [eq.energy(eq.fft(w))]
    for _ in range(5):
        w = solve(w, 0.2, equation=eq).omega
        energies.append(eq.energy(eq.fft(w)))
    E = torch.stack(energies)  # (checkpoints, members)
    assert bool((E[1:] < E[:-1]).all()), E


# --- per-member stepping and failures ------------------------------------------------------------------------------

def test_per_member_equals_solo_and_saves_steps():
    w0 = ensemble(32, (0.5, 1.0, 1.0, 4.0))  # the last member is rough: fast flow, small CFL steps
    res = solve(w0, 0.25)
    assert res.ok.all()
    for b in range(w0.shape[0]):
        solo = solve(w0[b : b + 1], 0.25)
        assert int(solo.steps[0]) == int(res.steps[b])
        assert float((solo.omega[0] - res.omega[b]).abs().max()) <= 1e-12 * float(solo.omega.abs().max())
    assert res.batch_steps == int(res.steps.max())
    paper = solve(w0, 0.25, mode="paper", equation=NavierStokes2D(32))  # the batch-minimum rule, same equation
    assert paper.ok.all() and bool((paper.steps == paper.batch_steps).all())
    assert res.member_steps < 0.6 * paper.member_steps, (res.steps, paper.batch_steps)


def previous_step(eq, w_hat, dt):
    """The step as it was before issue 18, kept as the reference: separate inverse FFTs for the tendency's fields and
    for the step rule's velocity, the Crank–Nicolson factors applied as (explicit + dt N) * implicit."""
    def tendency(w):
        spec = torch.stack([w * eq.mask, w * eq._to_u, w * eq._to_v])
        wm, u, v = torch.fft.irfft2(spec, s=(eq.n, eq.n))
        uw_hat, vw_hat = torch.fft.rfft2(torch.stack([u * wm, v * wm]))
        nonlin = uw_hat * eq._neg_dx + vw_hat * eq._neg_dy
        nonlin[..., 0, eq.forcing_wavenumber] += eq.f_mode if eq.forcing_amplitude else 0.0
        return nonlin

    psi = w_hat * eq.inv_lap
    u, v = torch.fft.irfft2(torch.stack([eq.ik2 * psi, -eq.ik1 * psi]), s=(eq.n, eq.n))
    speed = (u * u + v * v).amax(dim=(-2, -1)).sqrt()
    d = dt.reshape(-1, 1, 1).to(eq.dtype)
    half_dl = 0.5 * d * (-eq.nu * eq.k2_abs)
    explicit, implicit = w_hat * (1 + half_dl), 1 / (1 - half_dl)
    n1 = tendency(w_hat)
    n2 = tendency((explicit + d * n1) * implicit)
    return (explicit + (0.5 * d) * (n1 + n2)) * implicit, n1, speed


@pytest.mark.parametrize("dealias", ["disc", "two_thirds"])
@pytest.mark.parametrize("n", [16, 33, 64])
def test_fast_step_equals_the_previous_step(dealias, n):
    # white-noise fields (every mode, the Nyquist ones and those outside the mask too) of std 5, float64
    g = torch.Generator().manual_seed(n)
    eq = NavierStokes2D(n, dealias=dealias)
    w_hat = eq.fft(5 * torch.randn(4, n, n, dtype=torch.float64, generator=g))
    dt = torch.tensor([1e-3, 4e-3, 1e-2, 2e-2], dtype=torch.float64)
    ref, ref_n1, ref_speed = previous_step(eq, w_hat, dt)
    n1, s2 = eq.tendency_and_max_speed2(w_hat)
    assert rel(n1, ref_n1) < 1e-14 and rel(s2.sqrt(), ref_speed) < 1e-14
    assert rel(eq.tendency(w_hat), ref_n1) < 1e-14
    for out in (heun_cn_step(eq, w_hat, dt, n1), heun_cn_step(eq, w_hat, dt)):
        assert out.shape == ref.shape and rel(out, ref) < 1e-14, rel(out, ref)


def test_chunk_one_bits_depend_on_the_member_only():
    # chunk=1: a member's bits do not depend on its batch-mates nor on the thread count (lanes run single-threaded)
    w0 = ensemble(32, (0.5, 1.0, 2.0, 1.5, 0.7))
    eq = NavierStokes2D(32, dealias="disc")
    one = solve(w0, 0.1, equation=eq, chunk=1, threads=1)
    torch.set_num_threads(2)
    try:
        two = solve(w0, 0.1, equation=eq, chunk=1)
        paper = [solve(w0[i], 0.1, mode="paper", equation=eq, chunk=1) for i in ([0, 1, 2, 3, 4], [4, 2, 0])]
    finally:
        torch.set_num_threads(1)
    assert torch.equal(one.omega, two.omega) and torch.equal(one.steps, two.steps)
    for b in (0, 3):
        alone = solve(w0[b : b + 1], 0.1, equation=eq, chunk=1)
        assert torch.equal(alone.omega[0], one.omega[b]) and int(alone.steps[0]) == int(one.steps[b])
    assert paper[0].ok.all() and paper[1].ok.all()
    paper1 = solve(w0[[4, 2, 0]], 0.1, mode="paper", equation=eq, chunk=1, threads=1)
    assert torch.equal(paper[1].omega, paper1.omega)


def test_default_lanes_fit_the_cache():
    assert default_chunk(128, torch.float32) == 4 and default_chunk(512, torch.float64) == 1
    assert default_chunk(16, torch.float64) == 64
    assert default_chunk(32, torch.float32) == 2 * default_chunk(32, torch.float64)


def test_lanes_of_the_whole_step_in_c_are_the_threads_shares_of_the_batch():
    eq = NavierStokes2D(32, dealias="disc")
    lanes = lambda batch, threads: resolve_chunk(None, eq, "per_member", None, batch, threads, True)  # noqa: E731
    assert lanes(16, 1) == 16 and lanes(16, 2) == 8 and lanes(17, 2) == 9 and lanes(3, 4) == 1
    assert lanes(200, 2) == lanes(200, 1) == default_chunk(32, eq.dtype, True) == default_chunk(32, eq.dtype)
    assert default_chunk(128, torch.float32, True) == 16 and default_chunk(64, torch.float32, True) == 32
    assert default_chunk(32, torch.float32, True) == 64  # MAX_CHUNK by the first rule already
    assert resolve_chunk(5, eq, "per_member", None, 16, 2, True) == 5  # a given chunk is kept
    # "auto" checks every lane size up to the default once, then takes the threads' shares
    k = resolve_chunk("auto", eq, "per_member", None, 16, 2, True)
    assert k == (8 if batch_invariant(eq, default_chunk(32, eq.dtype, True)) else 1)
    assert whole_step_in_c(eq) == (fused.usable(32, eq.dtype, eq.device) and fused.mkl_bound())
    assert not whole_step_in_c(eq, tracked=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_auto_chunk_gives_the_bits_of_one_member_per_call(dtype):
    """chunk="auto": lanes as large as default_chunk where the start-up check finds them bit-identical to chunk=1
    here, else 1; either way each member's result is the one it gets alone (members of unequal speed, so the lanes
    shrink as they land)."""
    n = 32
    eq = NavierStokes2D(n, dealias="disc", dtype=dtype)
    w0 = ensemble(n, (0.5, 1.0, 2.0, 1.5, 0.7, 1.2, 0.9)).to(dtype)
    k = resolve_chunk("auto", eq, "per_member", None, w0.shape[0])
    assert k == (default_chunk(n, dtype) if batch_invariant(eq, default_chunk(n, dtype)) else 1)
    auto, one = solve(w0, 0.1, equation=eq, chunk="auto"), solve(w0, 0.1, equation=eq, chunk=1)
    assert torch.equal(auto.omega, one.omega) and torch.equal(auto.steps, one.steps)
    for b in (0, 4):
        alone = solve(w0[b : b + 1], 0.1, equation=eq, chunk="auto")
        assert torch.equal(alone.omega[0], one.omega[b])
    assert resolve_chunk("auto", eq, "paper", None, 7) == 1  # paper mode couples the batch: not checked
    assert resolve_chunk(3, eq, "per_member", None, 7) == 3 and resolve_chunk(None, eq, "paper", None, 7) == \
        default_chunk(n, dtype)
    with pytest.raises(ValueError, match="chunk must be a positive integer, None or 'auto'"):
        solve(w0, 0.1, equation=eq, chunk="fast")


def test_auto_chunk_falls_back_to_one_where_batches_change_bits(monkeypatch):
    """Where the check finds a batched result differing from the single one (measured on AVX-512 CPUs), "auto" runs
    one member per call. The check's verdict is replaced here (this machine batches bit-identically); its comparison
    is exercised by the test above."""
    eq = NavierStokes2D(32, dealias="disc")
    monkeypatch.setattr(solver_mod, "_same_bits_batched", lambda *a: False)
    monkeypatch.setattr(solver_mod, "_CHECKED", {})
    assert resolve_chunk("auto", eq, "per_member", None, 7) == 1
    assert not batch_invariant(eq, 4) and batch_invariant(eq, 1)


def test_chunking_changes_nothing():
    w0 = ensemble(32, (0.5, 1.0, 2.0, 1.5, 0.7))
    whole, chunked = solve(w0, 0.05, chunk=64), solve(w0, 0.05, chunk=2)
    assert torch.equal(whole.steps, chunked.steps)
    assert float((whole.omega - chunked.omega).abs().max()) <= 1e-12 * float(whole.omega.abs().max())


def test_step_rule_time_error():
    # against a 10x finer fixed step: the CFL rule (h = 1/N, cfl = 0.5) leaves a relative time error ~1e-3 on GRF
    # draws of std ~5 at 32^2 (the grid-scale modes advected at spectral CFL ~1/6), ~1e-2 on a draw of std ~20
    w0 = ensemble(32, (0.5, 1.0, 4.0))
    ref = solve(w0, 0.25, mode="fixed", dt=2.5e-4).omega
    res = solve(w0, 0.25)
    errs = [rel(res.omega[b], ref[b]) for b in range(3)]
    assert errs[0] < 3e-3 and errs[1] < 5e-3 and errs[2] < 3e-2, errs


def test_paper_mode_uses_the_disc_and_batch_steps():
    w0 = ensemble(32, (1.0, 2.0))
    res = solve(w0, 0.25, mode="paper")
    assert res.ok.all() and res.steps.tolist() == [res.batch_steps] * 2
    assert torch.allclose(res.t, torch.full((2,), 0.25, dtype=torch.float64), rtol=0, atol=0)


def test_fixed_mode_lands_on_T():
    res = solve(smooth_field(16, 0.1), 0.3, mode="fixed", dt=0.1)
    assert res.steps.tolist() == [3] and float(res.t[0]) == 0.3
    res = solve(smooth_field(16, 0.1), 0.25, mode="fixed", dt=0.1)
    assert res.steps.tolist() == [3] and float(res.t[0]) == 0.25


def test_failed_members_are_reported_and_others_finish():
    w0 = ensemble(32, (1.0, 1.0, 2.0))
    w0[1, 3, 5] = float("inf")
    w0 = torch.cat([w0, 1e3 * w0[:1]])  # |u| ~ 1e3 x: needs ~1e3 x the steps, beyond the budget
    res = solve(w0, 0.25, max_steps=400)
    assert res.ok.tolist() == [True, False, True, False]
    assert "non-finite initial" in res.reasons[1] and "budget" in res.reasons[3]
    assert int(res.steps[3]) == 400 and float(res.t[3]) < 0.25
    assert bool(torch.isnan(res.omega[[1, 3]]).all())
    for b in (0, 2):
        solo = solve(w0[b : b + 1], 0.25)
        assert float((solo.omega[0] - res.omega[b]).abs().max()) <= 1e-12 * float(solo.omega.abs().max())


def test_blow_up_is_caught():
    # far beyond the CFL limit Heun amplifies the highest modes each step until the field overflows
    w0 = torch.cat([smooth_field(32, 0.5), smooth_field(32, 1e3)])
    res = solve(w0, 2.0, mode="fixed", dt=0.05, max_steps=10_000)
    assert res.ok.tolist() == [True, False]
    assert "non-finite vorticity" in res.reasons[1]
    assert int(res.steps[1]) < 40 and int(res.steps[0]) == 40


def test_bad_arguments():
    with pytest.raises(ValueError):
        solve(smooth_field(16), 1.0, mode="fixed")
    with pytest.raises(ValueError):
        solve(smooth_field(16), 1.0, mode="sometimes")
    with pytest.raises(ValueError):
        NavierStokes2D(16, dealias="circle")


# --- the forward model and the inverse problem ---------------------------------------------------------------------

def test_forward_shapes_scaling_and_row_independence():
    G = NavierStokesForward(n=32, k=2, T=0.25)
    x = ensemble(32, (1.0, 2.0, 0.5))[:, None] / 10
    out = G(x, members=[7, 8, 9])
    assert out.psi.shape == (3, 256) and G.obs_size == 256 and G.state_shape == (1, 32, 32)
    assert out.ok.all() and out.reasons == [None] * 3
    ref = solve(10 * x[:, 0], 0.25, equation=G.equation, chunk=1).omega[:, ::2, ::2].reshape(3, -1)
    assert torch.equal(out.psi, ref)  # chunk 1 both: batched FFTs differ at round-off on AVX-512 CPUs
    one = G(x[1:2], members=[8])
    assert float((one.psi[0] - out.psi[1]).abs().max()) <= 1e-12 * float(out.psi.abs().max())
    with pytest.raises(ValueError, match="state shape mismatch"):
        G(torch.zeros(2, 1, 16, 16))


def test_forward_reports_failed_members():
    G = NavierStokesForward(n=32, k=4, T=0.1)
    x = torch.zeros(2, 1, 32, 32)  # float32 in, float32 out
    x[1, 0, 0, 0] = float("nan")
    out = G(x)
    assert out.psi.dtype == torch.float32 and out.psi.shape == (2, 64)
    assert out.ok.tolist() == [True, False] and out.reasons[0] is None and "non-finite" in out.reasons[1]


def test_make_problem_noise_and_metric():
    p = make_problem(n=32, k=2, noise_std=1.0, T=0.25, truth=3, seed=5, spinup=0.5)
    assert p.x_true.shape == (1, 32, 32) and p.y.shape == (256,)
    clean = p.forward(p.x_true[None]).psi[0]
    resid = p.y - clean
    assert 0.8 < float(resid.std()) < 1.2 and float(p.Gamma.value) == 1.0
    # x = w/10: the truth's vorticity has std of a few units
    assert 0.1 < float(p.x_true.std()) < 1.0
    quiet = make_problem(n=32, k=2, noise_std=0.0, T=0.25, truth=10 * p.x_true[0], seed=5)
    assert torch.equal(quiet.y, clean) and quiet.extras["gamma_std"] == 1e-3
    m = metrics(torch.stack([p.x_true, 1.1 * p.x_true]), p)
    assert m["rel_l2_particles"] == pytest.approx(0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
def test_cuda_matches_cpu(dtype, tol):
    w0 = ensemble(64, (0.5, 1.0, 2.0)).to(dtype)
    cpu = solve(w0, 0.25)
    gpu = solve(w0.cuda(), 0.25)
    assert gpu.ok.all() and gpu.omega.device.type == "cuda"
    assert rel(gpu.omega.cpu(), cpu.omega) < tol
