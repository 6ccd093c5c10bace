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
from enkg_dist import rng, sampler, schedules
from enkg_dist.backends import Evaluator, TooManyFailures, local_backend, ray_backend
from enkg_dist.plots import reconstruction_figure
from enkg_dist.problems.base import InverseProblem, ensemble_metrics, relative_l2


@dataclass
class Built:
    """Everything a run needs, built from the config."""

    problem: InverseProblem
    prior: object  # has denoise(x, sigma), state_shape; Gaussian priors also sample/whiten
    posterior: object | None = None  # exact posterior where one exists
    observation_image: torch.Tensor | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise cfgmod.ConfigError("config error: device: 'cuda' was asked but no CUDA device is available")
    return torch.device(name)


def build(cfg: cfgmod.RunConfig) -> Built:
    """Problem, prior and exact posterior (when known) for a config."""
    from enkg_dist.problems import linear_gaussian

    p, pr = cfg.problem, cfg.prior
    if p.kind == "linear_gaussian":
        problem, prior, post = linear_gaussian.make_problem(
            n=p.n, k=p.k, blur=p.blur, alpha=pr.alpha, tau=pr.tau, std=pr.std, noise_std=p.noise_std,
            truth_seed=p.truth_seed)
        obs = problem.y.reshape(p.n // p.k, p.n // p.k)
        return _with_chaos(cfg, Built(problem, prior, post, obs))
    if p.kind == "external":
        return _with_chaos(cfg, _build_external(p, pr))
    raise cfgmod.ConfigError(f"config error: problem.kind: {p.kind!r} is not supported")  # pragma: no cover


def _load_npy(path: str, what: str) -> torch.Tensor:
    try:
        return torch.from_numpy(np.load(path, allow_pickle=False)).to(torch.float64)
    except (OSError, ValueError) as e:
        raise cfgmod.ConfigError(f"config error: problem.{what}: cannot read {path!r} ({e})") from None


def _build_external(p, pr) -> Built:
    """An external program as G, the Gaussian prior on (1, n, n), y from a file or a synthetic twin."""
    from enkg_dist.noise import NoiseCovariance
    from enkg_dist.priors.gaussian import GaussianFieldPrior
    from enkg_dist.problems.base import safe_evaluate
    from enkg_dist.problems.external import ExternalProgramForward

    try:
        command = [sys.executable if a == "{python}" else a for a in p.command]  # the Python running enkg-dist
        G = ExternalProgramForward(command, (1, p.n, p.n), p.obs_size, launcher=p.launcher, ranks=p.ranks,
                                   timeout=p.timeout, scratch_dir=p.scratch_dir, max_parallel=p.max_parallel,
                                   env=dict(p.env))
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise cfgmod.ConfigError(f"config error: problem.command: {e}") from None
    prior = GaussianFieldPrior.matern_like(p.n, pr.alpha, pr.tau, pr.std)
    truth = None if p.truth is None else _load_npy(p.truth, "truth").reshape(1, p.n, p.n)
    if p.observation is not None:
        y = _load_npy(p.observation, "observation").reshape(-1)
    else:  # synthetic twin: truth from the prior, y = G(truth) + noise
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
                                             c.delay)
    return built


def new_run_dir(cfg: cfgmod.RunConfig, run_dir: str | Path | None) -> Path:
    """A fresh directory under output_dir named after the job, with the resolved config written first."""
    if run_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        base = Path(cfg.output_dir) / f"{cfg.name}-{stamp}"
        run_dir, i = base, 1
        while run_dir.exists():
            run_dir, i = Path(f"{base}-{i}"), i + 1
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfgmod.dump(cfg))
    return run_dir


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
    m_post = post.mean(pb.y.to(torch.float64))
    bayes = float(relative_l2(m_post[None], pb.x_true.to(torch.float64))[0])
    post_std = float(post.variance().mean().sqrt())
    return {
        "posterior_mean_rel_l2": bayes,
        "ratio_to_bayes": metrics["rel_l2_mean"] / bayes,
        "posterior_spread": post_std,
        "spread_ratio": metrics["spread"] / post_std,
    }


def make_backend(cfg: cfgmod.RunConfig, built: Built, address: str | None = None):
    """The configured backend; `address` (from the command line) selects Ray."""
    ex = cfg.execution
    if ex.backend == "ray" or address:
        return ray_backend(built.prior, built.problem, ex, address)
    return local_backend(built.prior, built.problem)


def run(cfg: cfgmod.RunConfig, run_dir: str | Path | None = None, progress: bool = True,
        address: str | None = None) -> tuple[Path, dict]:
    """Run a job; returns the run directory and the metrics written to it."""
    device, dtype = resolve_device(cfg.device), getattr(torch, cfg.dtype)
    out = new_run_dir(cfg, run_dir)
    built = build(cfg)
    pb = built.problem
    y = pb.y.to(device=device, dtype=dtype)
    backend = make_backend(cfg, built, address)
    evaluator = Evaluator(backend.forward, cfg.execution.max_failed_fraction)
    history: list[dict] = []
    t0 = time.perf_counter()
    try:
        if cfg.method == "enkg":
            x = _run_enkg(cfg, built, backend, evaluator, y, dtype, device, history, progress)
        else:
            x = _run_eki(cfg, built, evaluator, y, dtype, device, history, progress)
    except TooManyFailures as e:
        (out / "history.json").write_text(json.dumps(history, indent=1))
        (out / "stopped.json").write_text(json.dumps({"reason": str(e), "failures": evaluator.failures[:100]}))
        raise
    finally:
        backend.close()
    wall = time.perf_counter() - t0
    x = x.detach().to("cpu", torch.float64)
    truth = None if pb.x_true is None else pb.x_true.to(torch.float64)
    metrics = ensemble_metrics(x, truth)
    metrics.update(_posterior_metrics(built, x, metrics))
    metrics.update({"forward_evaluations": evaluator.n_evals, "failed_evaluations": evaluator.n_failed,
                    "wall_seconds": wall, "method": cfg.method, "backend": backend.name, **backend.stats()})
    mean, std = x.mean(0), x.std(0)
    torch.save({"particles": x, "mean": mean, "std": std}, out / "ensemble.pt")
    (out / "history.json").write_text(json.dumps(history, indent=1))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    reconstruction_figure(out / "reconstruction.png", truth, built.observation_image, mean, std,
                          title=f"{cfg.name}: rel. L2 of mean {metrics.get('rel_l2_mean', float('nan')):.3f}")
    return out, metrics


def _run_enkg(cfg, built, backend, evaluator, y, dtype, device, history, progress):
    """The EnKG step loop with progress and per-correction history."""
    e, pb = cfg.enkg, built.problem
    scfg = e.sampler_config()
    sigmas = scfg.sigmas()
    x = sampler.initial_particles(cfg.seed, e.ensemble_size, pb.forward.state_shape, scfg.sigma_max, dtype)
    x = x.to(device)
    with tqdm(total=scfg.num_steps, desc="EnKG steps", unit="step", disable=not progress) as bar:
        t_run = time.perf_counter()
        for i in range(scfg.num_steps):
            t_step = time.perf_counter()
            rec = sampler.enkg_step(backend.denoise, evaluator, x, i, y, pb.Gamma, scfg, cfg.seed, sigmas)
            x = rec.x
            backend.on_step(i, time.perf_counter() - t_step)
            for c in rec.corrections:
                history.append({"step": rec.i, "k": c.k, "sigma": rec.sigma, "n_ode": c.n_ode,
                                "weight": c.info.weight, "misfit": c.info.misfit, "n_ok": c.info.n_ok,
                                "guarded": c.info.guarded})
            bar.update(1)
            rate = evaluator.n_evals / max(time.perf_counter() - t_run, 1e-9)
            bar.set_postfix(evals=evaluator.n_evals, failed=evaluator.n_failed, evals_per_s=f"{rate:.3g}",
                            misfit=f"{history[-1]['misfit']:.3g}" if history else "-")
    return x


def _run_eki(cfg, built, evaluator, y, dtype, device, history, progress):
    """Plain or Tikhonov EKI from a prior ensemble."""
    k, pb = cfg.eki, built.problem
    z = rng.member_normal(cfg.seed, rng.INIT, range(k.ensemble_size), pb.forward.state_shape, dtype=dtype)
    x0 = built.prior.sample(z.to(device))
    tik = (built.prior.mean, built.prior.whiten) if k.tikhonov else None
    with tqdm(total=k.iterations, desc="EKI iterations", unit="it", disable=not progress) as bar:

        def on_iter(n, x, info):
            history.append({"iteration": n, "misfit": info.misfit, "n_ok": info.n_ok})
            bar.update(1)
            bar.set_postfix(evals=evaluator.n_evals, misfit=f"{info.misfit:.3g}")

        return sampler.eki(evaluator, x0, y, pb.Gamma, k.iterations, k.dt, cfg.seed, k.stochastic, tik, on_iter)
