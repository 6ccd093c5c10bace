"""Validated run configuration: YAML in, one-line errors out (naming the bad key and the allowed values)."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, create_model, field_validator,
                      model_validator)

from enkg_dist import schema
from enkg_dist.plugin_config import (DiffusersPrior, NoiseSettings, PythonPrior,  # noqa: F401 - config's own keys
                                     PythonProblem)
from enkg_dist.hyperparameters import EnKGConfig
from enkg_dist.schema import ConfigError, apply_overrides, parse_value, printable  # noqa: F401 - config's own API


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class LinearGaussianProblem(_Model):
    """y = S_k(B x) + N(0, noise_std^2 I) on the Gaussian-field prior; the exact posterior is known."""

    kind: Literal["linear_gaussian"] = "linear_gaussian"
    n: int = Field(64, ge=4, le=1024, description="grid size N (N x N field)")
    k: int = Field(2, ge=1, description="keep every k-th grid point")
    blur: float = Field(0.0, ge=0, description="Gaussian blur width before subsampling, in domain units")
    noise_std: float = Field(0.1, gt=0, description="observation noise std")
    noise: NoiseSettings | None = Field(None, description="Gamma as std, variances or covariance (a .npy file); "
                                        "when given it replaces noise_std")
    truth_seed: int = Field(0, ge=0, description="seed of the hidden truth and of the observation noise")

    @model_validator(mode="after")
    def _divides(self):
        if self.n % self.k:
            raise ValueError(f"n={self.n} is not a multiple of k={self.k}")
        return self


class NavierStokesProblem(_Model):
    """2D Navier-Stokes (enkg.md §4): recover x = w(., 0)/10 from w(., T) on every k-th grid point plus noise."""

    kind: Literal["navier_stokes"] = "navier_stokes"
    n: int = Field(64, ge=8, le=512, description="grid N (periodic [0, 2pi]^2)")
    k: int = Field(2, ge=1, description="observe every k-th point")
    T: float = Field(1.0, gt=0, description="observation time")
    Re: float = Field(200.0, gt=0)
    noise_std: float = Field(0.0, ge=0, description="observation noise std in vorticity units (0: noiseless)")
    truth_seed: int = Field(0, ge=0, description="seed of the true initial field (a GRF spun up) and of the noise")
    spinup: float = Field(5.0, ge=0, description="time units the true initial field is evolved from its GRF draw")
    step_mode: Literal["per_member", "paper"] = Field("per_member", description="CFL step per member, or the "
                                                      "authors' batch minimum")
    dealias: Literal["disc", "two_thirds"] = "disc"
    max_steps: int = Field(20000, ge=1, description="a member needing more time steps fails")
    member_chunk: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        "auto", description="members per FFT call; 1 makes each member's result bitwise independent of batching, "
        "auto the fastest lanes where a start-up check finds they give 1's bits on this machine, else 1 "
        "(null: fastest, unchecked)")

    @model_validator(mode="after")
    def _divides(self):
        if self.n % self.k:
            raise ValueError(f"n={self.n} is not a multiple of k={self.k}")
        return self


class ExternalProblem(_Model):
    """Your simulator program, run once per member (argv list, never a shell; files exchanged as .npy)."""

    kind: Literal["external"] = "external"
    command: list[str] = Field(..., min_length=1, description="argv with {input} {output} {workdir} {member} {ranks}; {python}: this Python")
    launcher: list[str] | None = Field(None, description="argv prefix, e.g. [mpirun, -n, '{ranks}']")
    ranks: int = Field(1, ge=1)
    n: int = Field(..., ge=4, description="the unknown is a field (1, n, n)")
    obs_size: int = Field(..., ge=1, description="values the program writes")
    observation: str | None = Field(None, description=".npy with y; null: a synthetic twin (truth from the prior)")
    truth: str | None = Field(None, description=".npy with the true field, for metrics only")
    coordinates: str | None = Field(None, description=".npy (obs_size, 2): where each output sits on the n x n "
                                    "grid (row, column, grid units): enables gaspari_cohn localisation")
    noise_std: float = Field(0.1, gt=0, description="observation noise std (Gamma = noise_std^2 I)")
    noise: NoiseSettings | None = Field(None, description="Gamma as std, variances or covariance (a .npy file); "
                                        "when given it replaces noise_std")
    truth_seed: int = Field(0, ge=0, description="seed of the synthetic truth and noise (observation: null)")
    timeout: float | None = Field(None, gt=0, description="seconds per member run")
    max_parallel: int = Field(1, ge=1, description="programs run at once by one process (in-process backend)")
    scratch_dir: str | None = None
    env: dict[str, str] = Field(default_factory=dict)


ProblemConfig = Annotated[Union[LinearGaussianProblem, NavierStokesProblem, ExternalProblem, PythonProblem],
                          Field(discriminator="kind")]


class GaussianPrior(_Model):
    """Stationary Gaussian random field, spectrum (|k|^2 + tau^2)^(-alpha), exact denoiser."""

    kind: Literal["gaussian"] = "gaussian"
    alpha: float = Field(2.0, gt=0)
    tau: float = Field(3.0, gt=0)
    std: float = Field(0.5, gt=0, description="pointwise prior std")


class FittedGaussianPrior(_Model):
    """The Gaussian random field fitted to a data set's mean and (radially averaged) spectrum: a learned prior's
    baseline."""

    kind: Literal["gaussian_fit"] = "gaussian_fit"
    data: str = Field(..., description="Zarr data set from `enkg-dist generate-data`")
    split: str = Field("train", description="the split fitted")
    radial: bool = Field(True, description="average the spectrum over shells of |k| (isotropic)")


class LearnedPrior(_Model):
    """A trained EDM diffusion model (`enkg-dist train-prior`); `builtin:ns32` is the shipped 32x32 NS prior."""

    kind: Literal["learned"] = "learned"
    checkpoint: str = Field("builtin:ns32", description="checkpoint file, or builtin:NAME for a shipped one")
    device: Literal["cpu", "cuda", "auto"] = Field("auto", description="where the denoiser runs (each prior actor "
                                                   "on Ray)")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="network precision (bfloat16: CUDA only)")
    max_batch: int = Field(256, ge=1, description="members per network call")
    compile: bool = Field(False, description="torch.compile the network (falls back to eager if it fails)")


PriorConfig = Annotated[Union[GaussianPrior, FittedGaussianPrior, LearnedPrior, PythonPrior, DiffusersPrior],
                        Field(discriminator="kind")]


class LocalisationSettings(_Model):
    """Localisation of the Kalman gain (enkg_dist.localisation; README "Localisation and spread control")."""

    kind: Literal["none", "gaspari_cohn", "sec", "nice"] = Field(
        "none", description="none (the J x J update), gaspari_cohn (distance taper; needs the problem's geometry), "
                            "sec (|R|^alpha), nice (tuning-free SEC; no geometry needed)")
    radius: float | None = Field(None, gt=0, description="Gaspari-Cohn half-support c in grid cells (zero from 2c)")
    alpha: float = Field(1.0, ge=0, description="SEC power")
    cutoff: float = Field(0.0, ge=0, lt=1, description="SEC: drop corrected correlations below this")
    delta: float = Field(1.0, gt=0, description="NICE: discrepancy-principle tolerance scale")
    large_scales: float | None = Field(
        None, ge=0, description="scale-dependent localisation: the state's scales |k| <= this wavenumber (of the "
                                "problem's periodic grid) are left unlocalised, the taper acts on the rest")
    mean_update: Literal["localised", "raw"] = Field(
        "localised", description="localised: the whole update is localised; raw (EnKG only): the ensemble mean moves "
                                 "by the unlocalised gain, as in the authors' update, and only the members' "
                                 "deviations from it by the localised one")

    @model_validator(mode="after")
    def _radius(self):
        if self.kind == "gaspari_cohn" and self.radius is None:
            raise ValueError("kind gaspari_cohn needs localisation.radius (grid cells)")
        return self


def _method_fields(method) -> dict:
    """Pydantic field definitions from a method's dataclass (hyperparameters.EnKGConfig): its types, defaults,
    bounds and descriptions, in its order."""
    hints = typing.get_type_hints(method)
    return {f.name: (hints[f.name], Field(f.default, **f.metadata)) for f in dataclasses.fields(method)}


class _EnKGChecks(_Model):
    """The checks across fields of the `enkg:` section, and its conversion to the sampler's dataclass."""

    @field_validator("sigma_min", check_fields=False)
    @classmethod
    def _below_sigma_max(cls, v: float, info: ValidationInfo) -> float:
        top = info.data.get("sigma_max")
        if top is not None and v >= top:
            raise ValueError(f"must be smaller than enkg.sigma_max ({top:g}), got {v:g}")
        return v

    def sampler_config(self) -> EnKGConfig:
        return EnKGConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(EnKGConfig)})

    @model_validator(mode="after")
    def _inflation(self):
        return _check_inflation(self)


_ENKG = _method_fields(EnKGConfig)
# The `enkg:` section: the sampler's one field list (hyperparameters.EnKGConfig), plus the run's ensemble size and
# localisation, in the order job files have always listed them.
EnKGSettings = create_model(
    "EnKGSettings", __base__=_EnKGChecks, __module__=__name__,
    __doc__="EnKG hyperparameters (enkg.md §2): the fields of hyperparameters.EnKGConfig, plus J and localisation.",
    ensemble_size=(int, Field(256, ge=2, description="J")),
    **{k: v for k, v in _ENKG.items() if k not in ("inflation", "inflation_factor")},
    localisation=(LocalisationSettings, Field(default_factory=LocalisationSettings)),
    inflation=_ENKG["inflation"], inflation_factor=_ENKG["inflation_factor"],
)


def _check_inflation(settings):
    if settings.inflation == "rtps" and settings.inflation_factor > 1:
        raise ValueError(f"inflation_factor {settings.inflation_factor}: rtps relaxes by alpha in [0, 1]")
    return settings


class EKISettings(_Model):
    """Plain ensemble Kalman inversion (no diffusion prior), initial ensemble drawn from the Gaussian prior."""

    ensemble_size: int = Field(256, ge=2)
    iterations: int = Field(20, ge=1, le=100_000)
    dt: float | Literal["auto"] = Field(1.0, description="step (Gamma/dt per iteration), or auto: the data-misfit "
                                        "controller (Iglesias & Yang 2021), whose steps sum to 1, then no more "
                                        "updates")
    stochastic: bool = False
    tikhonov: bool = Field(False, description="add the prior as observations (Tikhonov-EKI)")
    localisation: LocalisationSettings = Field(default_factory=LocalisationSettings)
    inflation: Literal["none", "multiplicative", "rtps"] = "none"
    inflation_factor: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _combinations(self):
        if self.dt != "auto" and not self.dt > 0:
            raise ValueError(f"dt {self.dt}: must be > 0, or auto")
        if self.tikhonov and self.localisation.kind != "none":
            raise ValueError("localisation is not available with tikhonov (the stacked prior block is d x d)")
        if self.localisation.mean_update != "localised":
            raise ValueError("localisation.mean_update: raw is an EnKG option; EKI localises its whole update")
        return _check_inflation(self)


class ExecutionSettings(_Model):
    """Where the work runs: in this process, or on a Ray cluster (prior actors + simulator workers)."""

    backend: Literal["local", "ray"] = "local"
    address: str | None = Field(None, description="Ray address ('auto', HOST:PORT); null starts an embedded Ray")
    num_workers: int = Field(2, ge=1, description="simulator worker actors")
    worker_cpus: float = Field(1.0, ge=0, description="CPUs reserved per simulator worker")
    worker_gpus: float = Field(0.0, ge=0, description="GPUs per simulator worker")
    worker_resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per worker")
    worker_concurrency: int = Field(1, ge=1, description="tasks each simulator worker runs at once, in threads "
                                    "(for simulators that wait: an external program, MPI, a remote service; "
                                    "1 for Python simulators that compute)")
    batch_size: int | None = Field(None, ge=1, description="members per simulator call (null: all at once "
                                   "in-process; on Ray, chosen each step from J, the workers and the measured "
                                   "member time: see distributed.pool.auto_batch_size)")
    timeout: float | None = Field(None, gt=0, description="seconds per member before it is failed (null: none)")
    straggler_factor: float | None = Field(None, gt=1, description="re-issue tasks slower than this x median")
    max_retries: int = Field(3, ge=0, description="re-dispatches of a task whose worker died")
    prior_actors: int = Field(1, ge=1, description="prior actors (one GPU each where GPUs exist)")
    prior_gpus: float = Field(0.0, ge=0, description="GPUs per prior actor")
    max_failed_fraction: float = Field(0.5, ge=0, le=1, description="stop cleanly when more members fail in a step")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of an embedded Ray (null: this machine's)")
    runtime_env: dict[str, Any] | None = Field(None, description="Ray runtime_env of the job (working_dir, "
                                               "py_modules, env_vars): how plug-in modules reach the workers")
    threads: int | None = Field(None, ge=1, description="intra-op threads (torch, OpenMP/MKL/OpenBLAS) of each "
                                "simulator worker, prior actor and the driver (null: the CPUs each was given: "
                                "worker_cpus; the driver's free CPUs)")
    dashboard: bool = Field(False, description="start Ray's dashboard (bound to loopback) with an embedded Ray")


class ChaosSettings(_Model):
    """Failure injection around the forward model, for testing a deployment's fault handling."""

    fail_rate: float = Field(0.1, ge=0, le=1, description="fraction of members that fail")
    modes: list[Literal["raise", "nan", "hang"]] = Field(default_factory=lambda: ["raise", "nan", "hang"])
    seed: int = Field(0, ge=0)
    delay: float = Field(0.0, ge=0, description="seconds each member takes")
    hang_seconds: float = Field(3600.0, gt=0, description="how long a hanging member sleeps")
    log: str | None = Field(None, description="append a hash of each evaluated member's input to this file")


class StoreSettings(_Model):
    """The Zarr run store (checkpoints, per-member outputs, resume)."""

    path: str | None = Field(None, description="store location (dir or fsspec URL); null: RUN_DIR/store.zarr")
    full_every: int = Field(10, ge=1, description="keep the full ensemble every n-th step and the last (mean/std "
                            "every step; resume always has the latest)")
    checkpoint_every: int = Field(1, ge=1, description="write the full ensemble for resume every n-th step (and "
                                  "every kept one); a resume replays the steps since from the recorded forward "
                                  "outputs, without running the simulator")
    max_pending: int = Field(2, ge=1, description="steps queued for the background writer")


class RunConfig(_Model):
    """A whole run."""

    name: str = "run"
    method: Literal["enkg", "eki"] = "enkg"
    seed: int = Field(0, ge=0, description="run seed: member j's streams derive from (seed, j)")
    dtype: Literal["float64", "float32"] = "float64"
    device: Literal["cpu", "cuda", "auto"] = "auto"
    output_dir: str = "runs"
    problem: ProblemConfig = Field(default_factory=LinearGaussianProblem)
    prior: PriorConfig = Field(default_factory=GaussianPrior)
    enkg: EnKGSettings = Field(default_factory=EnKGSettings)
    eki: EKISettings = Field(default_factory=EKISettings)
    execution: ExecutionSettings = Field(default_factory=ExecutionSettings)
    chaos: ChaosSettings | None = Field(None, description="inject failures (testing only)")
    store: StoreSettings = Field(default_factory=StoreSettings)

    @model_validator(mode="before")
    @classmethod
    def _default_kinds(cls, data: Any) -> Any:
        """A problem or prior given without `kind` takes the default kind."""
        if isinstance(data, dict):
            data = dict(data)
            for key, kind in (("problem", "linear_gaussian"), ("prior", "gaussian")):
                if isinstance(data.get(key), dict) and "kind" not in data[key]:
                    data[key] = {"kind": kind, **data[key]}
        return data


# Keys that may change between resumptions of a run: naming, where output goes, how the work is spread over machines,
# when the run stops for failures, and the store's write cadence. Every other key changes the answer: a resume with a
# different value is refused, naming the keys. A key stands for itself and every key under it.
RESUME_MAY_CHANGE = (
    "name", "output_dir", "device", "prior.device",
    "execution.backend", "execution.address", "execution.num_workers", "execution.worker_cpus",
    "execution.worker_gpus", "execution.worker_resources", "execution.batch_size", "execution.prior_actors",
    "execution.prior_gpus", "execution.num_cpus", "execution.threads", "execution.runtime_env", "execution.dashboard",
    "execution.max_failed_fraction",
    "store.max_pending", "store.checkpoint_every",
)


def one_line_error(exc: ValidationError, root: type[BaseModel] | None = None, what: str = "config error") -> str:
    """First error of a ValidationError of model `root` (RunConfig) as 'config error: a.b: message (allowed: ...)'."""
    return schema.one_line_error(exc, root or RunConfig, what)


def may_change_on_resume(key: str) -> bool:
    """Whether the dotted key may differ between resumptions of one run (see RESUME_MAY_CHANGE)."""
    return any(key == k or key.startswith(k + ".") for k in RESUME_MAY_CHANGE)


def check_resume_overrides(overrides: list[str]) -> None:
    """Refuse `resume --set` of a key that would change the answer, naming it and the keys that may change."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if "=" not in item:
            raise ConfigError(f"config error: --set {item!r}: expected KEY=VALUE")
        if not may_change_on_resume(key):
            raise ConfigError(f"config error: resume --set {printable(key)}: this key may not change between "
                              f"resumptions of a run (it changes the answer); these may: {', '.join(RESUME_MAY_CHANGE)}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML job (the embedded default when `path` is None; builtin:NAME for a shipped job), apply overrides,
    validate."""
    if path is None:
        text = default_job_text()
    elif str(path).startswith("builtin:"):
        text = builtin_job_text(str(path).split(":", 1)[1])
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config error: job file {str(p)!r} not found")
        try:
            text = p.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config error: job file {str(p)!r} cannot be read ({type(e).__name__})") from None
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        first = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"config error: {path}: not valid YAML ({first})") from None
    if data is None:
        raise ConfigError(f"config error: job file {str(path)!r} is empty (an empty job would run the built-in "
                          "defaults: the 64x64 linear-Gaussian problem); write {} to run them on purpose")
    if not isinstance(data, dict):
        raise ConfigError(f"config error: {path}: the job must be a mapping of keys, got {type(data).__name__}")
    return validate(apply_overrides(data, overrides or []))


def validate(data: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(one_line_error(e)) from None


def builtin_jobs() -> list[str]:
    """Names of the jobs shipped in enkg_dist/jobs (`default` is the one `enkg-dist run` runs with no job)."""
    from importlib.resources import files

    return sorted(f.name[:-5] for f in files("enkg_dist").joinpath("jobs").iterdir() if f.name.endswith(".yaml"))


def builtin_job_text(name: str) -> str:
    from importlib.resources import files

    if name not in builtin_jobs():
        raise ConfigError(f"config error: no builtin job {name!r} (have: {', '.join(builtin_jobs())})")
    return files("enkg_dist").joinpath(f"jobs/{name}.yaml").read_text()


def default_job_text() -> str:
    return builtin_job_text("default")


def dump(cfg: RunConfig) -> str:
    """The resolved configuration as YAML (every default filled in)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
