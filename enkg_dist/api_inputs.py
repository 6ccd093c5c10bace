"""The library API's arguments (enkg_dist.api): the problem given as Python objects and arrays turned into the job
keys of `problem.kind: python` / `prior.kind: python` and input files in the run directory (named by their content),
with one-line errors (`InputError`) for arguments that cannot run; and the objects a resume needs again."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from enkg_dist import config as cfgmod
from enkg_dist import rundir

OBJECT_FACTORY = "enkg_dist.api:python_object"  # what config.yaml names for an object given here
INPUTS = "inputs"


class InputError(cfgmod.ConfigError):
    """An argument of the API that cannot run (shapes that disagree, a missing one); the message is one line."""


def is_prior(obj) -> bool:
    from enkg_dist.priors import Prior

    return isinstance(obj, Prior)


def object_denoiser(denoiser):
    return None if denoiser is None or isinstance(denoiser, str) else denoiser


def as_array(value, what: str) -> np.ndarray:
    try:
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().cpu().numpy()
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InputError(f"api error: {what}: not an array of numbers ({str(e).splitlines()[0]})") from None
    return a


class Inputs:
    """The problem given as arguments, turned into job keys (problem.kind / prior.kind python) and input files."""

    def __init__(self, forward, denoiser, y, noise, state_shape, truth, obs_size):
        self.forward, self.denoiser, self.noise = forward, denoiser, noise
        self.y = None if y is None else as_array(y, "y").reshape(-1)
        self.truth = None if truth is None else as_array(truth, "truth")
        if forward is not None and not (isinstance(forward, str) or callable(forward)):
            raise InputError(f"api error: forward: expected G(x) (a callable or a ForwardModel) or a factory name "
                             f"'package.module:factory', got {type(forward).__name__}")
        if denoiser is not None and not (isinstance(denoiser, str) or callable(denoiser) or is_prior(denoiser)):
            raise InputError(f"api error: denoiser: expected D(x, sigma), one of our priors or a factory name, got "
                             f"{type(denoiser).__name__}")
        if state_shape is None and self.truth is not None:
            state_shape = self.truth.shape
        if state_shape is None and is_prior(denoiser):
            state_shape = denoiser.state_shape
        self.shape = None if state_shape is None else self._shape(state_shape)
        if self.truth is not None and self.shape is not None and self.truth.size != int(np.prod(self.shape)):
            raise InputError(f"api error: truth: has shape {self.truth.shape}, the state_shape is {self.shape}")
        if self.y is not None and obs_size is not None and self.y.size != obs_size:
            raise InputError(f"api error: y: has {self.y.size} values, obs_size is {obs_size}")
        self.obs_size = obs_size if self.y is None else self.y.size
        if self.y is not None and self.y.size == 0:
            raise InputError("api error: y: is empty")

    @staticmethod
    def _shape(shape) -> tuple[int, ...]:
        try:
            out = tuple(int(s) for s in shape)
        except (TypeError, ValueError):
            raise InputError(f"api error: state_shape: expected a tuple of sizes such as (1, 32, 32), got "
                             f"{shape!r}") from None
        if not out or min(out) < 1:
            raise InputError(f"api error: state_shape: {out}: every size must be >= 1")
        return out

    def merge(self, data: dict) -> dict:
        """The job keys with the arguments' problem and prior (no input files yet: `write` adds them)."""
        data = dict(data)
        problem = dict(data.get("problem") or {})
        has_problem_args = any(v is not None for v in (self.y, self.noise, self.shape, self.truth, self.obs_size))
        if self.forward is None:
            if has_problem_args:
                raise InputError("api error: y, noise, state_shape, truth and obs_size describe a forward model: "
                                 "give forward= too (or put the problem in config)")
        else:
            if problem.get("kind", "python") != "python":
                raise InputError(f"api error: forward: given, and config's problem.kind is {problem['kind']!r}; "
                                 "drop one")
            for key, arg in (("forward", "forward"), ("observation", "y"), ("obs_size", "y"),
                             ("noise", "noise"), ("truth", "truth"), ("state_shape", "state_shape"),
                             ("n", "state_shape")):
                value = getattr(self, {"y": "y", "noise": "noise", "truth": "truth", "state_shape": "shape",
                                       "forward": "forward"}[arg])
                if key in problem and value is not None:
                    raise InputError(f"api error: {arg}: given, and config gives problem.{key} too; drop one")
            problem["kind"] = "python"
            problem["forward"] = self.forward if isinstance(self.forward, str) else OBJECT_FACTORY
            if not isinstance(self.forward, str):
                from enkg_dist.factories import label

                problem["kwargs"] = {"object": label(self.forward)}
            if self.shape is not None:
                problem["state_shape"] = list(self.shape)
            elif "n" not in problem and "state_shape" not in problem:
                raise InputError("api error: state_shape: give the shape of one state, e.g. (1, 32, 32) (or truth=)")
            if self.obs_size is not None:
                problem["obs_size"] = int(self.obs_size)
            elif "obs_size" not in problem:
                raise InputError("api error: y: give the observation y (or truth= and obs_size= for a synthetic "
                                 "twin y = G(truth) + noise)")
            if self.y is None and self.truth is None and "truth" not in problem and "observation" not in problem:
                raise InputError("api error: y: give the observation y (or truth= and obs_size= for a synthetic "
                                 "twin y = G(truth) + noise)")
            if self.noise is None and "noise" not in problem:
                raise InputError("api error: noise: give the observation noise: a std (a number), the variances (a "
                                 "vector) or the covariance (a matrix)")
            if self.noise is not None and not isinstance(self.noise, Mapping):
                self._check_noise(problem["obs_size"])
            elif isinstance(self.noise, Mapping):
                problem["noise"] = dict(self.noise)
            data["problem"] = problem
        if self.denoiser is not None:
            prior = dict(data.get("prior") or {})
            if prior.get("kind", "python") != "python":
                raise InputError(f"api error: denoiser: given, and config's prior.kind is {prior['kind']!r}; drop "
                                 "one")
            if "denoiser" in prior:
                raise InputError("api error: denoiser: given, and config gives prior.denoiser too; drop one")
            prior["kind"] = "python"
            if isinstance(self.denoiser, str):
                prior["denoiser"] = self.denoiser
            else:
                from enkg_dist.factories import label

                prior["denoiser"], prior["kwargs"] = OBJECT_FACTORY, {"object": label(self.denoiser)}
                if is_prior(self.denoiser):
                    prior.setdefault("device", self.denoiser.device.type)
            data["prior"] = prior
        return data

    def _check_noise(self, m: int) -> None:
        a = as_array(self.noise, "noise")
        if a.ndim == 0:
            return
        if a.ndim == 1 and a.size != m:
            raise InputError(f"api error: noise: {a.size} variances, the observation has {m} values")
        if a.ndim == 2 and a.shape != (m, m):
            raise InputError(f"api error: noise: a covariance of shape {a.shape}, expected ({m}, {m})")
        if a.ndim > 2:
            raise InputError(f"api error: noise: expected a std, variances (a vector) or a covariance (a matrix), "
                             f"got {a.ndim} dimensions")

    def write(self, data: dict, where: Path, written: list[Path]) -> dict:
        """The job keys naming the input files, written under `where` (named by their content)."""
        if self.forward is None:
            return data
        data = copy.deepcopy(data)
        problem = data["problem"]
        if self.y is not None:
            problem["observation"] = _save(where, "observation", self.y, written)
        if self.truth is not None:
            problem["truth"] = _save(where, "truth", self.truth.reshape(problem.get("state_shape") or
                                                                         self.truth.shape), written)
        if self.noise is not None and not isinstance(self.noise, Mapping):
            a = as_array(self.noise, "noise")
            if a.ndim == 0:
                problem["noise"] = {"std": float(a)}
            elif a.ndim == 1:
                problem["noise"] = {"variances": _save(where, "variances", a, written)}
            else:
                problem["noise"] = {"covariance": _save(where, "covariance", a, written)}
        return data


def _save(where: Path, stem: str, a: np.ndarray, written: list[Path]) -> str:
    """`a` as WHERE/STEM-HASH.npy (kept when it exists: the same content); its absolute path."""
    a = np.ascontiguousarray(a, dtype=np.float64)
    digest = hashlib.sha256(repr(a.shape).encode() + a.tobytes()).hexdigest()[:16]
    path = (where / f"{stem}-{digest}.npy").absolute()
    if not path.is_file():
        try:
            where.mkdir(parents=True, exist_ok=True)

            def write(tmp):
                with open(tmp, "wb") as f:
                    np.save(f, a)

            rundir.replace_atomic(path, write)
        except OSError as e:
            raise rundir.RunDirError(f"api error: cannot write {path}: {rundir.fault_line(e)}") from None
        written.append(path)
    return str(path)


def given_for_resume(run_dir: Path, forward, denoiser):
    """The objects a resume needs: those the run was given (named OBJECT_FACTORY in its config.yaml)."""
    from enkg_dist import plugins

    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        return plugins.Given(forward, object_denoiser(denoiser))
    import yaml

    try:
        data = yaml.safe_load(cfg_path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return plugins.Given(forward, object_denoiser(denoiser))  # the runner reports it (or uses the store's copy)
    problem, prior = data.get("problem") or {}, data.get("prior") or {}
    for arg, value, section, key in (("forward", forward, problem, "forward"),
                                     ("denoiser", denoiser, prior, "denoiser")):
        stored = section.get(key) if section.get("kind") == "python" else None
        if stored == OBJECT_FACTORY and value is None:
            name = (section.get("kwargs") or {}).get("object", "?")
            raise InputError(f"api error: {arg}: {run_dir} was run with the Python object {name!r}; give it again: "
                             f"enkg_dist.api.resume(RUN_DIR, {arg}=...)")
        if value is not None and stored != OBJECT_FACTORY:
            what = f"the factory {stored!r}" if stored else f"no Python {arg}"
            raise InputError(f"api error: {arg}: {run_dir} was run with {what}; resume it without {arg}=")
        if isinstance(value, str):
            raise InputError(f"api error: {arg}: a factory name cannot replace the object {run_dir} was run with")
    return plugins.Given(forward, object_denoiser(denoiser))
