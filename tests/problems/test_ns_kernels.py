"""The Navier–Stokes solver's kernels: the TorchScript-compiled lane step gives the eager step's bits, the folded
normalisation and the padded transposing copy change nothing, and the switch that turns scripting off works."""

import pytest
import torch

from enkg_dist.problems.navier_stokes import NavierStokes2D, grf_vorticity, solve
from enkg_dist.problems.navier_stokes.equation import k1_contiguous
from enkg_dist.problems.navier_stokes.kernels import cn_factors, irfft2_k1, lane_step, rfft2_k1, scripted


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batch(n, dtype, B=4):
    w0 = torch.cat([grf_vorticity(n, seed) for seed in range(B)]).to(dtype)
    w0[1] *= 6  # a faster member: per-member steps differ
    return w0


@pytest.mark.parametrize("n, dtype", [(32, torch.float64), (48, torch.float32), (64, torch.float32)])
@pytest.mark.parametrize("mode", ["per_member", "paper", "fixed"])
def test_scripted_solve_equals_eager_bit_for_bit(monkeypatch, n, dtype, mode):
    w0 = batch(n, dtype)
    kw = dict(mode=mode, dt=2e-3 if mode == "fixed" else None, chunk=2, threads=2)
    monkeypatch.setenv("ENKG_NS_FUSED", "0")  # the kernels themselves, not the fused step (test_ns_fused.py)
    monkeypatch.setenv("ENKG_NS_SCRIPT", "1")
    fast = solve(w0, 0.1, **kw)
    monkeypatch.setenv("ENKG_NS_SCRIPT", "0")
    eager = solve(w0, 0.1, **kw)
    assert torch.equal(fast.omega, eager.omega) and torch.equal(fast.steps, eager.steps)
    assert bool(fast.ok.all()) and int(fast.steps.min()) > 5


def test_scripted_lane_step_equals_eager_on_white_noise():
    # every mode excited (Nyquist and outside the mask too), per-member steps, float64
    n = 32
    eq = NavierStokes2D(n, dealias="two_thirds")
    g = torch.Generator().manual_seed(3)
    w_hat = eq.fft(5 * torch.randn(3, n, n, dtype=torch.float64, generator=g), k1_contiguous=True)
    n1 = eq.tendency(w_hat)
    dts = torch.tensor([1e-3, 4e-3, 1e-2], dtype=torch.float64)[:, None, None]
    args = (*cn_factors(eq.half_viscous_c, 0.0, dts), *eq.kernel_constants())
    eager = lane_step(w_hat, n1.clone(), *args)
    fast = scripted(lane_step)(w_hat, n1.clone(), *args)
    assert isinstance(scripted(lane_step), torch.jit.ScriptFunction)
    for a, b in zip(eager, fast):
        assert torch.equal(a, b)


def test_scripting_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("ENKG_NS_SCRIPT", "0")
    assert scripted(lane_step) is lane_step


@pytest.mark.parametrize("n", [16, 24, 128])
def test_unscaled_inverse_with_folded_scale(n):
    # the 1/n^2 folded into the spectrum gives irfft2's bits for powers of two, and its values to round-off always;
    # the padded transposing copy (CPU) gives the plain transform's bits
    g = torch.Generator().manual_seed(n)
    w = torch.randn(2, 3, n, n, generator=g)
    w_hat = rfft2_k1(w)
    assert w_hat.transpose(-1, -2).is_contiguous() and torch.allclose(w_hat, torch.fft.rfft2(w), atol=1e-4)
    ref = torch.fft.irfft2(k1_contiguous(w_hat).contiguous(), s=(n, n))
    plain = irfft2_k1(w_hat, n)
    folded = irfft2_k1(w_hat * (1.0 / (n * n)), n, False)
    assert torch.allclose(plain, w, atol=1e-5) and torch.allclose(plain, ref, atol=1e-6)
    if n & (n - 1) == 0:
        assert torch.equal(folded, plain)
    else:
        assert torch.allclose(folded, plain, rtol=0, atol=1e-6)


def _not_scriptable(x):
    return {"a": x, 1: x}  # keys of two types: TorchScript cannot type this dict


def test_a_function_torchscript_cannot_compile_runs_eager_with_a_warning(monkeypatch):
    monkeypatch.setenv("ENKG_NS_SCRIPT", "1")
    with pytest.warns(RuntimeWarning, match="TorchScript could not compile _not_scriptable"):
        assert scripted(_not_scriptable) is _not_scriptable


def test_lanes_share_the_steps_factors():
    # paper and fixed modes: one cn_factors per step for every lane, the bits of each lane's own
    from enkg_dist.problems.navier_stokes.solver import _StepFactors

    half_viscous_c = NavierStokes2D(32).half_viscous_c
    factors = _StepFactors(half_viscous_c, scripted(cn_factors))
    e, g = factors(1e-3, None)
    assert factors(1e-3, None)[0] is e and factors(1e-3, None)[1] is g
    for dt, dts in ((2e-3, None), (0.0, torch.tensor([1e-3, 3e-3], dtype=torch.float64)[:, None, None])):
        got, want = factors(dt, dts), cn_factors(half_viscous_c, dt, dts)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not torch.equal(factors(2e-3, None)[0], e)
