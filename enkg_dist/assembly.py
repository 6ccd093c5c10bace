"""Builds what a run needs from a RunConfig: the problem (its forward model wrapped in failure injection where the
config asks), the prior and the localiser, and says where each part computes (driver, prior, simulators). The runner
runs what this builds; the library API, the sweep and the benchmarks build through it too."""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from enkg_dist import config as cfgmod
from enkg_dist import devices
from enkg_dist.priors import Prior
from enkg_dist.problems.base import InverseProblem


@dataclass
class Built:
    """Everything a run needs, built from the config."""

    problem: InverseProblem
    prior: Prior  # the declared interface (priors.Prior); Gaussian priors are also priors.GaussianPrior
    posterior: object | None = None  # exact posterior where one exists
    observation_image: torch.Tensor | None = None
    localiser: object | None = None  # enkg_dist.localisation.Localiser of the method's settings, or None


def resolve_device(name: str) -> torch.device:
    """The driver's device (`device: auto/cpu/cuda`; auto is the CPU for now, see devices.driver_device), a one-line
    config error when it is not there."""
    try:
        return devices.driver_device(name)
    except ValueError as e:
        raise cfgmod.ConfigError(f"config error: device: {e}") from None


def on_ray(cfg: cfgmod.RunConfig, address: str | None = None) -> bool:
    """Whether the run uses a Ray cluster (the config's backend, or an address from the command line)."""
    return cfg.execution.backend == "ray" or bool(address)


def prior_device(cfg: cfgmod.RunConfig, remote: bool) -> str:
    """Where a learned prior runs: checked against each prior actor's GPU grant on Ray, against this machine's
    hardware in-process; a one-line config error naming the key otherwise."""
    pr, ex = cfg.prior, cfg.execution
    if pr.kind not in ("learned", "python", "diffusers"):
        return "cpu"
    if remote:
        if pr.device == "cuda" and ex.prior_gpus == 0:
            raise cfgmod.ConfigError("config error: prior.device: 'cuda' on Ray needs execution.prior_gpus > 0 "
                                     "(the GPU each prior actor is given)")
        name = "cpu" if pr.device == "cpu" or ex.prior_gpus == 0 else "cuda"
    else:
        try:
            name = devices.resolve_device(pr.device).type
        except ValueError as e:
            raise cfgmod.ConfigError(f"config error: prior.device: {e}") from None
    if pr.kind == "learned" and pr.dtype == "bfloat16" and name != "cuda":
        raise cfgmod.ConfigError("config error: prior.dtype: bfloat16 runs on CUDA only and this prior runs on the "
                                 "CPU; use float32" + (" or give prior actors GPUs (execution.prior_gpus)"
                                                       if remote else ""))
    return name


def devices_plan(cfg: cfgmod.RunConfig, address: str | None = None) -> dict:
    """Where each part of the run computes, for --dry-run."""
    remote = on_ray(cfg, address)
    ex = cfg.execution
    driver = str(resolve_device(cfg.device))
    plan = {"driver": driver + (" (device: auto is the CPU until the GPU suite has passed on a GPU)"
                                if cfg.device == "auto" and driver == "cpu" else ""),
            "prior": prior_device(cfg, remote) + (" (each prior actor)" if remote else "")}
    plan["simulators"] = ("cuda (each worker's GPU)" if remote and ex.worker_gpus > 0 else
                          "cpu" if remote else "the driver's device")
    return plan


def make_prior(pr, n: int, zero_mean_mode: bool = False, device: str = "cpu", state_shape=None, denoiser=None):
    """The prior of a config on the n x n grid (states of `state_shape`, (1, n, n) by default): a Gaussian field, a
    learned denoiser loaded from its checkpoint, or a Python plug-in's (`denoiser`: the object the library API was
    given in place of its factory), onto `device` (the CPU when it goes to Ray actors, which move it themselves)."""
    if pr.kind == "python":
        from enkg_dist import plugins

        return plugins.python_prior(pr, state_shape or (1, n, n), device, denoiser)
    if pr.kind == "diffusers":
        from enkg_dist import plugins

        return plugins.diffusers_prior(pr, state_shape or (1, n, n), device)
    if pr.kind == "gaussian":
        from enkg_dist.priors.gaussian import GaussianFieldPrior

        return GaussianFieldPrior.matern_like(n, pr.alpha, pr.tau, pr.std, zero_mean_mode=zero_mean_mode)
    if pr.kind == "gaussian_fit":
        return _fitted_prior(pr, n)
    from enkg_dist.priors.learned import LearnedPrior

    try:
        with warnings.catch_warnings():  # bfloat16 on a CPU copy bound for GPU actors is not the user's concern
            warnings.filterwarnings("ignore", "bfloat16 autocast on the CPU")
            return LearnedPrior.from_checkpoint(pr.checkpoint, device=device, precision=pr.dtype,
                                                compile=pr.compile, max_batch=pr.max_batch, resolution=n)
    except ValueError as e:
        raise cfgmod.ConfigError(f"config error: prior.checkpoint: {str(e).splitlines()[0]}") from None


def _fitted_prior(pr, n: int):
    from enkg_dist.data import open_dataset
    from enkg_dist.priors.gaussian import GaussianFieldPrior

    try:
        data = open_dataset(pr.data, pr.split)
    except (OSError, KeyError, ValueError) as e:
        raise cfgmod.ConfigError(f"config error: prior.data: cannot read split {pr.split!r} of {pr.data!r} "
                                 f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if data.shape[-1] != n:
        raise cfgmod.ConfigError(f"config error: prior.data: fields are {data.shape[-1]}x{data.shape[-1]}, the "
                                 f"problem is {n}x{n}")
    return GaussianFieldPrior.fit(torch.from_numpy(np.asarray(data)), radial=pr.radial)


def build(cfg: cfgmod.RunConfig, remote: bool = False, given=None) -> Built:
    """Problem, prior and exact posterior (when known) for a config; `remote`: the prior goes to Ray actors;
    `given` (plugins.Given): the Python objects the library API was given for problem.forward / prior.denoiser."""
    from enkg_dist import plugins
    from enkg_dist.problems import linear_gaussian

    p, pr = cfg.problem, cfg.prior
    given = given or plugins.Given()
    if (given.forward is not None and p.kind != "python") or (given.denoiser is not None and pr.kind != "python"):
        raise cfgmod.ConfigError("config error: a Python forward model or denoiser object needs problem.kind / "
                                 "prior.kind python")
    device = prior_device(cfg, remote)
    device = "cpu" if remote else device
    if pr.kind != "gaussian" and p.kind == "linear_gaussian":
        raise cfgmod.ConfigError(f"config error: prior.kind: {pr.kind!r} does not apply to the linear-Gaussian "
                                 "problem (its exact posterior needs its own Gaussian prior)")
    if pr.kind in ("learned", "python", "diffusers") and cfg.method == "eki":
        raise cfgmod.ConfigError(f"config error: prior.kind: EKI draws its ensemble from a Gaussian prior; a {pr.kind} "
                                 "prior needs method enkg")
    if p.kind == "linear_gaussian":
        Gamma = None if p.noise is None else plugins.noise_covariance(p.noise, (p.n // p.k) ** 2)
        problem, prior, post = linear_gaussian.make_problem(
            n=p.n, k=p.k, blur=p.blur, alpha=pr.alpha, tau=pr.tau, std=pr.std, noise_std=p.noise_std,
            truth_seed=p.truth_seed, Gamma=Gamma)
        obs = problem.y.reshape(p.n // p.k, p.n // p.k)
        return _finish(cfg, Built(problem, prior, post, obs))
    if p.kind == "navier_stokes":
        from enkg_dist.problems import navier_stokes as ns

        problem = ns.make_problem(n=p.n, k=p.k, noise_std=p.noise_std, T=p.T, truth=p.truth_seed, seed=p.truth_seed,
                                  spinup=p.spinup, Re=p.Re, dealias=p.dealias, mode=p.step_mode,
                                  max_steps=p.max_steps, chunk=p.member_chunk)
        prior = make_prior(pr, p.n, zero_mean_mode=True, device=device, denoiser=given.denoiser)
        return _finish(cfg, Built(problem, prior, None, problem.y.reshape(p.n // p.k, p.n // p.k)))
    if p.kind == "external":
        return _finish(cfg, _build_external(p, pr, device, given.denoiser))
    if p.kind == "python":
        problem, prior, image = plugins.build_python_problem(
            p, pr, lambda pr, shape: _shaped_prior(pr, shape, device, given.denoiser), given.forward)
        return _finish(cfg, Built(problem, prior, None, image))
    raise cfgmod.ConfigError(f"config error: problem.kind: {p.kind!r} is not supported")  # pragma: no cover


def _shaped_prior(pr, shape: tuple, device: str, denoiser=None):
    """The prior for states of `shape`: any for a Python plug-in's; Gaussian and learned ones need a (C, n, n) field."""
    channels_ok = shape[0] == 1 or pr.kind in ("learned", "diffusers")  # (C, n, n) for the networks
    if pr.kind != "python" and (len(shape) != 3 or shape[1] != shape[2] or not channels_ok):
        raise cfgmod.ConfigError(f"config error: prior.kind: {pr.kind!r} takes (1, n, n) fields and the problem's "
                                 f"state is {tuple(shape)}; give problem.n, or use prior.kind: python")
    return make_prior(pr, shape[-1], device=device, state_shape=shape, denoiser=denoiser)


def _build_external(p, pr, device: str = "cpu", denoiser=None) -> Built:
    """An external program as G, the prior on (1, n, n), y from a file or a synthetic twin."""
    from enkg_dist import plugins
    from enkg_dist.noise import NoiseCovariance
    from enkg_dist.problems.external import ExternalProgramForward

    try:
        command = [sys.executable if a == "{python}" else a for a in p.command]  # the Python running enkg-dist
        G = ExternalProgramForward(command, (1, p.n, p.n), p.obs_size, launcher=p.launcher, ranks=p.ranks,
                                   timeout=p.timeout, scratch_dir=p.scratch_dir, max_parallel=p.max_parallel,
                                   env=dict(p.env))
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise cfgmod.ConfigError(f"config error: problem.command: {e}") from None
    prior = make_prior(pr, p.n, device=device, denoiser=denoiser)
    if p.noise is None:  # noise_std: the twin's noise noise_std * z, as before problem.noise existed
        Gamma, color = NoiseCovariance.scalar(p.noise_std**2, p.obs_size), lambda z: p.noise_std * z
    else:
        Gamma = plugins.noise_covariance(p.noise, p.obs_size)
        color = Gamma.color
    truth, y, image = plugins.observed(p, G, prior, (1, p.n, p.n), color, "the simulator")
    problem = InverseProblem("external", G, y, Gamma, truth)
    return Built(problem, prior, None, image)


def make_localiser(settings, forward, key: str = "enkg"):
    """The localiser of `enkg.localisation` (or `eki.localisation`) for this forward model, or None."""
    from enkg_dist import localisation

    loc = settings.localisation
    if loc.kind == "none":
        return None
    geometry = forward.geometry() if loc.kind == "gaspari_cohn" or loc.large_scales is not None else None
    if loc.kind == "gaspari_cohn" and geometry is None:
        raise cfgmod.ConfigError(f"config error: {key}.localisation.kind: gaspari_cohn needs a geometry and this "
                                 "problem declares none (give problem.coordinates, or use kind: nice, which needs "
                                 "none)")
    if loc.large_scales is not None and geometry is None:
        raise cfgmod.ConfigError(f"config error: {key}.localisation.large_scales: needs the state's periodic grid and "
                                 "this problem declares none (give problem.coordinates)")
    options = {"raw_mean": loc.mean_update == "raw",
               "large_scales": None if loc.large_scales is None else (geometry.n, geometry.channels,
                                                                       loc.large_scales)}
    if loc.kind == "sec":
        return localisation.SEC(loc.alpha, loc.cutoff, **options)
    if loc.kind == "nice":
        return localisation.NICE(loc.delta, **options)
    return localisation.GaspariCohn(geometry, loc.radius, **options)


def _finish(cfg: cfgmod.RunConfig, built: Built) -> Built:
    """Wrap the forward model in failure injection when the config asks for it; make the localiser."""
    if cfg.chaos is not None:
        from enkg_dist.problems.chaos import ChaosForward

        c = cfg.chaos
        built.problem.forward = ChaosForward(built.problem.forward, c.fail_rate, c.modes, c.seed, c.hang_seconds,
                                             c.delay, c.log)
    settings = cfg.enkg if cfg.method == "enkg" else cfg.eki
    built.localiser = make_localiser(settings, built.problem.forward, cfg.method)
    return built
