"""EnKG's hyperparameters (enkg.md §2-3) as one dataclass, and the choices its fields take.

Torch-free, so the job schema (`config.EnKGSettings`, built from these fields) and the CLI load without torch: a
wrong key or value is reported before the numerical stack is imported. `sampler`, `kalman` and `inflation` re-export
what they use from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from enkg_dist import schedules

STEP_RULES = ("frobenius", "trace")  # kalman: s/|A|_F (the authors' code) or s/tr C_psipsi (the paper)
FAILURE_POLICIES = ("keep", "resample")  # kalman: failed members kept unmoved, or resampled
INFLATION_KINDS = ("none", "multiplicative", "rtps")  # inflation: spread control after a step's corrections
PREDICTORS = ("euler", "heun")


def setting(default, description: str | None = None, **bounds):
    """A hyperparameter of a method's dataclass with its bounds (ge, gt, le) and description: the one field list
    that the run configuration (config.EnKGSettings) builds its schema from, so the two cannot drift apart."""
    return field(default=default, metadata={**bounds, **({"description": description} if description else {})})


@dataclass(frozen=True)
class EnKGConfig:
    """Hyperparameters of EnKG (enkg.md §2-3); defaults are the authors' Navier-Stokes settings except the guard.

    The job file's `enkg:` section is this dataclass's fields (types, defaults, bounds, descriptions), plus the
    run's own ensemble_size and localisation (config.EnKGSettings)."""

    num_steps: int = setting(80, "N, diffusion steps", ge=1, le=100_000)
    sigma_max: float = setting(80.0, gt=0)
    sigma_min: float = setting(0.002, gt=0)
    rho: float = setting(7.0, gt=0)
    scale: float = setting(2.0, "guidance scale s", gt=0)
    lr_min_ratio: float | None = setting(None, "linear decay of s to this ratio (None: constant)", ge=0, le=1)
    # "frobenius" (code: s/|A|_F) or "trace" (paper: s/tr C_psipsi)
    step_rule: Literal[STEP_RULES] = "frobenius"
    guard: float | None = setting(1.0, "cap w <= guard/tr(C_psipsi); null for the authors' step", gt=0)
    num_corrections: int = setting(2, "K", ge=0)
    guidance_start: float = setting(0.05, ge=0, le=1)
    guidance_end: float = setting(0.05, ge=0, le=1)
    ode_divisor: int = setting(4, ge=1)
    ode_max_steps: int = setting(20, ge=1)
    predictor: Literal[PREDICTORS] = "euler"
    failure_policy: Literal[FAILURE_POLICIES] = "keep"  # failed members: "keep" unmoved, or "resample"
    inflation: Literal[INFLATION_KINDS] = setting("none", "spread control after each step's corrections")
    inflation_factor: float = setting(1.0, "lambda (multiplicative) or alpha (rtps, in [0, 1])", ge=0)

    def __post_init__(self):
        if self.step_rule not in STEP_RULES:
            raise ValueError(f"step_rule {self.step_rule!r} not in {STEP_RULES}")
        if self.predictor not in PREDICTORS:
            raise ValueError(f"predictor {self.predictor!r} not in {PREDICTORS}")
        if self.failure_policy not in FAILURE_POLICIES:
            raise ValueError(f"failure_policy {self.failure_policy!r} not in {FAILURE_POLICIES}")
        if self.inflation not in INFLATION_KINDS:
            raise ValueError(f"inflation {self.inflation!r} not in {INFLATION_KINDS}")
        if self.num_steps < 1 or self.num_corrections < 0:
            raise ValueError("num_steps must be >= 1 and num_corrections >= 0")

    def sigmas(self) -> np.ndarray:
        """sigma_0 > ... > sigma_{N-1} = sigma_min, then sigma_N = 0."""
        return schedules.karras_sigmas(self.num_steps, self.sigma_max, self.sigma_min, self.rho)

    def guided(self, i: int) -> bool:
        return schedules.in_guidance_window(i, self.num_steps, self.guidance_start, self.guidance_end)
