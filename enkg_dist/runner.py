"""Runs EnKG (or EKI) from a RunConfig, in-process or on Ray, writing a run directory: what `assembly` builds, the
backend, the evaluator, the store and the loop's hooks. `assembly`'s builders are importable from here as well."""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from enkg_dist import config as cfgmod
from enkg_dist import budget, devices, interrupt, package_version, rundir, rng, sampler, schedules, threads
# build, make_prior, prior_device, devices_plan: also runner.<name> for the tests and benchmarks
from enkg_dist.assembly import Built, build, devices_plan, make_prior, on_ray, prior_device, resolve_device  # noqa
from enkg_dist.backends import local_backend, ray_backend
from enkg_dist.evaluation import TooManyFailures
from enkg_dist.kalman import EnsembleCollapseError
from enkg_dist.metrics import ensemble_metrics, posterior_metrics, rank_histogram
from enkg_dist.phases import PhaseClock
from enkg_dist.plots import reconstruction_figure
from enkg_dist.priors import GaussianPrior
from enkg_dist.recording import RecordingEvaluator


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
