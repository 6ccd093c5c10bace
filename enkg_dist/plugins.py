"""Building what a job's Python plug-ins name (`problem.kind: python`, `prior.kind: python`) and the observation
noise a job gives as std, variances or a covariance file, with one-line config errors naming the key.

The factories are imported and called once here, on the driver, so that a module that does not import or a factory
that raises is a one-line `ConfigError` naming it before any run directory or Ray actor exists; the built objects
stay with the driver (in-process runs use them) and each Ray worker or actor builds its own from the factory's name
(`factories.FactorySpec`: the module must be importable there, see the README on runtime_env).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from enkg_dist import rng
from enkg_dist.devices import resolve_device
from enkg_dist.factories import FactoryError, FactorySpec, ObjectSpec, absolute, label
from enkg_dist.noise import NoiseCovariance
from enkg_dist.priors import GaussianPrior, Prior
from enkg_dist.priors.plugin import PluginPrior
from enkg_dist.problems.base import InverseProblem, safe_evaluate
from enkg_dist.problems.plugin import PluginForward
from enkg_dist.schema import ConfigError


@dataclass(frozen=True)
class Given:
    """Python objects given to the library API (enkg_dist.api) in place of the factories a job names: `forward` for
    problem.forward (G, or a problems.base.ForwardModel), `denoiser` for prior.denoiser (D(x, sigma))."""

    forward: object | None = None
    denoiser: object | None = None


def load_array(path: str, key: str) -> torch.Tensor:
    """A job's array (.npy, or a Zarr array path) as float64; a one-line config error naming `key` otherwise."""
    from enkg_dist.data.arrays import read_array

    try:
        a = read_array(path)
        return torch.from_numpy(np.array(a, dtype=np.float64))
    except Exception as e:  # noqa: BLE001 - numpy, zarr and the file system each raise their own kinds
        text = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"config error: {key}: cannot read {path!r} ({text})") from None


def noise_covariance(noise, m: int, key: str = "problem.noise") -> NoiseCovariance:
    """Gamma of `noise` (config.NoiseSettings) for m observations: scalar, diagonal or full."""
    try:
        if noise.std is not None:
            return NoiseCovariance.scalar(noise.std**2, m)
        if noise.variances is not None:
            v = noise.variances
            v = load_array(v, f"{key}.variances") if isinstance(v, str) else torch.tensor(v, dtype=torch.float64)
            if v.numel() != m:
                raise ConfigError(f"config error: {key}.variances: has {v.numel()} values, the observation {m}")
            return NoiseCovariance.diagonal(v.reshape(-1))
        C = load_array(noise.covariance, f"{key}.covariance")
        if tuple(C.shape) != (m, m):
            raise ConfigError(f"config error: {key}.covariance: has shape {tuple(C.shape)}, expected ({m}, {m})")
        if not bool(torch.isfinite(C).all()):
            raise ConfigError(f"config error: {key}.covariance: {noise.covariance!r} holds NaN or inf")
        return NoiseCovariance.full(C)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        which = "std" if noise.std is not None else "variances" if noise.variances is not None else "covariance"
        raise ConfigError(f"config error: {key}.{which}: {str(e).splitlines()[0]}") from None


def _built(what):
    """`what()`, a FactoryError turned into a one-line config error."""
    try:
        return what()
    except FactoryError as e:
        raise ConfigError(f"config error: {e}") from None


def _spec(name: str, kwargs: dict, key: str, path, given=None) -> FactorySpec:
    """The factory a job names, or the object the library API was given instead (enkg_dist.api: pickled to the Ray
    workers and actors with it, where a factory's name is imported)."""
    if given is not None:
        return ObjectSpec(label(given), {}, key, (), obj=given)
    return FactorySpec(name, dict(kwargs), key, absolute(path))


def python_prior(pr, state_shape, device: str = "cpu", denoiser=None) -> Prior:
    """The `prior.kind: python` denoiser on `device`, built here once (its errors one line naming the factory);
    `denoiser`: a D(x, sigma) object (or a priors.Prior) given to the library API in place of the factory."""
    if isinstance(denoiser, Prior):  # one of our priors, given as an object: used as it is
        if tuple(denoiser.state_shape) != tuple(state_shape):
            raise ConfigError(f"config error: prior.denoiser: the prior given takes states of shape "
                              f"{tuple(denoiser.state_shape)}, the problem's are {tuple(state_shape)}")
        return denoiser.to(device)
    spec = _spec(pr.denoiser, pr.kwargs, "prior.denoiser", pr.path, denoiser)
    prior = PluginPrior(spec, state_shape, device, pr.max_batch, pr.dtype, pr.convention)
    return _built(prior.build)


DIFFUSERS_FACTORY = "enkg_dist.priors.diffusers_prior:edm_denoiser"


def diffusers_prior(pr, state_shape, device: str = "cpu") -> PluginPrior:
    """The `prior.kind: diffusers` denoiser on `device`: the UNet2DModel and scheduler in the local directory
    `pr.path`, loaded here once (a missing or malformed directory, or a state it does not fit, is one config error
    line naming the key); Ray prior actors load it again from the same path (it must be readable there)."""
    from enkg_dist.priors.diffusers_prior import DiffusersError, edm_denoiser, unet_shape

    path = absolute([pr.path])[0]
    kwargs = {"path": path, "prediction_type": pr.prediction_type, "timesteps": pr.timesteps, "dtype": pr.dtype}
    shape = tuple(int(s) for s in state_shape)
    try:
        channels, factor = unet_shape(path)
        if len(shape) != 3 or shape[0] != channels or shape[1] % factor or shape[2] % factor:
            raise DiffusersError("path", f"the UNet takes ({channels}, H, W) fields with H and W multiples of "
                                 f"{factor}; the problem's state is {shape}")
        D = edm_denoiser(device=str(resolve_device(device)), **kwargs)
    except DiffusersError as e:
        raise ConfigError(f"config error: prior.{e.key}: {str(e).splitlines()[0]}") from None
    spec = FactorySpec(DIFFUSERS_FACTORY, kwargs, "prior.path", _built=D)  # D travels as its path: rebuilt there
    return PluginPrior(spec, shape, device, pr.max_batch, pr.dtype, "edm")


def build_python_problem(p, pr, make_prior, forward=None) -> tuple[InverseProblem, object, torch.Tensor | None]:
    """(problem, prior, observation image) of `problem.kind: python`: G from its factory (built here once, and
    per Ray worker) or the `forward` object given to the library API, the prior by `make_prior(pr, state_shape)`,
    y from a file or a synthetic twin."""
    shape = p.shape
    spec = _spec(p.forward, p.kwargs, "problem.forward", p.path, forward)
    G = PluginForward(spec, shape, p.obs_size, p.array)
    _built(G.model)
    prior = make_prior(pr, shape)
    Gamma = noise_covariance(p.noise, p.obs_size)
    truth, y, image = observed(p, G, prior, shape, Gamma.color, f"the forward model {spec.name!r}")
    return InverseProblem("python", G, y, Gamma, truth), prior, image


def observed(p, G, prior, shape: tuple, color, who: str) -> tuple[torch.Tensor | None, torch.Tensor, object]:
    """(truth, y, observation image) of a problem whose job names `truth`, `observation`, `truth_seed`, `obs_size`
    and `coordinates` (python and external problems): y from a file, or a synthetic twin y = G(truth) + color(z)
    with the truth from the file or drawn from a Gaussian prior; G's observation coordinates set from the file."""
    truth = None if p.truth is None else load_array(p.truth, "problem.truth")
    if truth is not None and truth.numel() != int(np.prod(shape)):
        raise ConfigError(f"config error: problem.truth: has {truth.numel()} values, the state {tuple(shape)}")
    truth = None if truth is None else truth.reshape(shape)
    if p.observation is not None:
        y = load_array(p.observation, "problem.observation").reshape(-1)
    else:  # synthetic twin: truth from the prior (or the file), y = G(truth) + noise
        if truth is None and not isinstance(prior, GaussianPrior):
            raise ConfigError("config error: problem.observation: a synthetic twin draws its truth from a Gaussian "
                              "prior; with this prior give problem.observation or problem.truth")
        if truth is None:
            truth = prior.sample(rng.member_normal(p.truth_seed, rng.DATA, [0], shape))[0]
        res = safe_evaluate(G, truth[None].to(torch.float64))
        if not bool(res.ok[0]):
            raise RuntimeError(f"{who} failed on the synthetic truth: {res.reasons[0]}")
        y = res.psi[0].to(torch.float64) + color(rng.member_normal(p.truth_seed, rng.OBS_NOISE, [0], (p.obs_size,))[0])
    if y.numel() != p.obs_size:
        raise ConfigError(f"config error: problem.observation: has {y.numel()} values, obs_size is {p.obs_size}")
    if p.coordinates is not None:
        coords = load_array(p.coordinates, "problem.coordinates")
        if coords.shape != (p.obs_size, 2) or not bool(torch.isfinite(coords).all()):
            raise ConfigError(f"config error: problem.coordinates: {p.coordinates!r} must hold finite (obs_size, 2) "
                              f"= ({p.obs_size}, 2) grid coordinates, got {tuple(coords.shape)}")
        G.obs_coordinates = coords
    side = int(round(p.obs_size**0.5))
    return truth, y, y.reshape(side, side) if side * side == p.obs_size else None
