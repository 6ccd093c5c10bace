"""The EDM-preconditioned UNet: shapes, preconditioning limits, periodic-shift equivariance, batch independence."""

import copy

import pytest
import torch

from enkg_dist.priors.unet import EDMDenoiser, UNetConfig

TINY = dict(resolution=16, model_channels=8, channel_mult=(1, 2, 2), attn_resolutions=(8,))


def randomised(cfg: UNetConfig, dtype=torch.float32, seed: int = 0) -> EDMDenoiser:
    """A model with every weight perturbed (fresh models have zero-initialised residual branches: F = 0)."""
    torch.manual_seed(seed)
    model = EDMDenoiser(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model = model.to(dtype)
    return model.eval().requires_grad_(False)


def test_shapes_dtype_and_parameter_count():
    model = EDMDenoiser(UNetConfig(**TINY))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    x = torch.randn(3, 1, 16, 16)
    assert model(x, 0.7).shape == (3, 1, 16, 16)
    assert model(x, torch.tensor([0.1, 1.0, 10.0])).shape == (3, 1, 16, 16)
    two = EDMDenoiser(UNetConfig(**TINY, in_channels=2, out_channels=2))
    assert two(torch.randn(2, 2, 16, 16), 1.0).shape == (2, 2, 16, 16)
    shipped = EDMDenoiser(UNetConfig(resolution=32, model_channels=32, channel_mult=(1, 2, 2), num_blocks=1))
    assert 1_000_000 < sum(p.numel() for p in shipped.parameters()) < 2_000_000


def test_fresh_model_is_the_skip_path():
    """EDM's zero-initialised output layer: F = 0, so D(x; σ) = c_skip x = σ_d²/(σ² + σ_d²) x at initialisation."""
    model = EDMDenoiser(UNetConfig(**TINY, sigma_data=0.5)).eval()
    x = torch.randn(2, 1, 16, 16)
    for sigma in (0.01, 1.0, 50.0):
        torch.testing.assert_close(model(x, sigma), 0.25 / (sigma**2 + 0.25) * x)


def test_preconditioning_limits():
    """σ → 0: c_skip → 1, c_out → 0, so D ≈ x; σ large: c_skip → 0 and D ≈ c_out F(c_in x; ¼ ln σ)."""
    model = randomised(UNetConfig(**TINY), torch.float64)
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    d = model(x, 1e-7)
    assert float((d - x).abs().max()) < 1e-5
    sigma = torch.tensor(1e4, dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = model.coefficients(sigma)
    torch.testing.assert_close(c_out, torch.tensor(0.5, dtype=torch.float64), rtol=1e-8, atol=0)
    f = model.net(c_in * x, c_noise.reshape(1).expand(2))
    d = model(x, sigma)
    torch.testing.assert_close(d, c_out * f + c_skip * x, rtol=1e-12, atol=1e-12)
    assert float((d - c_out * f).abs().max()) < 1e-8 * float(x.abs().max()) + 1e-12
    assert float(f.abs().max()) > 0.1  # F is not trivially zero here


@pytest.mark.parametrize("units", [(1, 0), (0, 2), (3, 5), (-2, 1)])
def test_circular_padding_commutes_with_periodic_shifts(units):
    """With circular padding D(roll(x)) = roll(D(x)) for shifts by multiples of the down-sampling factor (4 here)."""
    cfg = UNetConfig(**TINY)
    model = randomised(cfg, torch.float64)
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    shift = tuple(cfg.downsampling * u for u in units)
    out = model(torch.roll(x, shift, dims=(-2, -1)), 0.8)
    torch.testing.assert_close(out, torch.roll(model(x, 0.8), shift, dims=(-2, -1)), rtol=0, atol=1e-12)


def test_equivariance_check_is_sensitive():
    """The same check fails for a shift that is not a multiple of the factor, and for zero padding."""
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    circ = randomised(UNetConfig(**TINY), torch.float64)
    off = circ(torch.roll(x, (1, 0), dims=(-2, -1)), 0.8) - torch.roll(circ(x, 0.8), (1, 0), dims=(-2, -1))
    zeros = randomised(UNetConfig(**TINY, padding="zeros"), torch.float64)
    pad = zeros(torch.roll(x, (4, 0), dims=(-2, -1)), 0.8) - torch.roll(zeros(x, 0.8), (4, 0), dims=(-2, -1))
    assert float(off.abs().max()) > 1e-3 and float(pad.abs().max()) > 1e-3


def test_batch_members_are_independent():
    """GroupNorm normalises per sample and attention mixes positions only: a member ignores the others (eval)."""
    model = randomised(UNetConfig(**TINY, dropout=0.1), torch.float64)
    x = torch.randn(4, 1, 16, 16, dtype=torch.float64)
    sigma = torch.tensor([0.05, 0.5, 2.0, 20.0], dtype=torch.float64)
    full = model(x, sigma)
    other = x.clone()
    other[1:] = torch.randn(3, 1, 16, 16, dtype=torch.float64) * 5
    torch.testing.assert_close(model(other, sigma)[0], full[0], rtol=0, atol=1e-12)
    for i in range(4):
        torch.testing.assert_close(model(x[i : i + 1], sigma[i]), full[i : i + 1], rtol=0, atol=1e-12)


def test_dropout_only_in_training_mode():
    model = randomised(UNetConfig(**TINY, dropout=0.5))
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(model(x, 1.0), model(x, 1.0))
    model.train()
    assert not torch.equal(model(x, 1.0), model(x, 1.0))


def test_float32_and_float64_agree():
    m32 = randomised(UNetConfig(**TINY))
    m64 = copy.deepcopy(m32).double()
    x = torch.randn(3, 1, 16, 16, dtype=torch.float64)
    d64 = m64(x, 0.3)
    assert float((m32(x.float(), 0.3).double() - d64).abs().max()) < 1e-4 * float(d64.abs().max())


def test_config_is_validated():
    with pytest.raises(ValueError, match="not divisible"):
        UNetConfig(resolution=18, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="Extra inputs"):
        UNetConfig(channels=3)
    with pytest.raises(ValueError, match="padding"):
        UNetConfig(padding="reflect")
