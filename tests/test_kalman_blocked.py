"""The unlocalised Kalman updates in blocks (past kalman.BLOCK_BYTES) against the one-block form (issue 17)."""

import pytest
import torch

from enkg_dist import kalman
from enkg_dist.noise import NoiseCovariance


def ensemble(J, d, m, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(J, d, generator=g, dtype=dtype)
    psi = torch.randn(J, m, generator=g, dtype=dtype) + x[:, :m] ** 2
    y = torch.randn(m, generator=g, dtype=dtype)
    return x, psi, y


def gamma(kind, m):
    if kind == "scalar":
        return NoiseCovariance.scalar(0.3, m)
    B = torch.randn(m, m, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return NoiseCovariance.full(B @ B.T + 0.5 * torch.eye(m, dtype=torch.float64))


TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-5)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rule", ["frobenius", "trace"])
@pytest.mark.parametrize("J,m", [(24, 40), (40, 9)])  # J <= m: J x J Gram; J > m: the m x m Gram when blocked
def test_blocked_enkg_update_equals_one_block(dtype, rule, J, m):
    x, psi, y = ensemble(J, 3 * 37, m, dtype)  # 111 state columns: blocks of 1..5 columns, a ragged last one
    G = gamma("full" if dtype == torch.float64 else "scalar", m)
    ref, info = kalman.enkg_update(x, psi, y, G, 1.3, rule, guard=None)
    for block_bytes in (1, 3 * J * x.element_size(), 5 * J * x.element_size()):
        got, binfo = kalman.enkg_update(x, psi, y, G, 1.3, rule, guard=None, block_bytes=block_bytes)
        assert got.dtype == dtype and got.shape == x.shape
        torch.testing.assert_close(got, ref, **TOL[dtype])
        assert binfo.weight == pytest.approx(info.weight, rel=1e-5)
        assert binfo.trace_Cpp == pytest.approx(info.trace_Cpp, rel=1e-5)
        assert binfo.norm_Cpp == pytest.approx(info.norm_Cpp, rel=1e-5)
        assert binfo.norm_A == info.norm_A and binfo.misfit == info.misfit


def test_blocked_update_with_failed_members_and_eki(monkeypatch):
    x, psi, y = ensemble(30, 50, 12, torch.float64)
    ok = torch.ones(30, dtype=torch.bool)
    ok[[2, 7]] = False
    G = gamma("scalar", 12)
    ref, _ = kalman.enkg_update(x, psi, y, G, 2.0, ok=ok)
    got, _ = kalman.enkg_update(x, psi, y, G, 2.0, ok=ok, block_bytes=1)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[~ok], x[~ok])
    coef = torch.randn(30, 30, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(kalman.apply_to_anomalies(x, coef, 0.7, block_bytes=8 * 30 * 7),
                               kalman.apply_to_anomalies(x, coef, 0.7), rtol=1e-12, atol=1e-12)
    eta = torch.randn(30, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref, _ = kalman.eki_update(x, psi, y, G, dt=0.5, perturbation=eta, ok=ok)
    monkeypatch.setattr(kalman, "BLOCK_BYTES", 8 * 30 * 4)  # EKI takes the module's block size
    got, _ = kalman.eki_update(x, psi, y, G, dt=0.5, perturbation=eta, ok=ok)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_block_is_bit_identical_to_the_dense_j_by_j_form(dtype):
    """Below BLOCK_BYTES the update is exactly the former expression X - w (R P^T / J) (X - mean X)."""
    x, psi, y = ensemble(64, 256, 48, dtype)
    G = gamma("scalar", 48)
    got, info = kalman.enkg_update(x, psi, y, G, 2.0)
    R, P = G.whiten(psi - y), G.whiten(kalman.anomalies(psi))
    A = (R @ P.T) / 64
    S = (P @ P.T) / 64
    assert info.norm_A == float(torch.linalg.matrix_norm(A))
    assert info.trace_Cpp == float(torch.diagonal(S).sum()) and info.norm_Cpp == float(torch.linalg.matrix_norm(S))
    assert torch.equal(got, x - info.weight * (A @ kalman.anomalies(x)))
