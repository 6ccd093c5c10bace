"""The library API: EnKG runs from notebooks and scripts, with Python objects or job files.

    import enkg_dist.api as enkg

    result = enkg.run(forward=G, denoiser=D, y=y, noise=0.1, state_shape=(1, 32, 32),
                      config={"enkg": {"ensemble_size": 64}}, run_dir="runs/mine", backend="local")
    result.particles, result.mean, result.std, result.metrics, result.run_dir
    enkg.resume("runs/mine", forward=G, denoiser=D)     # after a stop: the uninterrupted run's ensemble
    enkg.report("runs/mine")                            # the figures of `enkg-dist report`

A run made here is an ordinary run directory (config.yaml, store.zarr, ensemble.pt, metrics.json): the same store,
resume, `enkg-dist inspect` and report as the command line, which calls `run` and `resume` here (one path).

- `forward`: G(x) -> (B, obs_size) on a batch of states x (B, *state_shape) (torch tensors; numpy arrays with
  `config={"problem": {"array": "numpy"}}`), or a `problems.base.ForwardModel`; or the name of a factory
  "package.module:factory" as in a job file (`problem.kind: python`). A member fails exactly as in a job (G raising
  for it, or a non-finite output).
- `denoiser`: D(x, sigma) -> E[x0 | x] for sigma (B,) (other conventions: `config={"prior": {"convention":
  "epsilon"}}`), one of our priors (a `priors.Prior`, e.g. `GaussianFieldPrior`), or a factory name; None: the
  config's `prior` (Gaussian field, learned checkpoint, ...).
- `y`: the observation (obs_size values); `noise`: a number (the std: Gamma = std^2 I), a vector (the variances:
  Gamma diagonal) or an (obs_size, obs_size) matrix (the full Gamma); `truth`: the true state, for the metrics (and
  the synthetic twin y = G(truth) + noise when `y` is None, with `obs_size`).
- `config`: a dict of job keys, a RunConfig or a job file; `overrides`: ["key=value", ...] or {"a.b": value}.

On Ray (`backend="ray"`, or `address`), a Python object given here is pickled (Ray uses cloudpickle) and sent to
every simulator worker and prior actor, so it must be picklable (a closure, a module-level function, an
nn.Module); a factory name is imported in each worker instead (the module must be importable there: `path`, or
execution.runtime_env). The arrays given (y, variances or covariance, truth) are written to RUN_DIR/inputs/ (named
by their content) and named in config.yaml, so that a resume reads them back and a resume with other arrays is
refused like any other change of the config. The objects themselves cannot be written down: `resume` needs them
again, and the command line's `enkg-dist resume` refuses such a run in one line.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from enkg_dist import config as cfgmod
from enkg_dist import interrupt, rundir
from enkg_dist.api_inputs import OBJECT_FACTORY, InputError, Inputs, given_for_resume, object_denoiser
from enkg_dist.api_inputs import INPUTS  # noqa: F401 - the folder of the input files, RUN_DIR/inputs

__all__ = ["OBJECT_FACTORY", "InputError", "Result", "load", "python_object", "report", "resume", "run", "summary"]



def python_object(object: str = "?", **_unused):
    """The factory config.yaml names for a Python object given to the API: it cannot be rebuilt from a job file."""
    raise RuntimeError(f"this run was given the Python object {object!r} through enkg_dist.api, which a job file "
                       "cannot rebuild; resume it with enkg_dist.api.resume(RUN_DIR, forward=..., denoiser=...)")


@dataclass
class Result:
    """A finished run: its directory and metrics; the ensemble (read from RUN_DIR/ensemble.pt when first used)."""

    run_dir: Path
    metrics: dict
    _ensemble: dict | None = field(default=None, repr=False)

    def _load(self) -> dict:
        if self._ensemble is None:
            import torch

            self._ensemble = torch.load(Path(self.run_dir) / "ensemble.pt")
        return self._ensemble

    @property
    def particles(self):
        """The final ensemble, (J, *state_shape), float64 on the CPU."""
        return self._load()["particles"]

    @property
    def mean(self):
        return self._load()["mean"]

    @property
    def std(self):
        return self._load()["std"]

    @property
    def history(self) -> list[dict]:
        """Per step: sigma, and per correction the misfit and the step weight."""
        return json.loads((Path(self.run_dir) / "history.json").read_text())

    @property
    def config(self) -> cfgmod.RunConfig:
        return cfgmod.load_config(Path(self.run_dir) / "config.yaml")

    def summary(self, verify: bool = False) -> dict:
        """What `enkg-dist inspect --json` shows: steps, members, failures, misfit, timings."""
        return summary(self.run_dir, verify)

    def report(self, out: str | Path | None = None, verify: bool = True) -> list[Path]:
        return report(self.run_dir, out, verify)


def load(run_dir: str | Path) -> Result:
    """The result of a finished run directory (made by the API or the command line)."""
    path = Path(run_dir)
    if not (path / "metrics.json").is_file():
        raise InputError(f"api error: {path} holds no finished run (no metrics.json); resume it to finish it")
    return Result(path, json.loads((path / "metrics.json").read_text()))


def report(run_dir: str | Path, out: str | Path | None = None, verify: bool = True) -> list[Path]:
    """The figures of `enkg-dist report` (default RUN_DIR/report/); returns the PNG paths."""
    from enkg_dist import report as rep

    return rep.make_report(run_dir, out, verify=verify)


def summary(run_dir: str | Path, verify: bool = False) -> dict:
    """The summary of `enkg-dist inspect --json`."""
    from enkg_dist import report as rep

    return rep.summary(run_dir, verify=verify)


def run(config: Mapping | cfgmod.RunConfig | str | Path | None = None, *, forward=None, denoiser=None, y=None,
        noise=None, state_shape=None, truth=None, obs_size: int | None = None,
        overrides: list[str] | Mapping[str, Any] | None = None, run_dir: str | Path | None = None,
        backend: str | None = None, address: str | None = None, progress: bool = True,
        handle_signals: bool = True) -> Result:
    """Run EnKG (or EKI) and return its Result; a `run_dir` that holds a run's store is resumed instead.

    `config` (dict, RunConfig or job file; None: the defaults) with `overrides`, plus the problem given as Python
    objects (`forward`, `denoiser`, `y`, `noise`, `state_shape`, `truth`, `obs_size`: see the module's doc).
    `backend`: "local" (in this process) or "ray" (execution.backend); `address`: a Ray cluster. With
    `handle_signals` (in the main thread), SIGINT/SIGTERM (a notebook's interrupt) stop the run at a step boundary
    with `interrupt.Interrupted`; `resume` continues it."""
    from enkg_dist import plugins, runner

    arrays = any(a is not None for a in (forward, denoiser, y, noise, state_shape, truth, obs_size))
    if isinstance(config, cfgmod.RunConfig) and not arrays and not overrides and backend is None:
        cfg, data = config, None  # the command line's path: the job exactly as loaded
    else:
        data = _apply(_config_data(config), overrides)
        if backend is not None:
            data.setdefault("execution", {})["backend"] = _backend(backend)
    if not arrays:
        cfg = cfg if data is None else cfgmod.validate(data)
        with _signals(handle_signals):
            out, metrics = runner.run(cfg, run_dir, progress=progress, address=address)
        return Result(Path(out), metrics)
    given = plugins.Given(None if isinstance(forward, str) else forward, object_denoiser(denoiser))
    inputs = Inputs(forward, denoiser, y, noise, state_shape, truth, obs_size)
    data = inputs.merge(data)
    cfg = cfgmod.validate(data)  # the keys check before any directory is made (the input files come later)
    path = rundir.choose(cfg.output_dir, cfg.name, run_dir)
    made = not path.exists()
    written: list[Path] = []
    try:
        cfg = cfgmod.validate(inputs.write(data, path / INPUTS, written))
        with _signals(handle_signals):
            out, metrics = runner.run(cfg, path, progress=progress, address=address, given=given)
    except BaseException as e:
        _clean_up(cfg, path, made, written, e)
        raise
    return Result(Path(out), metrics)


def resume(run_dir: str | Path, *, forward=None, denoiser=None, overrides: list[str] | Mapping | None = None,
           backend: str | None = None, address: str | None = None, progress: bool = True,
           handle_signals: bool = True) -> Result:
    """Continue the run in `run_dir` from its last committed step (the uninterrupted run's ensemble, bit for bit,
    on the same hardware). A run given Python objects needs them again (`forward`, `denoiser`); `overrides` may
    change only the keys of config.RESUME_MAY_CHANGE (execution.*, ...); `backend`: "local" or "ray"."""
    from enkg_dist import runner

    items = [*overrides] if isinstance(overrides, (list, tuple)) else \
        [f"{k}={json.dumps(v)}" for k, v in (overrides or {}).items()]
    if backend is not None:
        items.append(f"execution.backend={_backend(backend)}")
    given = given_for_resume(Path(run_dir), forward, denoiser)
    with _signals(handle_signals):
        out, metrics = runner.resume(run_dir, progress=progress, address=address, overrides=items,
                                     given=given)
    return Result(Path(out), metrics)


# ---- the arguments ----

def _backend(name: str) -> str:
    if name not in ("local", "ray"):
        raise InputError(f"api error: backend: {name!r} is not one of 'local', 'ray'")
    return name


@contextlib.contextmanager
def _signals(handle: bool):
    if handle and not interrupt.active() and threading.current_thread() is threading.main_thread():
        with interrupt.stop_on_signals():
            yield
    else:
        yield


def _config_data(config) -> dict:
    """The job keys given, as a nested dict (only what was given: the defaults come with validation)."""
    if config is None:
        return {}
    if isinstance(config, cfgmod.RunConfig):
        return config.model_dump(mode="json", exclude_unset=True)
    if isinstance(config, (str, Path)):
        return cfgmod.load_config(config).model_dump(mode="json", exclude_unset=True)
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    raise InputError(f"api error: config: expected a dict of job keys, a RunConfig or a job file, got "
                     f"{type(config).__name__}")


def _apply(data: dict, overrides) -> dict:
    if not overrides:
        return data
    if isinstance(overrides, (str, bytes)):
        raise InputError("api error: overrides: give a list of 'key=value' strings or a dict {key: value}")
    if not isinstance(overrides, Mapping):
        return cfgmod.apply_overrides(data, list(overrides))
    for key, value in overrides.items():
        node, parts = data, str(key).split(".")
        for p in parts[:-1]:
            node[p] = dict(node[p]) if isinstance(node.get(p), dict) else {}
            node = node[p]
        node[parts[-1]] = value
    return data


def _clean_up(cfg, path: Path, made: bool, written: list[Path], error: BaseException) -> None:
    """After a run refused at its setup (a config or run-directory error; the runner's own rule): remove the
    directory this call made when nothing was committed in it, else the input files this call wrote. A run that
    started keeps them (its resume reads them; a failed one keeps stopped.json)."""
    from enkg_dist import runner
    from enkg_dist.store import committed_step_of

    if not isinstance(error, (cfgmod.ConfigError, rundir.RunDirError)):
        return
    try:
        committed = committed_step_of(cfg.store.path or str(path / runner.STORE_NAME))
    except Exception:  # noqa: BLE001 - an unreadable store: keep everything
        return
    if made and committed < 0:
        shutil.rmtree(path, ignore_errors=True)
        return
    for f in written:
        with contextlib.suppress(OSError):
            os.remove(f)


