"""The shipped Navier-Stokes priors (32x32 and 64x64): they load, they denoise held-out NS fields better than the
identity and than the Gaussian field fitted to the same kind of data, and runs use them through the config."""

import numpy as np
import pytest
import torch

from enkg_dist import config as cfgmod
from enkg_dist import runner
from enkg_dist.priors.gaussian import GaussianFieldPrior
from enkg_dist.priors.learned import LearnedPrior


def _fresh_fields(tmp_path_factory, n: int, fit: int, heldout: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, heldout) NS fields (Re = 200) from our generator with another seed than the shipped priors' data (seed
    0): never seen by them."""
    from enkg_dist.data import generate_dataset, open_dataset

    path = tmp_path_factory.mktemp("ns") / f"ns{n}.zarr"
    generate_dataset(path, n=n, splits={"fit": fit, "heldout": heldout}, seed=7, batch=heldout, progress=False,
                     threads=1)
    as_t = lambda s: torch.from_numpy(np.asarray(open_dataset(path, s))).to(torch.float64)  # noqa: E731
    return as_t("fit"), as_t("heldout")


@pytest.fixture(scope="module")
def ns_fields(tmp_path_factory):
    return _fresh_fields(tmp_path_factory, 32, 64, 16)


def test_builtin_checkpoint_loads_with_its_config():
    prior = runner.make_prior(cfgmod.LearnedPrior(device="cpu"), 32)
    assert isinstance(prior, LearnedPrior) and prior.state_shape == (1, 32, 32)
    assert prior.meta["data"]["attributes"]["n"] == 32 and prior.meta["data"]["num_samples"] > 0
    with pytest.raises(cfgmod.ConfigError, match="prior.checkpoint"):
        runner.make_prior(cfgmod.LearnedPrior(device="cpu"), 64)  # made for 32x32
    with pytest.raises(cfgmod.ConfigError, match="no builtin prior 'ns128'"):
        runner.make_prior(cfgmod.LearnedPrior(checkpoint="builtin:ns128", device="cpu"), 32)


@pytest.mark.slow
@pytest.mark.parametrize("sigma", [0.2, 0.5, 1.0])
def test_shipped_denoiser_beats_identity_and_fitted_gaussian_at_mid_sigma(ns_fields, sigma):
    fit, x0 = ns_fields
    learned = runner.make_prior(cfgmod.LearnedPrior(device="cpu"), 32)
    gauss = GaussianFieldPrior.fit(fit, radial=True)
    gen = torch.Generator().manual_seed(11)
    x0 = x0.repeat(4, 1, 1, 1)
    x = x0 + sigma * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    mse = {name: float(((d(x, sigma) - x0) ** 2).mean()) for name, d in
           (("learned", learned.denoise), ("gaussian", gauss.denoise), ("identity", lambda x, s: x))}
    assert mse["learned"] < mse["gaussian"] < mse["identity"], mse


@pytest.fixture(scope="module")
def ns64_fields(tmp_path_factory):
    return _fresh_fields(tmp_path_factory, 64, 32, 8)


def test_builtin_64_checkpoint_loads_for_64x64_only():
    prior = runner.make_prior(cfgmod.LearnedPrior(checkpoint="builtin:ns64", device="cpu"), 64)
    assert isinstance(prior, LearnedPrior) and prior.state_shape == (1, 64, 64)
    assert prior.meta["data"]["attributes"]["n"] == 64 and prior.meta["data"]["attributes"]["Re"] == 200.0
    with pytest.raises(cfgmod.ConfigError, match="prior.checkpoint"):
        runner.make_prior(cfgmod.LearnedPrior(checkpoint="builtin:ns64", device="cpu"), 32)


@pytest.mark.slow
@pytest.mark.parametrize("sigma", [0.2, 1.0])
def test_shipped_64_denoiser_beats_the_fitted_gaussian(ns64_fields, sigma):
    fit, x0 = ns64_fields
    learned = runner.make_prior(cfgmod.LearnedPrior(checkpoint="builtin:ns64", device="cpu"), 64)
    gauss = GaussianFieldPrior.fit(fit, radial=True)
    x = x0 + sigma * torch.randn(x0.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    mse = {name: float(((d(x, sigma) - x0) ** 2).mean()) for name, d in
           (("learned", learned.denoise), ("gaussian", gauss.denoise))}
    assert mse["learned"] < 0.85 * mse["gaussian"], mse  # measured on the test split: 0.50 (σ 0.2), 0.70 (σ 1)


def test_learned_prior_configs_are_checked():
    base = {"method": "enkg", "problem": {"kind": "navier_stokes", "n": 32}, "prior": {"kind": "learned"}}
    with pytest.raises(cfgmod.ConfigError, match="linear-Gaussian"):
        runner.build(cfgmod.validate({**base, "problem": {"kind": "linear_gaussian", "n": 32}}))
    with pytest.raises(cfgmod.ConfigError, match="EKI"):
        runner.build(cfgmod.validate({**base, "method": "eki"}))
    with pytest.raises(cfgmod.ConfigError, match="prior.checkpoint"):
        runner.build(cfgmod.validate({**base, "prior": {"kind": "learned", "checkpoint": "/nonexistent.pt"}}))
    with pytest.raises(cfgmod.ConfigError, match="prior.data"):
        runner.build(cfgmod.validate({**base, "prior": {"kind": "gaussian_fit", "data": "/nonexistent.zarr"}}))


def test_navier_stokes_run_with_the_learned_prior(tmp_path):
    cfg = cfgmod.validate({"name": "ns-learned", "method": "enkg", "output_dir": str(tmp_path),
                           "problem": {"kind": "navier_stokes", "n": 32, "k": 2, "T": 0.25, "spinup": 1.0},
                           "prior": {"kind": "learned", "device": "cpu"},
                           "enkg": {"ensemble_size": 8, "num_steps": 6, "num_corrections": 1,
                                    "guidance_start": 0.0, "guidance_end": 0.0}})
    out, m = runner.run(cfg, tmp_path / "run", progress=False)
    x = torch.load(out / "ensemble.pt")["particles"]
    assert x.shape == (8, 1, 32, 32) and bool(torch.isfinite(x).all())
    assert m["forward_evaluations"] == 8 * 5  # guided steps 0 < i < 6 (enkg.md §2)
    assert m["rel_l2_mean"] < 1.5
