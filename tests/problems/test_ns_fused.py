"""The fused lane step (problems/navier_stokes/fused.py): the scripted kernel's bits, its non-finite flags, the build
cache and the fallback where no library can be built."""

import math
import subprocess
import sys
import warnings

import pytest
import torch

from enkg_dist.problems.navier_stokes import NavierStokes2D, grf_vorticity, solve
from enkg_dist.problems.navier_stokes import fused, kernels
from enkg_dist.problems.navier_stokes.equation import k1_contiguous


@pytest.fixture(scope="module")
def lib():
    if fused.library() is None:
        pytest.skip("no C compiler here: the solver runs the scripted kernel (test_no_compiler_falls_back)")
    return fused.library()


def _lane(n, dtype, dealias, adaptive, B=3):
    eq = NavierStokes2D(n, dealias=dealias, dtype=dtype)
    consts = eq.kernel_constants(adaptive)
    w_hat = kernels.rfft2_k1(torch.cat([grf_vorticity(n, s) for s in range(B)]).to(dtype) * 3)
    n1 = kernels.look(w_hat, consts[1], *consts[2:])[0]  # a strided view, as the lane's first look leaves it
    return eq, consts, w_hat, n1


@pytest.mark.parametrize("n, dtype", [(16, torch.float64), (32, torch.float32), (64, torch.float64),
                                      (128, torch.float32)])
@pytest.mark.parametrize("dealias", ["disc", "two_thirds"])
@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("per_member", [False, True])
def test_the_fused_step_has_the_scripted_kernels_bits(lib, n, dtype, dealias, adaptive, per_member):
    eq, consts, w_hat, n1 = _lane(n, dtype, dealias, adaptive)
    dts = torch.tensor([2e-3, 3e-3, 1e-3], dtype=dtype)[:, None, None] if per_member else None
    e, g = kernels.cn_factors(eq.half_viscous_c, 2e-3, dts)
    want = kernels.scripted(kernels.lane_step)(w_hat, n1.clone(), e, g, *consts)
    got = fused.lane_step(w_hat, n1, e, g, *consts)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert (got[2] is None) == (want[2] is None) == (not adaptive)
    assert got[2] is None or torch.equal(got[2], want[2])
    assert got[3].tolist() == [0.0] * 3  # every member finite
    # two steps on: the fused step's own outputs (n1 contiguous now) as its next inputs
    a, b = got[:2], want[:2]
    for _ in range(2):
        a = fused.lane_step(a[0], a[1], e, g, *consts)[:2]
        b = kernels.scripted(kernels.lane_step)(b[0], b[1].clone(), e, g, *consts)[:2]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_a_member_that_is_not_finite_is_flagged_alone(lib):
    eq, consts, w_hat, n1 = _lane(32, torch.float32, "disc", True)
    w_hat = k1_contiguous(w_hat.clone())
    w_hat[1, 3, 2] = complex(float("inf"), 0.0)
    e, g = kernels.cn_factors(eq.half_viscous_c, 1e-3, None)
    w, _, speed, flags = fused.lane_step(w_hat, n1, e, g, *consts)
    assert flags[0] == 0 and flags[2] == 0 and math.isnan(flags[1])
    assert math.isfinite(speed[0]) and math.isfinite(speed[2]) and not math.isfinite(speed[1])
    assert not torch.isfinite(torch.view_as_real(w[1])).all()


@pytest.fixture
def without_mkl(monkeypatch):
    """Call it to run the fused step with torch's transforms between its C passes (mkl_bound() False)."""
    def off():
        monkeypatch.setenv("ENKG_NS_FUSED_MKL", "0")
        fused.mkl_bound.cache_clear()
    yield off
    fused.mkl_bound.cache_clear()


@pytest.mark.parametrize("mode", ["paper", "per_member", "fixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_solves_give_the_same_bits_fused_or_not(lib, monkeypatch, without_mkl, mode, dtype, threads):
    omega0 = torch.cat([grf_vorticity(64, s) for s in range(5)]).to(dtype)
    kw = dict(mode=mode, dt=2e-3 if mode == "fixed" else None, chunk=2, threads=threads)
    runs = [solve(omega0, 0.05, **kw)]  # the whole step in C where MKL is bound
    without_mkl()
    runs.append(solve(omega0, 0.05, **kw))  # torch's transforms between the C passes (one thread; else scripted)
    monkeypatch.setenv("ENKG_NS_FUSED", "0")
    runs.append(solve(omega0, 0.05, **kw))  # the scripted kernel
    for run in runs[1:]:
        assert torch.equal(runs[0].omega, run.omega) and torch.equal(runs[0].steps, run.steps)
    assert bool(runs[0].ok.all())


def test_the_whole_step_in_c_binds_torchs_mkl_here(lib):
    # x86 builds of torch carry MKL: where this fails, the solver runs the slower split step (same bits)
    if not torch.backends.mkl.is_available():
        pytest.skip("this torch has no MKL")
    assert fused.mkl_bound()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_c_step_factors_are_torchs_bytes(lib, dtype):
    # kernels.cn_factors' five complex passes against one C pass, for one dt and per-member dts, byte for byte
    hv = NavierStokes2D(64, dealias="two_thirds", dtype=dtype).half_viscous_c
    dts = torch.tensor([1e-3, 3.7e-4, 0.0123], dtype=dtype)[:, None, None]
    for dt, per in ((1e-3, None), (0.0123, None), (0.0, dts)):
        for ours, torchs in zip(fused.cn_factors(hv, dt, per), kernels.cn_factors(hv, dt, per)):
            assert ours.shape == torchs.shape and ours.stride() == torchs.stride()
            assert torch.equal(torch.view_as_real(ours).contiguous().view(torch.uint8),
                               torch.view_as_real(torchs).contiguous().view(torch.uint8))
    # an L/2 with imaginary parts (no equation makes one) goes to torch
    odd = hv + 1e-3j
    assert torch.equal(fused.cn_factors(odd, 1e-3, None)[0], kernels.cn_factors(odd, 1e-3, None)[0])


def test_transforms_mkl_cannot_plan_raise_one_clear_error(lib):
    # 3^2 over 4 ranks: the column plans are made, the row plans (no rows) are not, and are freed; 0^2: none is made
    if not fused.mkl_bound():
        pytest.skip("MKL is not bound here")
    for n, ranks in ((3, 4), (0, 1)):
        with pytest.raises(RuntimeError, match=f"MKL could not plan the {n}\\^2 slab transforms over {ranks} ranks"):
            fused.slab_plans(n, ranks)


def test_the_whole_step_gives_each_member_the_bits_it_gets_alone(lib):
    eq, consts, w_hat, n1 = _lane(64, torch.float32, "disc", True, B=4)
    dts = torch.tensor([2e-3, 3e-3, 1e-3, 2.5e-3])[:, None, None]
    e, g = kernels.cn_factors(eq.half_viscous_c, 0.0, dts)
    lane = fused.lane_step(w_hat, n1, e, g, *consts)
    for b in (0, 3):
        alone = fused.lane_step(w_hat[b : b + 1], n1[b : b + 1], e[b : b + 1], g[b : b + 1], *consts)
        assert all(torch.equal(x[b], y[0]) for x, y in zip(lane, alone))


def test_only_even_spectra_of_16_values_and_cpu_float_fields_take_it(lib, monkeypatch):
    cpu = torch.device("cpu")
    assert fused.usable(64, torch.float32, cpu) and fused.usable(128, torch.float64, cpu)
    assert not fused.usable(20, torch.float32, cpu)  # 20 x 11 = 220 complex values: torch's loops end in a tail
    assert not fused.usable(64, torch.float16, cpu) and not fused.usable(64, torch.float32, torch.device("meta"))
    monkeypatch.setenv("ENKG_NS_FUSED", "0")
    assert not fused.usable(64, torch.float32, cpu)


def test_the_library_is_built_once_per_cpu_and_compiler_and_reused(lib, monkeypatch, tmp_path):
    monkeypatch.setenv("ENKG_KERNEL_CACHE", str(tmp_path))
    first = fused._build()
    stamp = first.stat().st_mtime_ns
    assert first.parent == tmp_path and fused._build() == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary files left behind


def test_no_compiler_falls_back_to_the_scripted_kernel_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("ENKG_KERNEL_CACHE", str(tmp_path / "cache"))
    fused.library.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert fused.library() is None
            assert not fused.usable(64, torch.float32, torch.device("cpu"))
        assert any("scripted kernel" in str(w.message) for w in caught)
        omega0 = torch.cat([grf_vorticity(64, s) for s in range(2)])
        assert bool(solve(omega0, 0.01, threads=1).ok.all())  # the solver runs on
    finally:
        fused.library.cache_clear()


@pytest.mark.parametrize("n", [16, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_transforms_with_c_transposes_have_the_kernels_bits(lib, n, dtype):
    g = torch.Generator().manual_seed(n)
    cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128
    for B, K in [(1, 3), (3, 5), (2, 2)]:
        spec = torch.randn(B, K, n // 2 + 1, n, generator=g, dtype=cdtype).transpose(-1, -2)  # k1-contiguous
        assert torch.equal(fused._irfft2_k1(spec, n), kernels.irfft2_k1(spec, n, False))
        fields = torch.randn(B, K, n, n, generator=g, dtype=dtype)
        got, want = fused._rfft2_k1(fields), kernels.rfft2_k1(fields)
        assert torch.equal(got, want) and got.stride() == want.stride()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_transforms_floor_runs_the_steps_transforms(lib, dtype):
    if not fused.mkl_bound():
        pytest.skip("no MKL bound: the benchmark's floor runs torch's transforms")
    fused.transforms(32, dtype, 3, 5, 2)  # the benchmark's "fft floor": plans, scratch, 2 steps of 3 members
    fused.transforms(32, dtype, 1, 3, 1)


AUTOGRAD = """
import torch
from enkg_dist.problems.navier_stokes import grf_vorticity, solve
omega0 = torch.cat([grf_vorticity(32, s) for s in range(2)]).to(torch.float64)
kw = dict(mode="fixed", dt=2e-3)
loss = lambda w: solve(w, 0.02, **kw).omega.pow(2).sum()
x = omega0.clone().requires_grad_(True)
tracked = solve(x, 0.02, **kw)  # this process's first solve: tracked
(grad,) = torch.autograd.grad(tracked.omega.pow(2).sum(), x)
v = torch.randn(omega0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
with torch.no_grad():
    fd = (loss(omega0 + 1e-6 * v) - loss(omega0 - 1e-6 * v)) / 2e-6
assert torch.equal(tracked.omega.detach(), solve(omega0, 0.02, **kw).omega)
assert abs(float((grad * v).sum()) - float(fd)) <= 1e-6 * abs(float(fd)), (float((grad * v).sum()), float(fd))
"""


@pytest.mark.subprocess
def test_a_solve_under_autograd_runs_the_eager_kernel_and_its_gradient_is_right():
    # neither the C step (no backward) nor TorchScript's autodiff, which dropped the gradient of the CPU inverse FFT's
    # out= branch when a process's first scripted call was tracked: hence a fresh process, tracked first
    proc = subprocess.run([sys.executable, "-c", AUTOGRAD], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
