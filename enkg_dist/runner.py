"""Builds problem, prior and evaluator from a RunConfig and runs EnKG (or EKI) in-process, writing a run directory."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from enkg_dist import config as cfgmod
from enkg_dist import interrupt, rng, sampler, schedules
from enkg_dist.backends import TooManyFailures, local_backend, ray_backend
from enkg_dist.plots import reconstruction_figure
from enkg_dist.metrics import ensemble_metrics, posterior_metrics, rank_histogram
from enkg_dist.problems.base import InverseProblem
from enkg_dist.recording import RecordingEvaluator


@dataclass
class Built:
    """Everything a run needs, built from the config."""

    problem: InverseProblem
    prior: object  # has denoise(x, sigma), state_shape; Gaussian priors also sample/whiten
    posterior: object | None = None  # exact posterior where one exists
    observation_image: torch.Tensor | None = None


def resolve_device(name: str) -> torch.device:
    """The run's device (`device: auto/cpu/cuda`), a one-line config error when it is not there."""
    from enkg_dist.priors.learned import resolve_device as resolve

    try:
        return resolve(name)
    except ValueError as e:
        raise cfgmod.ConfigError(f"config error: device: {e}") from None


def make_prior(pr, n: int, zero_mean_mode: bool = False):
    """The prior of a config on the n x n grid: a Gaussian field, or a learned denoiser loaded from its checkpoint."""
    if pr.kind == "gaussian":
        from enkg_dist.priors.gaussian import GaussianFieldPrior

        return GaussianFieldPrior.matern_like(n, pr.alpha, pr.tau, pr.std, zero_mean_mode=zero_mean_mode)
    if pr.kind == "gaussian_fit":
        return _fitted_prior(pr, n)
    from enkg_dist.priors.learned import LearnedPrior, resolve_device

    try:
        resolve_device(pr.device)
    except ValueError as e:
        raise cfgmod.ConfigError(f"config error: prior.device: {e}") from None
    try:
        return LearnedPrior.from_checkpoint(pr.checkpoint, device=pr.device, precision=pr.dtype,
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


def build(cfg: cfgmod.RunConfig) -> Built:
    """Problem, prior and exact posterior (when known) for a config."""
    from enkg_dist.problems import linear_gaussian

    p, pr = cfg.problem, cfg.prior
    if pr.kind != "gaussian" and p.kind == "linear_gaussian":
        raise cfgmod.ConfigError(f"config error: prior.kind: {pr.kind!r} does not apply to the linear-Gaussian "
                                 "problem (its exact posterior needs its own Gaussian prior)")
    if pr.kind == "learned" and cfg.method == "eki":
        raise cfgmod.ConfigError("config error: prior.kind: EKI draws its ensemble from a Gaussian prior; a learned "
                                 "prior needs method enkg")
    if p.kind == "linear_gaussian":
        problem, prior, post = linear_gaussian.make_problem(
            n=p.n, k=p.k, blur=p.blur, alpha=pr.alpha, tau=pr.tau, std=pr.std, noise_std=p.noise_std,
            truth_seed=p.truth_seed)
        obs = problem.y.reshape(p.n // p.k, p.n // p.k)
        return _with_chaos(cfg, Built(problem, prior, post, obs))
    if p.kind == "navier_stokes":
        from enkg_dist.problems import navier_stokes as ns

        problem = ns.make_problem(n=p.n, k=p.k, noise_std=p.noise_std, T=p.T, truth=p.truth_seed, seed=p.truth_seed,
                                  spinup=p.spinup, Re=p.Re, dealias=p.dealias, mode=p.step_mode,
                                  max_steps=p.max_steps, chunk=p.member_chunk)
        prior = make_prior(pr, p.n, zero_mean_mode=True)
        return _with_chaos(cfg, Built(problem, prior, None, problem.y.reshape(p.n // p.k, p.n // p.k)))
    if p.kind == "external":
        return _with_chaos(cfg, _build_external(p, pr))
    raise cfgmod.ConfigError(f"config error: problem.kind: {p.kind!r} is not supported")  # pragma: no cover


def _load_npy(path: str, what: str) -> torch.Tensor:
    try:
        return torch.from_numpy(np.load(path, allow_pickle=False)).to(torch.float64)
    except (OSError, ValueError) as e:
        raise cfgmod.ConfigError(f"config error: problem.{what}: cannot read {path!r} ({e})") from None


def _build_external(p, pr) -> Built:
    """An external program as G, the prior on (1, n, n), y from a file or a synthetic twin."""
    from enkg_dist.noise import NoiseCovariance
    from enkg_dist.problems.base import safe_evaluate
    from enkg_dist.problems.external import ExternalProgramForward

    try:
        command = [sys.executable if a == "{python}" else a for a in p.command]  # the Python running enkg-dist
        G = ExternalProgramForward(command, (1, p.n, p.n), p.obs_size, launcher=p.launcher, ranks=p.ranks,
                                   timeout=p.timeout, scratch_dir=p.scratch_dir, max_parallel=p.max_parallel,
                                   env=dict(p.env))
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise cfgmod.ConfigError(f"config error: problem.command: {e}") from None
    prior = make_prior(pr, p.n)
    truth = None if p.truth is None else _load_npy(p.truth, "truth").reshape(1, p.n, p.n)
    if p.observation is not None:
        y = _load_npy(p.observation, "observation").reshape(-1)
    else:  # synthetic twin: truth from the prior, y = G(truth) + noise
        if truth is None and not hasattr(prior, "sample"):
            raise cfgmod.ConfigError("config error: problem.observation: a synthetic twin draws its truth from a "
                                     "Gaussian prior; with a learned prior give problem.observation or problem.truth")
        if truth is None:
            truth = prior.sample(rng.member_normal(p.truth_seed, rng.DATA, [0], (1, p.n, p.n)))[0]
        res = safe_evaluate(G, truth[None])
        if not bool(res.ok[0]):
            raise RuntimeError(f"the simulator failed on the synthetic truth: {res.reasons[0]}")
        y = res.psi[0] + p.noise_std * rng.member_normal(p.truth_seed, rng.OBS_NOISE, [0], (p.obs_size,))[0]
    if y.numel() != p.obs_size:
        raise cfgmod.ConfigError(f"config error: problem.observation: has {y.numel()} values, obs_size is "
                                 f"{p.obs_size}")
    problem = InverseProblem("external", G, y, NoiseCovariance.scalar(p.noise_std**2, p.obs_size), truth)
    side = int(round(p.obs_size**0.5))
    return Built(problem, prior, None, y.reshape(side, side) if side * side == p.obs_size else None)


def _with_chaos(cfg: cfgmod.RunConfig, built: Built) -> Built:
    """Wrap the forward model in failure injection when the config asks for it."""
    if cfg.chaos is not None:
        from enkg_dist.problems.chaos import ChaosForward

        c = cfg.chaos
        built.problem.forward = ChaosForward(built.problem.forward, c.fail_rate, c.modes, c.seed, c.hang_seconds,
                                             c.delay, c.log)
    return built


STORE_NAME = "store.zarr"


def _has_store(cfg: cfgmod.RunConfig, run_dir: Path) -> bool:
    """Whether the run's store exists: RUN_DIR/store.zarr, or store.path (an fsspec URL too) for this run dir."""
    from enkg_dist.store import store_exists

    if cfg.store.path is None:
        return (run_dir / STORE_NAME).exists()
    return (run_dir / "config.yaml").is_file() and store_exists(cfg.store.path)


def prepare_run_dir(cfg: cfgmod.RunConfig, run_dir: str | Path | None) -> tuple[Path, bool]:
    """(directory, resuming): an existing run directory with a store is resumed; else a fresh one is made with
    the resolved config written first."""
    if run_dir is not None and _has_store(cfg, Path(run_dir)):
        return Path(run_dir), True
    if run_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        base = Path(cfg.output_dir) / f"{cfg.name}-{stamp}"
        run_dir, i = base, 1
        while run_dir.exists():
            run_dir, i = Path(f"{base}-{i}"), i + 1
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfgmod.dump(cfg))
    return run_dir, False


def _steps_and_corrections(cfg: cfgmod.RunConfig) -> tuple[int, int, int]:
    """(J, steps, corrections per step) of the run, for the store's shape."""
    if cfg.method == "eki":
        return cfg.eki.ensemble_size, cfg.eki.iterations, 1
    return cfg.enkg.ensemble_size, cfg.enkg.num_steps, cfg.enkg.num_corrections


def open_store(cfg: cfgmod.RunConfig, out: Path, built: Built, resuming: bool):
    """Create the run's store, or open it for a resume after checking the config gives the same answer."""
    from enkg_dist.store import RunStore

    path = cfg.store.path or str(out / STORE_NAME)
    if resuming:
        store = RunStore.open(path, "a", on_damage="fallback", max_pending=cfg.store.max_pending, defer_writes=True,
                              checkpoint_every=cfg.store.checkpoint_every)
        diff = store.config_diff(cfg.model_dump(mode="json"), ignore=cfgmod.RESUME_MAY_CHANGE)
        if diff:
            store.close()
            raise cfgmod.ConfigError(f"config error: cannot resume {out}: the config differs from the stored one in "
                                     f"{', '.join(diff)}")
        return store
    J, steps, K = _steps_and_corrections(cfg)
    return RunStore.create(path, config=cfg.model_dump(mode="json"), config_yaml=cfgmod.dump(cfg), J=J,
                           state_shape=built.problem.forward.state_shape, obs_size=built.problem.forward.obs_size,
                           num_steps=steps, num_corrections=K, dtype=cfg.dtype, full_every=cfg.store.full_every,
                           max_pending=cfg.store.max_pending, defer_writes=True,
                           checkpoint_every=cfg.store.checkpoint_every)


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
    if ex.backend == "ray" or address:
        return ray_backend(built.prior, built.problem, ex, address)
    return local_backend(built.prior, built.problem, ex.batch_size or 0)


def run(cfg: cfgmod.RunConfig, run_dir: str | Path | None = None, progress: bool = True,
        address: str | None = None) -> tuple[Path, dict]:
    """Run a job, or resume it when `run_dir` holds a store; returns the run directory and the final metrics."""
    device, dtype = resolve_device(cfg.device), getattr(torch, cfg.dtype)
    out, resuming = prepare_run_dir(cfg, run_dir)
    built = build(cfg)
    pb = built.problem
    y = pb.y.to(device=device, dtype=dtype)
    store = open_store(cfg, out, built, resuming)
    backend = make_backend(cfg, built, address)
    interrupt.rearm()  # ray.init replaces the SIGTERM handler
    evaluator = RecordingEvaluator(interrupt.checked(backend.forward), cfg.execution.max_failed_fraction,
                                   store=store)
    start, x = store.resume_state()
    start += 1
    x = None if x is None else torch.from_numpy(np.array(x)).to(device=device, dtype=dtype)
    t0 = time.perf_counter()
    try:
        loop = _run_enkg if cfg.method == "enkg" else _run_eki
        x = loop(cfg, built, backend, evaluator, store, y, dtype, device, start, x, progress)
    except TooManyFailures as e:
        (out / "stopped.json").write_text(json.dumps({"reason": str(e), "step": evaluator.step,
                                                      "failures": evaluator.failures[:100]}))
        raise
    except interrupt.Interrupted as e:
        store.flush()  # the queued steps, each with its commit marker last
        e.step, e.run_dir = store.committed_step + 1, out
        raise
    finally:
        evaluator.close()
        store.close()  # waits for the queued commits: nothing computed is lost
        backend.close()
    wall = time.perf_counter() - t0
    x = x.detach().to("cpu", torch.float64)
    truth = None if pb.x_true is None else pb.x_true.to(torch.float64)
    metrics = ensemble_metrics(x, truth)
    metrics.update(_posterior_metrics(built, x, metrics))
    if truth is not None:
        metrics["rank_histogram"] = rank_histogram(x, truth)
    metrics.update({"forward_evaluations": evaluator.n_evals, "failed_evaluations": evaluator.n_failed,
                    "skipped_evaluations": evaluator.skipped, "resumed_from_step": start - 1 if resuming else None,
                    "wall_seconds": wall, "method": cfg.method, "backend": backend.name, **backend.stats()})
    mean, std = x.mean(0), x.std(0)
    torch.save({"particles": x, "mean": mean, "std": std}, out / "ensemble.pt")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "history.json").write_text(json.dumps(_history(cfg.store.path or str(out / STORE_NAME)), indent=1))
    reconstruction_figure(out / "reconstruction.png", truth, built.observation_image, mean, std,
                          title=f"{cfg.name}: rel. L2 of mean {metrics.get('rel_l2_mean', float('nan')):.3f}")
    return out, metrics


def _history(path: str) -> list[dict]:
    """Per committed step: sigma, and per correction the misfit and step weight (from the store)."""
    from enkg_dist.store import RunStore

    with RunStore.open(path, "r", verify=False) as st:
        sigma, misfit, weight = st.read("sigma"), st.read("misfit"), st.read("weight")
    return [{"step": i, "sigma": float(sigma[i]), "misfit": [float(v) for v in misfit[i] if v == v],
             "weight": [float(v) for v in weight[i] if v == v]} for i in range(len(sigma))]


def resume(run_dir: str | Path, progress: bool = True, address: str | None = None,
           overrides: list[str] | None = None) -> tuple[Path, dict]:
    """Continue the run in `run_dir` from its last committed step, with its stored config."""
    path = Path(run_dir) / "config.yaml"
    cfg = cfgmod.load_config(path, overrides or []) if path.is_file() else None
    if cfg is None or not _has_store(cfg, Path(run_dir)):
        where = STORE_NAME if cfg is None or cfg.store.path is None else cfg.store.path
        raise cfgmod.ConfigError(f"config error: {run_dir} is not a run directory (no config.yaml, or no store at "
                                 f"{where})")
    return run(cfg, run_dir, progress, address)


def _commit(store, evaluator, i: int, x: torch.Tensor, sigma: float, infos, t_step: float) -> None:
    """Member records first, then the step (the store writes its commit marker last)."""
    evaluator.wait_records()
    store.commit_step(i, x.detach().cpu(), {"sigma": sigma, "misfit": [u.misfit for u in infos],
                                            "weight": [u.weight for u in infos],
                                            "timings": {"total": time.perf_counter() - t_step}}, copy=False)
    interrupt.check()  # a step boundary: a safe point to stop


def _run_enkg(cfg, built, backend, evaluator, store, y, dtype, device, start, x, progress):
    """The EnKG step loop from `start`, committing every step."""
    e, pb = cfg.enkg, built.problem
    scfg = e.sampler_config()
    sigmas = scfg.sigmas()
    if x is None:
        x = sampler.initial_particles(cfg.seed, e.ensemble_size, pb.forward.state_shape, scfg.sigma_max, dtype)
        x = x.to(device)
    with tqdm(total=scfg.num_steps, initial=start, desc="EnKG steps", unit="step", disable=not progress) as bar:
        t_run = time.perf_counter()
        for i in range(start, scfg.num_steps):
            t_step = time.perf_counter()
            evaluator.begin_step(i, skip_done=(i <= store.records_until))  # replayed from the records
            rec = sampler.enkg_step(backend.denoise, evaluator, x, i, y, pb.Gamma, scfg, cfg.seed, sigmas)
            x = rec.x
            infos = [c.info for c in rec.corrections]
            _commit(store, evaluator, i, x, rec.sigma, infos, t_step)
            backend.on_step(i, time.perf_counter() - t_step)
            rate = evaluator.n_evals / max(time.perf_counter() - t_run, 1e-9)
            bar.update(1)
            bar.set_postfix(evals=evaluator.n_evals, failed=evaluator.n_failed, evals_per_s=f"{rate:.3g}",
                            misfit=f"{infos[-1].misfit:.3g}" if infos else "-")
    return x


def _run_eki(cfg, built, backend, evaluator, store, y, dtype, device, start, x, progress):
    """Plain or Tikhonov EKI from a prior ensemble, committing every iteration."""
    k, pb = cfg.eki, built.problem
    if x is None:
        z = rng.member_normal(cfg.seed, rng.INIT, range(k.ensemble_size), pb.forward.state_shape, dtype=dtype)
        x = built.prior.sample(z.to(device))
    tik = (built.prior.mean, built.prior.whiten) if k.tikhonov else None
    with tqdm(total=k.iterations, initial=start, desc="EKI iterations", unit="it", disable=not progress) as bar:
        for n in range(start, k.iterations):
            t_step = time.perf_counter()
            evaluator.begin_step(n, skip_done=(n <= store.records_until))
            x, info = sampler.eki_step(evaluator, x, n, y, pb.Gamma, k.dt, cfg.seed, k.stochastic, tik)
            _commit(store, evaluator, n, x, float("nan"), [info], t_step)
            bar.update(1)
            bar.set_postfix(evals=evaluator.n_evals, misfit=f"{info.misfit:.3g}")
    return x
