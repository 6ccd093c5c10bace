"""The job keys of the Python plug-ins (`problem.kind: python`, `prior.kind: python`), of diffusers models
(`prior.kind: diffusers`) and of the observation noise given as std, variances or a covariance file
(`problem.noise`); part of the run configuration (`config`), which re-exports them. Validated like the rest of it:
one-line errors naming the key."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from enkg_dist.factories import check_name


class _Model(BaseModel):  # as config._Model
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class NoiseSettings(_Model):
    """The observation-noise covariance Gamma: exactly one of `std` (scalar, Gamma = std^2 I), `variances`
    (diagonal) or `covariance` (full, from a file). A bare number is read as `std`."""

    std: float | None = Field(None, gt=0, description="Gamma = std^2 I")
    variances: list[float] | str | None = Field(None, description="Gamma = diag(variances): a list of obs_size "
                                                "values, or a .npy file holding them")
    covariance: str | None = Field(None, description=".npy file with the full (obs_size, obs_size) Gamma "
                                   "(symmetric positive definite)")

    @model_validator(mode="before")
    @classmethod
    def _number_is_std(cls, data: Any) -> Any:
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            return {"std": data}
        return data

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("std", "variances", "covariance") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of std, variances, covariance (got {', '.join(given) or 'none'})")
        return self


class PythonProblem(_Model):
    """Your forward model as a Python object: `forward` names a factory "package.module:factory" that
    `factory(**kwargs)` returns G, a callable on a batch of states (B, *state_shape) -> (B, obs_size) (or a
    problems.base.ForwardModel). Imported and built once in each process that runs it (each Ray worker)."""

    kind: Literal["python"] = "python"
    forward: str = Field(..., description="'package.module:factory'; factory(**kwargs) returns G")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the factory")
    path: list[str] = Field(default_factory=list, description="directories put on sys.path before the import, "
                            "in every process (a shared file system on a cluster)")
    array: Literal["torch", "numpy"] = Field("torch", description="G takes and returns torch tensors or numpy "
                                             "arrays")
    n: int | None = Field(None, ge=2, description="the state is a field (1, n, n) (or give state_shape)")
    state_shape: list[int] | None = Field(None, min_length=1, description="the state's shape, e.g. [1, 32, 32] "
                                          "or [100] (instead of n; Gaussian and learned priors need (C, n, n))")
    obs_size: int = Field(..., ge=1, description="values G returns per member")
    observation: str | None = Field(None, description="y: a .npy file or a Zarr array; null: a synthetic twin, "
                                    "y = G(truth) + noise")
    truth: str | None = Field(None, description=".npy with the true state: metrics, and the twin's truth (else "
                              "drawn from a Gaussian prior with truth_seed)")
    coordinates: str | None = Field(None, description=".npy (obs_size, 2): where each output sits on the n x n "
                                    "grid (row, column, grid units): enables gaspari_cohn localisation")
    noise: NoiseSettings = Field(default_factory=lambda: NoiseSettings(std=0.1),
                                 description="Gamma: std (a number), variances (list or .npy) or covariance (.npy)")
    truth_seed: int = Field(0, ge=0, description="seed of the synthetic truth and noise (observation: null)")

    @field_validator("forward")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v)

    @model_validator(mode="after")
    def _shape(self):
        if (self.n is None) == (self.state_shape is None):
            raise ValueError("give exactly one of n (a (1, n, n) field) and state_shape")
        if self.state_shape is not None and min(self.state_shape) < 1:
            raise ValueError(f"state_shape {self.state_shape}: every size must be >= 1")
        return self

    @property
    def shape(self) -> tuple[int, ...]:
        return (1, self.n, self.n) if self.n is not None else tuple(self.state_shape)


class PythonPrior(_Model):
    """Your diffusion model as a Python object: `denoiser` names a factory "package.module:factory" that
    `factory(**kwargs)` returns D(x, sigma) (x: (B, *state_shape), sigma: (B,)), built once in each process that
    runs it (each prior actor)."""

    kind: Literal["python"] = "python"
    denoiser: str = Field(..., description="'package.module:factory'; factory(**kwargs) returns D(x, sigma)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the factory")
    path: list[str] = Field(default_factory=list, description="directories put on sys.path before the import, "
                            "in every process (a shared file system on a cluster)")
    convention: Literal["edm", "epsilon", "score"] = Field(
        "edm", description="what D returns for x = x0 + sigma n: edm: E[x0 | x]; epsilon: E[n | x]; score: the "
                           "score grad log p_sigma(x)")
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="where D runs (each prior actor on Ray); a "
                                                   "factory with a `device` argument is given it")
    dtype: Literal["float32", "float64"] | None = Field(None, description="x and sigma are cast to it for D "
                                                        "(null: the run's dtype)")
    max_batch: int | None = Field(None, ge=1, description="members per call of D (null: all at once)")

    @field_validator("denoiser")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v)


class DiffusersPrior(_Model):
    """A diffusers `UNet2DModel` and its scheduler saved with `save_pretrained` in a local directory (never fetched
    from a hub), used as the EDM denoiser: DDPM-style schedules (epsilon, v or sample prediction; Euler/Karras
    schedulers of the same alphas_cumprod included) and diffusers' EDM schedulers (priors/diffusers_prior.py)."""

    kind: Literal["diffusers"] = "diffusers"
    path: str = Field(..., description="directory with config.json + scheduler_config.json (unet.save_pretrained "
                      "and scheduler.save_pretrained into it), or a pipeline's with unet/ and scheduler/")
    prediction_type: Literal["epsilon", "v_prediction", "sample"] | None = Field(
        None, description="what the network predicts (null: the scheduler config's prediction_type)")
    timesteps: Literal["interpolate", "nearest"] = Field(
        "interpolate", description="the network's timestep at a noise level sigma: interpolate (fractional, linear "
                                   "in log sigma between the trained timesteps) or nearest (the nearest trained one)")
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="where the network runs (each prior actor on "
                                                   "Ray)")
    dtype: Literal["float32", "float64"] = Field("float32", description="network precision")
    max_batch: int | None = Field(64, ge=1, description="members per network call (null: all at once)")
