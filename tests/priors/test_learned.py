"""LearnedPrior: the sampler's denoise interface around a trained EDM UNet, and loading it from a checkpoint."""

import pickle

import pytest
import torch

from enkg_dist import sampler
from enkg_dist.priors.checkpoint import CheckpointError, save_checkpoint
from enkg_dist.priors.learned import LearnedPrior
from enkg_dist.priors.unet import EDMDenoiser, UNetConfig

CFG = UNetConfig(resolution=16, model_channels=8, channel_mult=(1, 2), attn_resolutions=(8,))


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = EDMDenoiser(CFG)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m.eval()


@pytest.fixture
def x():
    return torch.randn(5, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def test_denoise_keeps_the_callers_dtype_and_matches_the_model(model, x):
    prior = LearnedPrior(model, device="cpu")
    assert prior.state_shape == (1, 16, 16) and prior.n == 16
    d64 = prior.denoise(x, 0.5)
    assert d64.dtype == torch.float64 and d64.shape == x.shape
    with torch.no_grad():
        ref = model(x.float(), 0.5)
    assert torch.equal(d64, ref.double())
    assert torch.equal(prior.denoise(x.float(), 0.5), ref)  # float32 input: the same numbers, in float32


def test_chunks_and_per_member_sigma(model, x):
    whole = LearnedPrior(model, device="cpu").denoise(x, 0.3)
    torch.testing.assert_close(LearnedPrior(model, device="cpu", max_batch=2).denoise(x, 0.3), whole,
                               rtol=0, atol=1e-6)
    sig = torch.tensor([0.1, 0.3, 1.0, 3.0, 10.0])
    per = LearnedPrior(model, device="cpu", max_batch=2).denoise(x, sig)
    torch.testing.assert_close(per[1], whole[1], rtol=0, atol=1e-6)


def test_float64_precision_and_sampler_step(model, x):
    p64 = LearnedPrior(model, device="cpu", precision="float64")
    p32 = LearnedPrior(model, device="cpu")
    assert float((p64.denoise(x, 1.0) - p32.denoise(x, 1.0)).abs().max()) < 1e-4
    step = sampler.pf_ode_euler(p64.denoise, x, 1.0, 0.5)
    assert step.shape == x.shape and step.dtype == torch.float64 and bool(torch.isfinite(step).all())


def test_bfloat16_autocast_is_close(model, x):
    with pytest.warns(RuntimeWarning, match="bfloat16 autocast on the CPU"):
        p = LearnedPrior(model, device="cpu", precision="bfloat16")
    ref = LearnedPrior(model, device="cpu").denoise(x, 0.5)
    assert float((p.denoise(x, 0.5) - ref).abs().max()) < 0.05 * float(ref.abs().max())


def test_shape_mismatch_is_one_clear_error(model):
    prior = LearnedPrior(model, device="cpu")
    with pytest.raises(ValueError, match=r"field shape mismatch: got \(2, 1, 32, 32\)"):
        prior.denoise(torch.zeros(2, 1, 32, 32), 1.0)
    with pytest.raises(ValueError, match="precision"):
        LearnedPrior(model, precision="float16")


def test_from_checkpoint_reproduces_outputs(model, x, tmp_path):
    path = tmp_path / "prior.pt"
    save_checkpoint(path, {"unet": CFG.model_dump(mode="json")}, {"model": model.state_dict()})
    loaded = LearnedPrior.from_checkpoint(path, device="cpu", max_batch=2)
    assert torch.equal(loaded.denoise(x, 0.7), LearnedPrior(model, device="cpu", max_batch=2).denoise(x, 0.7))
    with pytest.raises(CheckpointError, match="checkpoint is for 16x16 fields, 32x32 requested"):
        LearnedPrior.from_checkpoint(path, device="cpu", resolution=32)


def test_picklable_and_movable_for_ray_actors(model, x):
    prior = LearnedPrior(model, device="cpu")
    again = pickle.loads(pickle.dumps(prior))
    assert torch.equal(again.denoise(x, 2.0), prior.denoise(x, 2.0))
    assert torch.equal(prior.to("cpu").denoise(x, 2.0), prior.denoise(x, 2.0))


def test_compile_failure_falls_back_to_eager(model, x, monkeypatch):
    def broken(module):
        def run(*args, **kwargs):
            raise RuntimeError("no compiler here\nmore detail")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    prior = LearnedPrior(model, device="cpu", compile=True)
    with pytest.warns(RuntimeWarning, match="torch.compile failed, running eagerly: no compiler here"):
        out = prior.denoise(x, 0.5)
    assert torch.equal(out, LearnedPrior(model, device="cpu").denoise(x, 0.5))


def test_an_error_the_eager_module_raises_too_keeps_compile_on(model, x, monkeypatch):
    """Only a failure that eager mode does not share blames the compiler (an OOM or a bad input must not switch
    compile off for good)."""
    calls = []

    def compiled(module):
        def run(*args, **kwargs):
            calls.append(1)
            return module(*args, **kwargs)
        return run

    monkeypatch.setattr(torch, "compile", compiled)
    prior = LearnedPrior(model, device="cpu", compile=True)
    with pytest.raises(ValueError, match="field shape mismatch"):
        prior.denoise(torch.zeros(2, 1, 8, 8), 0.5)
    bad = torch.zeros(2, 1, 16, 16)
    with pytest.raises(RuntimeError):
        prior._forward(bad[:, :, :3], torch.ones(2), None)  # the network itself fails, compiled and eager alike
    assert prior._forward.compiled is not None
    prior.denoise(x, 0.5)
    assert len(calls) == 2
