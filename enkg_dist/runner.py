"""Builds problem, prior and evaluator from a RunConfig and runs EnKG (or EKI) in-process, writing a run directory."""

from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from enkg_dist import config as cfgmod
from enkg_dist import budget, devices, interrupt, package_version, rundir, rng, sampler, schedules, threads
from enkg_dist.backends import local_backend, ray_backend
from enkg_dist.evaluation import TooManyFailures
from enkg_dist.kalman import EnsembleCollapseError
from enkg_dist.metrics import ensemble_metrics, posterior_metrics, rank_histogram
from enkg_dist.phases import PhaseClock
from enkg_dist.plots import reconstruction_figure
from enkg_dist.priors import GaussianPrior, Prior
from enkg_dist.problems.base import InverseProblem
from enkg_dist.recording import RecordingEvaluator


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


STORE_NAME = "store.zarr"


def _store_path(cfg: cfgmod.RunConfig, run_dir: Path) -> str:
    return cfg.store.path or str(Path(run_dir) / STORE_NAME)


def _has_store(cfg: cfgmod.RunConfig, run_dir: Path) -> bool:
    """Whether the run's store exists (complete, or with a root its recovery copy rebuilds): RUN_DIR/store.zarr,
    or store.path (an fsspec URL too) for this run dir."""
    from enkg_dist.store import store_exists

    if cfg.store.path is not None and not (Path(run_dir) / "config.yaml").is_file():
        return False
    return store_exists(_store_path(cfg, run_dir))


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr, flush=True)


def prepare_run_dir(cfg: cfgmod.RunConfig, run_dir: str | Path | None) -> rundir.RunDirectory:
    """The run directory, made if needed and locked to this driver; `resuming` when it holds a store. A store whose
    creation was interrupted (it never committed anything) is removed and the run starts afresh. A fresh run's
    resolved config is written first (atomically)."""
    from enkg_dist import store as st

    path = rundir.choose(cfg.output_dir, cfg.name, run_dir)
    lock, created = rundir.make_and_lock(path, "--run-dir" if run_dir is not None else "output_dir")
    rd = rundir.RunDirectory(path, False, lock, created)
    if lock.note:
        _note(lock.note)
    try:
        where = _store_path(cfg, path)
        state = st.probe(where) if cfg.store.path is None or (path / "config.yaml").is_file() else "absent"
        if state == "half-created":
            st.discard_half_created(where)
            _note(f"run store {where}: its creation was interrupted before anything was committed; starting afresh")
        elif state == "damaged":
            raise rundir.RunDirError(f"run store {where}: its root metadata (zarr.json) and the recovery copy are both "
                                     "missing or unreadable, so it cannot be resumed; move it away to start afresh")
        rd.resuming = state in ("store", "root-damaged")
        if not rd.resuming:
            rundir.write_atomic(path / "config.yaml", cfgmod.dump(cfg))
    except OSError as e:
        rd.discard_if_unused(-1) if created else rd.close()
        raise rundir.RunDirError(f"run directory {path}: {rundir.fault_line(e)}") from None
    except BaseException:
        rd.discard_if_unused(-1) if created else rd.close()
        raise
    return rd


def check_observation(cfg: cfgmod.RunConfig, built: Built) -> None:
    """A one-line config error for an observation with NaN or inf values (before they reach the update)."""
    y = built.problem.y
    bad = int((~torch.isfinite(y)).sum())
    if bad:
        where = getattr(cfg.problem, "observation", None)
        raise cfgmod.ConfigError(f"config error: problem.observation: {bad} of {y.numel()} values"
                                 f"{f' in {where}' if where else ''} are not finite (NaN or inf)")


def reference_fields(built: Built) -> tuple[dict, dict]:
    """What a report compares with, stored in the run store at creation: the truth, the observation and the exact
    posterior's mean and variance (where known); and the observation's image shape."""
    pb, post = built.problem, built.posterior
    ref = {"truth": pb.x_true, "observation": pb.y}
    if post is not None:
        ref["posterior_mean"] = post.mean(pb.y.to(torch.float64))
        ref["posterior_var"] = post.variance()
    image = built.observation_image
    return ref, {"observation_image_shape": None if image is None else list(image.shape)}


def _steps_and_corrections(cfg: cfgmod.RunConfig) -> tuple[int, int, int]:
    """(J, steps, corrections per step) of the run, for the store's shape."""
    if cfg.method == "eki":
        return cfg.eki.ensemble_size, cfg.eki.iterations, 1
    return cfg.enkg.ensemble_size, cfg.enkg.num_steps, cfg.enkg.num_corrections


def open_store(cfg: cfgmod.RunConfig, out: Path, built: Built, resuming: bool, remote: bool = False):
    """Create the run's store, or open it for a resume after checking the config gives the same answer."""
    from enkg_dist.store import RunStore

    path = cfg.store.path or str(out / STORE_NAME)
    hardware = hardware_of(cfg, built, remote)
    if resuming:
        store = RunStore.open(path, "a", on_damage="fallback", max_pending=cfg.store.max_pending, defer_writes=True,
                              checkpoint_every=cfg.store.checkpoint_every)
        diff = store.config_diff(cfg.model_dump(mode="json"), ignore=cfgmod.RESUME_MAY_CHANGE)
        if diff:
            store.close()
            raise cfgmod.ConfigError(f"config error: cannot resume {out}: the config differs from the stored one in "
                                     f"{', '.join(diff)}")
        stored = store.attrs.get("meta", {}).get("hardware")
        if stored is not None and stored != hardware:
            warnings.warn(f"resuming on other hardware ({hardware} instead of {stored}): the result will equal an "
                          "uninterrupted run's only to round-off, not bit for bit", RuntimeWarning, stacklevel=2)
        text = cfgmod.dump(cfg)  # the keys that may change (resume --set) apply to later resumptions too
        if not (out / "config.yaml").is_file() or (out / "config.yaml").read_text() != text:
            rundir.write_atomic(out / "config.yaml", text)
        return store
    J, steps, K = _steps_and_corrections(cfg)
    reference, reference_attrs = reference_fields(built)
    return RunStore.create(path, config=cfg.model_dump(mode="json"), config_yaml=cfgmod.dump(cfg), J=J,
                           state_shape=built.problem.forward.state_shape, obs_size=built.problem.forward.obs_size,
                           num_steps=steps, num_corrections=K, dtype=cfg.dtype, full_every=cfg.store.full_every,
                           max_pending=cfg.store.max_pending, defer_writes=True,
                           checkpoint_every=cfg.store.checkpoint_every, reference=reference,
                           reference_attrs=reference_attrs,
                           meta={"hardware": hardware, "threads": thread_plan(cfg, remote),
                                 "version": package_version()})


def hardware_of(cfg: cfgmod.RunConfig, built: Built, remote: bool = False) -> dict:
    """The hardware kinds whose round-off the result carries: the driver's (Kalman update) and the prior's."""
    driver = devices.hardware_kind(resolve_device(cfg.device))
    prior = devices.hardware_kind(built.prior.device)
    if remote and cfg.prior.kind in ("learned", "python", "diffusers"):
        prior = prior_device(cfg, remote=True)  # each actor's kind (GPU model not known to the driver)
    return {"driver": driver, "prior": prior}


def forward_budget(cfg: cfgmod.RunConfig) -> dict:
    """Forward evaluations the run will make: total and sequential (per member)."""
    if cfg.method == "eki":
        return {"forward_evaluations": cfg.eki.ensemble_size * cfg.eki.iterations, "sequential": cfg.eki.iterations}
    e = cfg.enkg
    seq = len(schedules.guided_steps(e.num_steps, e.guidance_start, e.guidance_end)) * e.num_corrections
    return {"forward_evaluations": seq * e.ensemble_size, "sequential": seq}


def _posterior_metrics(built: Built, x: torch.Tensor, metrics: dict) -> dict:
    post, pb = built.posterior, built.problem
    if post is None or pb.x_true is None:
        return {}
    return posterior_metrics(metrics, pb.x_true, post.mean(pb.y.to(torch.float64)), post.variance())


def make_backend(cfg: cfgmod.RunConfig, built: Built, address: str | None = None):
    """The configured backend; `address` (from the command line) selects Ray."""
    ex = cfg.execution
    if on_ray(cfg, address):
        return ray_backend(built.prior, built.problem, ex, address, prior_device=cfg.prior.device
                           if cfg.prior.kind in ("learned", "python", "diffusers") else "cpu")
    return local_backend(built.prior, built.problem, ex.batch_size or 0)


def run(cfg: cfgmod.RunConfig, run_dir: str | Path | None = None, progress: bool = True,
        address: str | None = None, given=None) -> tuple[Path, dict]:
    """Run a job, or resume it when `run_dir` holds a store; returns the run directory and the final metrics.
    `given` (plugins.Given): Python objects in place of the factories of problem.forward / prior.denoiser
    (the library API, enkg_dist.api).

    The job is checked (memory, observation) and built before any run directory is made, so a job that cannot run
    leaves none behind; the directory is locked to this driver for the whole run (rundir.RunDirLock)."""
    device, dtype = resolve_device(cfg.device), getattr(torch, cfg.dtype)
    budget.check_memory(cfg)  # before anything the size of the ensemble is allocated
    built = build(cfg, remote=on_ray(cfg, address), given=given)
    check_observation(cfg, built)
    rd = prepare_run_dir(cfg, run_dir)
    try:
        with threads.budget(driver_threads(cfg)):
            return _run(cfg, rd, built, device, dtype, progress, address)
    except (cfgmod.ConfigError, rundir.RunDirError):
        rd.discard_if_unused(_committed(cfg, rd.path))  # a run directory this call made, with nothing in it
        raise
    except Exception as e:
        from enkg_dist.store import StoreError

        if not isinstance(e, (OSError, MemoryError, StoreError)):
            raise
        t = _committed(cfg, rd.path)
        raise rundir.RunStopped(f"{rundir.fault_line(e, str(rd.path))}; the run stopped with {t + 1} step(s) "
                                f"committed; once that is fixed, continue with: enkg-dist resume {rd.path}") from e
    finally:
        rd.close()


def driver_threads(cfg: cfgmod.RunConfig) -> int:
    """The driver's intra-op threads: execution.threads, else the CPUs free for it (threads.free_cpus)."""
    return cfg.execution.threads or threads.free_cpus()


def thread_plan(cfg: cfgmod.RunConfig, remote: bool) -> dict:
    """The thread budget of each kind of process, for the store's run info."""
    ex = cfg.execution
    plan = {"driver": threads.in_use()}
    if remote:
        plan["simulator_worker"] = ex.threads or threads.for_cpus(ex.worker_cpus)
        plan["prior_actor"] = ex.threads or threads.for_cpus(0 if ex.prior_gpus == 0 else 1)
    return plan


def _committed(cfg: cfgmod.RunConfig, run_dir: Path) -> int:
    from enkg_dist.store import committed_step_of

    return committed_step_of(_store_path(cfg, run_dir))


def _close_all(*closers) -> None:
    """Call every closer even when one fails. While an error propagates, a close error is dropped (the first error
    is the one to report); otherwise the first close error is raised."""
    failing, first = sys.exc_info()[1] is not None, None
    for close in closers:
        try:
            close()
        except Exception as e:  # noqa: BLE001 - collected, raised below
            first = first or e
    if first is not None and not failing:
        raise first


def _run(cfg: cfgmod.RunConfig, rd: rundir.RunDirectory, built: Built, device, dtype, progress: bool,
         address: str | None) -> tuple[Path, dict]:
    out, resuming = rd.path, rd.resuming
    pb = built.problem
    y = pb.y.to(device=device, dtype=dtype)
    store = open_store(cfg, out, built, resuming, on_ray(cfg, address))
    backend = make_backend(cfg, built, address)
    interrupt.rearm()  # ray.init replaces the SIGTERM handler
    clock = PhaseClock()  # where each step's time goes, recorded in the store's timings
    evaluator = RecordingEvaluator(interrupt.checked(backend.forward), cfg.execution.max_failed_fraction,
                                   store=store)
    start, x = store.resume_state()
    start += 1
    x = None if x is None else torch.from_numpy(np.array(x)).to(device=device, dtype=dtype)
    t0 = time.perf_counter()
    try:
        loop = _run_enkg if cfg.method == "enkg" else _run_eki
        x = loop(cfg, built, backend, evaluator, store, y, dtype, device, start, x, progress, clock)
        history = _history(store)
    except (TooManyFailures, EnsembleCollapseError) as e:
        rundir.write_atomic(out / "stopped.json", json.dumps({"reason": str(e), "step": evaluator.step,
                                                              "failures": evaluator.failures[:100]}))
        raise
    except interrupt.Interrupted as e:
        store.flush()  # the queued steps, each with its commit marker last
        e.step, e.run_dir = store.committed_step + 1, out
        raise
    finally:
        _close_all(evaluator.close, store.close, backend.close)  # store.close waits for the queued commits
    wall = time.perf_counter() - t0
    x = x.detach().to("cpu", torch.float64)
    truth = None if pb.x_true is None else pb.x_true.to(torch.float64)
    metrics = ensemble_metrics(x, truth)
    metrics.update(_posterior_metrics(built, x, metrics))
    if truth is not None:
        metrics["rank_histogram"] = rank_histogram(x, truth)
    metrics.update({"forward_evaluations": evaluator.n_evals, "failed_evaluations": evaluator.n_failed,
                    "skipped_evaluations": evaluator.skipped, "resumed_from_step": start - 1 if resuming else None,
                    "wall_seconds": wall, "method": cfg.method, "version": package_version(), "backend": backend.name,
                    **backend.stats(),
                    "threads": {"driver": threads.in_use(), **backend.threads()}})
    mean, std = x.mean(0), x.std(0)
    rundir.replace_atomic(out / "ensemble.pt", lambda tmp: torch.save({"particles": x, "mean": mean, "std": std}, tmp))
    rundir.write_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
    rundir.write_atomic(out / "history.json", json.dumps(history, indent=1))
    rundir.replace_atomic(out / "reconstruction.png", lambda tmp: reconstruction_figure(
        tmp, truth, built.observation_image, mean, std, spread_skill=metrics.get("spread_skill"),
        title=f"{cfg.name}: rel. L2 of mean {metrics.get('rel_l2_mean', float('nan')):.3f}"))
    return out, metrics


def _history(store) -> list[dict]:
    """Per committed step: sigma, and per correction the misfit and step weight (from the open store, flushed)."""
    store.flush()
    sigma, misfit, weight = store.read("sigma"), store.read("misfit"), store.read("weight")
    return [{"step": i, "sigma": float(sigma[i]), "misfit": [float(v) for v in misfit[i] if v == v],
             "weight": [float(v) for v in weight[i] if v == v]} for i in range(len(sigma))]


def resume(run_dir: str | Path, progress: bool = True, address: str | None = None,
           overrides: list[str] | None = None, given=None) -> tuple[Path, dict]:
    """Continue the run in `run_dir` from its last committed step, with its stored config and `overrides` of the
    keys that may change between resumptions (config.RESUME_MAY_CHANGE; others are refused, naming them). A run
    directory whose store was never created, or whose creation was interrupted, starts afresh with its config."""
    cfgmod.check_resume_overrides(overrides or [])
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise cfgmod.ConfigError(f"config error: {run_dir} is not a run directory (no config.yaml, or no store at "
                                 f"{STORE_NAME})")
    try:
        cfg = cfgmod.load_config(path, overrides or [])
    except cfgmod.ConfigError:  # a damaged config.yaml: the store keeps the resolved config as it was written
        from enkg_dist.store import root_attrs

        text = root_attrs(Path(run_dir) / STORE_NAME).get("config_yaml")
        if not text:
            raise
        _note(f"{path} is unreadable; using the config stored in the run store")
        rundir.write_atomic(path, text)
        cfg = cfgmod.load_config(path, overrides or [])
    return run(cfg, run_dir, progress, address, given)


class _StepHooks:
    """What the run does around each step of the sampler's loop (sampler.enkg_sample / sampler.eki): before a step
    the evaluator learns it (and replays the member outputs a previous process recorded); after it the member records
    and the step are committed to the store (a step boundary: a safe point to stop on an interrupt), the backend
    exports its metrics, and the progress bar moves."""

    def __init__(self, store, evaluator, backend, bar, clock: PhaseClock):
        self.store, self.evaluator, self.backend, self.bar, self.clock = store, evaluator, backend, bar, clock
        self.t_run = self.t_step = time.perf_counter()
        self.handed_over = 0.0  # seconds the previous commit blocked (a full writer queue): counted in this step

    def before_step(self, i: int) -> None:
        self.t_step = time.perf_counter()
        self.clock.start_step()
        self.evaluator.begin_step(i, skip_done=(i <= self.store.records_until))  # replayed from the records

    def _commit(self, i: int, x: torch.Tensor, sigma: float, infos) -> None:
        """Member records first, then the step (the store writes its commit marker last)."""
        with self.clock.phase("store"):
            self.evaluator.wait_records()
        self.clock.seconds["store"] += self.handed_over
        t = time.perf_counter()
        self.store.commit_step(i, x.detach().cpu(), {"sigma": sigma, "misfit": [u.misfit for u in infos],
                                                     "weight": [u.weight for u in infos],
                                                     "timings": self.clock.timings(t - self.t_step)},
                               copy=False)
        self.handed_over = time.perf_counter() - t
        interrupt.check()  # a step boundary: a safe point to stop

    def after_enkg_step(self, rec: sampler.StepRecord) -> None:
        infos, ev = [c.info for c in rec.corrections], self.evaluator
        self._commit(rec.i, rec.x, rec.sigma, infos)
        self.backend.on_step(rec.i, time.perf_counter() - self.t_step)
        rate = ev.n_evals / max(time.perf_counter() - self.t_run, 1e-9)
        self.bar.update(1)
        self.bar.set_postfix(evals=ev.n_evals, failed=ev.n_failed, evals_per_s=f"{rate:.3g}",
                             misfit=f"{infos[-1].misfit:.3g}" if infos else "-")

    def after_eki_iteration(self, n: int, x: torch.Tensor, info) -> None:
        self._commit(n, x, float("nan"), [info])
        self.bar.update(1)
        self.bar.set_postfix(evals=self.evaluator.n_evals, misfit=f"{info.misfit:.3g}")


def _run_enkg(cfg, built, backend, evaluator, store, y, dtype, device, start, x, progress, clock):
    """EnKG from step `start` by the sampler's own loop, committing every step through the hooks."""
    e, pb = cfg.enkg, built.problem
    scfg = e.sampler_config()
    if x is None:
        x = sampler.initial_particles(cfg.seed, e.ensemble_size, pb.forward.state_shape, scfg.sigma_max, dtype)
        x = x.to(device)
    with tqdm(total=scfg.num_steps, initial=start, desc="EnKG steps", unit="step", disable=not progress) as bar:
        hooks = _StepHooks(store, evaluator, backend, bar, clock)
        maps = sampler.TimedMaps(sampler.maps_of(backend.denoise), lambda: clock.phase("denoise"))
        return sampler.enkg_sample(maps, clock.wrap("forward", evaluator), x, y, pb.Gamma, scfg, cfg.seed,
                                   hooks.after_enkg_step, start, built.localiser, before_step=hooks.before_step)


def _run_eki(cfg, built, backend, evaluator, store, y, dtype, device, start, x, progress, clock):
    """Plain or Tikhonov EKI from a prior ensemble by the sampler's own loop, committing every iteration."""
    k, pb = cfg.eki, built.problem
    prior: GaussianPrior = built.prior  # build() refuses EKI with a prior that is not Gaussian
    if x is None:
        z = rng.member_normal(cfg.seed, rng.INIT, range(k.ensemble_size), pb.forward.state_shape, dtype=dtype)
        x = prior.sample(z.to(device))
    tik = (prior.mean, prior.whiten) if k.tikhonov else None
    # the data-misfit controller's clock: the steps taken so far (stored as each iteration's weight)
    t = float(np.nansum(store.read("weight")[:start, 0])) if start > 0 and k.dt == "auto" else 0.0
    with tqdm(total=k.iterations, initial=start, desc="EKI iterations", unit="it", disable=not progress) as bar:
        hooks = _StepHooks(store, evaluator, backend, bar, clock)
        return sampler.eki(clock.wrap("forward", evaluator), x, y, pb.Gamma, k.iterations, k.dt, cfg.seed, k.stochastic,
                           tik, hooks.after_eki_iteration, start, built.localiser, (k.inflation, k.inflation_factor), t,
                           before_step=hooks.before_step)
