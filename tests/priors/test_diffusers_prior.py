"""`prior.kind: diffusers` (issue 16, item 3): a UNet2DModel and scheduler saved with save_pretrained in a local
directory, converted to the EDM denoiser D(x, sigma).

The conversion is checked exactly (float64, 1e-6) on a Gaussian x0 ~ N(0, c^2 I), whose EDM denoiser is
c^2 / (c^2 + sigma^2) x: a closed-form network returning the exact epsilon / v / x0 of that Gaussian at (x_vp, t) is
converted with the schedule of a scheduler saved and loaded by the test, and must give that denoiser for epsilon-,
v- and sample-prediction, at trained and in-between noise levels. A tiny real UNet2DModel created and saved by the
test is loaded through the job configuration, its D checked against the formula applied to its raw output, and run
in a short EnKG job in-process."""

from __future__ import annotations

import inspect
import json
import textwrap

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from enkg_dist import config as cfgmod  # noqa: E402
from enkg_dist import plugins, runner  # noqa: E402
from enkg_dist.priors.diffusers_prior import (EDMPreconditioned, VPDenoiser, edm_denoiser, load,  # noqa: E402
                                              vp_sigmas)
from enkg_dist.schema import ConfigError  # noqa: E402

C2 = 0.7**2  # the Gaussian's variance
N = 8


def tiny_unet(channels: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(sample_size=N, in_channels=channels, out_channels=channels,
                                 block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))


def save_model(root, scheduler, channels: int = 1, pipeline: bool = False):
    """A tiny UNet2DModel and `scheduler` saved into root (or root/unet, root/scheduler as a pipeline does)."""
    unet = tiny_unet(channels)
    unet.save_pretrained(root / "unet" if pipeline else root)
    scheduler.save_pretrained(root / "scheduler" if pipeline else root)
    return root


class GaussianVP:
    """The exact network of a Gaussian x0 ~ N(0, c2 I) under the VP schedule `alphas_cumprod`: at x_t and a
    (fractional) timestep t, E[eps | x_t], E[v | x_t] or E[x0 | x_t]. sigma(t) between trained timesteps is linear in
    log sigma (numpy.interp, independent of the code under test)."""

    def __init__(self, alphas_cumprod, prediction_type: str, c2: float = C2):
        a = np.asarray(alphas_cumprod, dtype=np.float64)
        self.log_sigma = np.log(np.sqrt((1 - a) / a))
        self.prediction_type, self.c2 = prediction_type, c2

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = np.asarray(t, dtype=np.float64)
        s2 = np.exp(2 * np.interp(t, np.arange(self.log_sigma.size), self.log_sigma))
        abar = torch.as_tensor(1 / (1 + s2), dtype=x_t.dtype).reshape(-1, 1, 1, 1)
        a, b = abar.sqrt(), (1 - abar).sqrt()
        var = a**2 * self.c2 + b**2  # x_t = a x0 + b eps
        eps = b / var * x_t
        x0 = a * self.c2 / var * x_t
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "v_prediction":
            return a * eps - b * x0
        return x0


def exact_D(x: torch.Tensor, sigma: torch.Tensor, c2: float = C2) -> torch.Tensor:
    return c2 / (c2 + sigma.reshape(-1, 1, 1, 1) ** 2) * x


@pytest.fixture(scope="module")
def ddpm_schedule(tmp_path_factory):
    """alphas_cumprod of a DDPMScheduler saved and loaded back through our loader."""
    root = save_model(tmp_path_factory.mktemp("ddpm"), diffusers.DDPMScheduler(num_train_timesteps=1000))
    _, _, scheduler = load(root, "float64")
    return scheduler.alphas_cumprod


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("timesteps", ["interpolate", "nearest"])
def test_conversion_is_exact_on_a_gaussian_at_trained_noise_levels(ddpm_schedule, ptype, timesteps):
    sig = vp_sigmas(ddpm_schedule)
    sigma = sig[[0, 1, 10, 250, 500, 999]]
    D = VPDenoiser(GaussianVP(ddpm_schedule, ptype), ddpm_schedule, ptype, timesteps)
    x = torch.randn(sigma.numel(), 1, N, N, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = x * (C2 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt()  # x ~ p_sigma: errors relative to its scale
    torch.testing.assert_close(D(x, sigma), exact_D(x, sigma), rtol=0, atol=1e-6)
    assert torch.equal(D.sigma_to_t(sigma), torch.tensor([0, 1, 10, 250, 500, 999], dtype=torch.float64))


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_interpolated_timesteps_are_exact_between_trained_noise_levels(ddpm_schedule, ptype):
    """sigma off the trained grid (the EnKG schedule's): t fractional, and D still the Gaussian's exactly."""
    sigma = torch.tensor([0.0123, 0.05, 0.3, 1.0, 1.7, 12.0, 80.0, 150.0], dtype=torch.float64)
    D = VPDenoiser(GaussianVP(ddpm_schedule, ptype), ddpm_schedule, ptype, "interpolate")
    t = D.sigma_to_t(sigma)
    assert bool((t != t.round()).all()) and bool(((t > 0) & (t < 999)).all())
    x = torch.randn(sigma.numel(), 1, N, N, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x = x * (C2 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt()
    torch.testing.assert_close(D(x, sigma), exact_D(x, sigma), rtol=0, atol=1e-6)
    # one sigma for the whole batch, as a float, is the same
    torch.testing.assert_close(D(x[:1], float(sigma[3])), exact_D(x[:1], sigma[3:4]), rtol=0, atol=1e-6)


def test_nearest_timesteps_pick_the_trained_level_nearest_in_log_sigma(ddpm_schedule):
    sig = vp_sigmas(ddpm_schedule)
    D = VPDenoiser(GaussianVP(ddpm_schedule, "epsilon"), ddpm_schedule, "epsilon", "nearest")
    mid_low = (sig[100].log() * 0.6 + sig[101].log() * 0.4).exp()  # nearer 100
    mid_high = (sig[100].log() * 0.4 + sig[101].log() * 0.6).exp()  # nearer 101
    got = D.sigma_to_t(torch.stack([mid_low, mid_high, sig[0] / 10, sig[-1] * 10]))
    assert got.tolist() == [100.0, 101.0, 0.0, 999.0]


def test_edm_scheduler_conversion_is_exact_on_a_gaussian():
    """diffusers' EDM schedulers: D = c_skip x + c_out F(c_in x, log(sigma)/4), F the Gaussian's exact network."""
    sd = 0.5

    def F(x_in, c_noise, ptype):  # the network output whose preconditioned D is the Gaussian's
        s = torch.exp(4 * c_noise).reshape(-1, 1, 1, 1)
        x = x_in * (s**2 + sd**2).sqrt()
        c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt()
        return (exact_D(x, s) - c_skip * x) / (c_out if ptype == "epsilon" else -c_out)

    sigma = torch.tensor([0.002, 0.1, 1.0, 10.0, 80.0], dtype=torch.float64)
    x = torch.randn(5, 1, N, N, dtype=torch.float64) * (C2 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt()
    for ptype in ("epsilon", "v_prediction"):
        D = EDMPreconditioned(lambda a, b, p=ptype: F(a, b, p), sd, ptype)
        torch.testing.assert_close(D(x, sigma), exact_D(x, sigma), rtol=0, atol=1e-6)


def _raw_vp_D(unet, x, sigma, t, ptype):
    """D from the UNet's raw output at timesteps t, by the formulas of the module docstring."""
    a = (1 / (1 + sigma**2)).sqrt().reshape(-1, 1, 1, 1)
    with torch.no_grad():
        out = unet(x * a, t).sample
    s = sigma.reshape(-1, 1, 1, 1)
    return x - s * out if ptype == "epsilon" else a**2 * x - s * a * out


@pytest.mark.parametrize("scheduler,ptype", [
    ("DDPMScheduler", "epsilon"),
    ("DDPMScheduler", "v_prediction"),
    ("EulerDiscreteScheduler", "v_prediction"),  # a Karras-sigma sampler of the same alphas_cumprod
])
def test_a_saved_unet_loads_and_converts_its_own_output(tmp_path, scheduler, ptype):
    kw = {"use_karras_sigmas": True} if scheduler == "EulerDiscreteScheduler" else {}
    sched = getattr(diffusers, scheduler)(num_train_timesteps=1000, prediction_type=ptype, **kw)
    root = save_model(tmp_path, sched, pipeline=scheduler == "EulerDiscreteScheduler")
    D = edm_denoiser(root, dtype="float64")  # prediction_type read from the scheduler config
    assert isinstance(D, VPDenoiser) and D.prediction_type == ptype
    unet = diffusers.UNet2DModel.from_pretrained(root / "unet" if (root / "unet").is_dir() else root,
                                                 torch_dtype=torch.float64, low_cpu_mem_usage=False)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0).double().numpy()  # DDPM's linear betas
    log_sigmas = np.log(np.sqrt((1 - abar) / abar))
    sigma = torch.tensor([0.02, 0.5, 3.0, 40.0], dtype=torch.float64)
    x = torch.randn(4, 1, N, N, dtype=torch.float64)
    t = D.sigma_to_t(sigma)  # linear in log sigma (numpy's here; the network embeds t in float32)
    np.testing.assert_allclose(t.numpy(), np.interp(np.log(sigma.numpy()), log_sigmas, np.arange(1000)),
                               rtol=0, atol=1e-6)
    with torch.no_grad():
        got = D(x, sigma)
    torch.testing.assert_close(got, _raw_vp_D(unet, x, sigma, t, ptype), rtol=0, atol=1e-9)


# --- through the job configuration ---------------------------------------------------------------------------------

FORWARD = '''
def make_forward(k=2):
    def G(x):
        return x[:, :, ::k, ::k].reshape(x.shape[0], -1)
    return G
'''


@pytest.fixture
def model_job(tmp_path, monkeypatch):
    """A saved tiny DDPM (epsilon) UNet, a linear forward module on sys.path, a truth file: the job as a dict."""
    root = save_model(tmp_path / "model", diffusers.DDPMScheduler(num_train_timesteps=1000))
    mod = f"diff_forward_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{mod}.py").write_text(textwrap.dedent(FORWARD))
    monkeypatch.syspath_prepend(str(tmp_path))
    np.save(tmp_path / "truth.npy", np.random.default_rng(0).normal(size=(1, N, N)) * 0.5)
    job = {"name": "diff", "output_dir": str(tmp_path / "runs"), "seed": 1,
           "problem": {"kind": "python", "forward": f"{mod}:make_forward", "n": N, "obs_size": (N // 2) ** 2,
                       "noise": 0.1, "truth": str(tmp_path / "truth.npy"), "path": [str(tmp_path)]},
           "prior": {"kind": "diffusers", "path": str(root), "dtype": "float64", "max_batch": 3},
           "enkg": {"ensemble_size": 4, "num_steps": 3, "num_corrections": 1}}
    return job, root


def test_the_config_builds_the_prior_and_its_denoiser_has_the_state_shape(model_job):
    job, root = model_job
    cfg = cfgmod.validate(job)
    assert cfg.prior.kind == "diffusers" and cfg.prior.timesteps == "interpolate" and cfg.prior.device == "cpu"
    prior = plugins.diffusers_prior(cfg.prior, (1, N, N))
    x = torch.randn(5, 1, N, N, dtype=torch.float64)
    out = prior.denoise(x, torch.full((5,), 2.0, dtype=torch.float64))
    assert out.shape == x.shape and out.dtype == x.dtype and bool(torch.isfinite(out).all())
    torch.testing.assert_close(out, edm_denoiser(root, dtype="float64")(x, 2.0), rtol=0, atol=1e-12)


def test_the_diffusers_model_runs_an_enkg_job_in_process(model_job):
    """A short EnKG job with the saved UNet as its prior (through `prior.kind: python` and the loader's factory,
    which is what `prior.kind: diffusers` builds)."""
    job, root = model_job
    job["prior"] = {"kind": "python", "denoiser": "enkg_dist.priors.diffusers_prior:edm_denoiser",
                    "kwargs": {"path": str(root), "dtype": "float64"}, "max_batch": 3}
    out, metrics = runner.run(cfgmod.validate(job), progress=False)
    assert metrics["forward_evaluations"] > 0 and metrics["failed_evaluations"] == 0
    assert np.isfinite(metrics["rel_l2_mean"])


@pytest.mark.skipif("diffusers" not in inspect.getsource(runner.make_prior),
                    reason="the runner does not dispatch prior.kind diffusers yet (plugins.diffusers_prior)")
def test_prior_kind_diffusers_runs_an_enkg_job_in_process(model_job):
    job, _ = model_job
    out, metrics = runner.run(cfgmod.validate(job), progress=False)
    assert metrics["forward_evaluations"] > 0 and metrics["failed_evaluations"] == 0
    assert np.isfinite(metrics["rel_l2_mean"])


def _one_line(text: str, *words: str) -> None:
    assert "\n" not in text.strip() and "Traceback" not in text, text
    for w in words:
        assert w in text, (w, text)


@pytest.mark.parametrize("breakage,words", [
    ("missing", ("prior.path", "is not a directory")),
    ("empty", ("prior.path", "no config.json")),
    ("no_scheduler", ("prior.path", "scheduler_config.json")),
    ("bad_json", ("prior.path", "not valid JSON")),
    ("bad_weights", ("prior.path", "cannot load the UNet2DModel")),
    ("channels", ("prior.path", "(3, H, W)")),
])
def test_a_missing_or_malformed_directory_is_one_config_error_line(model_job, tmp_path, breakage, words):
    job, root = model_job
    shape = (1, N, N)
    if breakage == "missing":
        job["prior"]["path"] = str(tmp_path / "nowhere")
    elif breakage == "empty":
        (tmp_path / "empty").mkdir()
        job["prior"]["path"] = str(tmp_path / "empty")
    elif breakage == "no_scheduler":
        (root / "scheduler_config.json").unlink()
    elif breakage == "bad_json":
        (root / "config.json").write_text("{not json")
    elif breakage == "bad_weights":
        (root / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    elif breakage == "channels":
        save_model(tmp_path / "rgb", diffusers.DDPMScheduler(), channels=3)
        job["prior"]["path"] = str(tmp_path / "rgb")
    cfg = cfgmod.validate(job)
    with pytest.raises(ConfigError) as err:
        plugins.diffusers_prior(cfg.prior, shape)
    _one_line(str(err.value), "config error:", *words)


def test_an_unsupported_scheduler_or_prediction_is_one_line_naming_the_key(model_job):
    job, root = model_job
    cfg = json.loads((root / "scheduler_config.json").read_text())
    (root / "scheduler_config.json").write_text(json.dumps({**cfg, "prediction_type": "flow"}))
    with pytest.raises(ConfigError) as err:
        plugins.diffusers_prior(cfgmod.validate(job).prior, (1, N, N))
    _one_line(str(err.value), "config error: prior.prediction_type", "flow")
    (root / "scheduler_config.json").write_text(json.dumps({**cfg, "_class_name": "ScoreSdeVeScheduler"}))
    with pytest.raises(ConfigError) as err:
        plugins.diffusers_prior(cfgmod.validate(job).prior, (1, N, N))
    _one_line(str(err.value), "config error: prior.path", "ScoreSdeVeScheduler")


@pytest.mark.parametrize("bad,key", [
    ({"kind": "diffusers"}, "prior.path"),
    ({"kind": "diffusers", "path": "m", "prediction_type": "x"}, "prior.prediction_type"),
    ({"kind": "diffusers", "path": "m", "timesteps": "round"}, "prior.timesteps"),
    ({"kind": "diffusers", "path": "m", "max_batch": 0}, "prior.max_batch"),
])
def test_diffusers_keys_are_validated_with_one_line_errors(bad, key):
    with pytest.raises(ConfigError) as err:
        cfgmod.validate({"prior": bad})
    _one_line(str(err.value), f"config error: {key}")
