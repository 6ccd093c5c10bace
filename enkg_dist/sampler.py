"""The EnKG predictor-corrector loop and plain EKI, as functions of their collaborators (EnKG Algorithm 1).

`denoise(x, sigma) -> E[x0 | x_sigma]` (or a `DenoiserMaps` that runs the x_hat0 map and the predictor where its
model lives) and `evaluate(x_hat) -> (psi, ok)` are arguments, so the same loop runs in-process in a test and on a
Ray cluster. This is the only loop: the runner joins it through the hooks (`before_step`, `callback`). Randomness
comes only from per-member streams (`enkg_dist.rng`).
"""

from __future__ import annotations

import dataclasses

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import numpy as np
import torch

from enkg_dist import inflation, kalman, rng, schedules
from enkg_dist.hyperparameters import PREDICTORS, EnKGConfig  # noqa: F401 - the sampler's API
from enkg_dist.evaluation import Evaluate, take_in
from enkg_dist.localisation import Localiser
from enkg_dist.noise import NoiseCovariance

Denoiser = Callable[[torch.Tensor, float], torch.Tensor]


@dataclass
class Correction:
    """What one corrector pass saw and did."""

    k: int
    psi: torch.Tensor  # (J, m) forward outputs on the particles' device (rows of failed members zeroed)
    ok: torch.Tensor  # (J,) bool
    info: kalman.UpdateInfo
    n_ode: int


@dataclass
class StepRecord:
    """Step i: x went from sigma to sigma_next; `corrections` is empty outside the guidance window."""

    i: int
    sigma: float
    sigma_next: float
    x: torch.Tensor  # particles after the predictor (at sigma_next)
    corrections: list[Correction] = field(default_factory=list)


def pf_ode_euler(denoise: Denoiser, x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """Euler step of the probability-flow ODE dx/dsigma = (x - D(x; sigma))/sigma (EDM eq. 4)."""
    return x + (sigma_next - sigma) * (x - denoise(x, sigma)) / sigma


def pf_ode_heun(denoise: Denoiser, x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """Heun (2nd order) step of the PF-ODE, Euler on the last step to sigma=0 (EDM Algorithm 1)."""
    d = (x - denoise(x, sigma)) / sigma
    x_euler = x + (sigma_next - sigma) * d
    if sigma_next == 0:
        return x_euler
    d_next = (x_euler - denoise(x_euler, sigma_next)) / sigma_next
    return x + (sigma_next - sigma) * 0.5 * (d + d_next)


def x_hat_map(denoise: Denoiser, x: torch.Tensor, sigma: float, n_ode: int, sigma_min: float, rho: float):
    """x_hat0 = phi(x_sigma): n_ode Euler PF-ODE steps on a Karras grid sigma -> sigma_min -> 0; n_ode=1 is
    D(x; sigma)."""
    grid = schedules.karras_sigmas(n_ode, float(sigma), sigma_min, rho) if n_ode > 1 else np.array([sigma, 0.0])
    for s, s_next in zip(grid[:-1], grid[1:]):
        x = pf_ode_euler(denoise, x, float(s), float(s_next))
    return x


def predictor(denoise: Denoiser, x: torch.Tensor, sigma: float, sigma_next: float, method: str) -> torch.Tensor:
    """One PF-ODE step from sigma to sigma_next by `method`."""
    step = pf_ode_heun if method == "heun" else pf_ode_euler
    return step(denoise, x, sigma, sigma_next)


class DenoiserMaps:
    """The two computations of a step that need the prior: the x_hat0 map and the predictor.

    This class runs them in this process through `denoise`. A prior that runs them where its model lives (a remote
    prior: distributed.prior.RemotePrior) declares so by subclassing it; the sampler never probes a denoiser for
    methods."""

    def __init__(self, denoise: Denoiser):
        self.denoise = denoise

    def x_hat_map(self, x: torch.Tensor, sigma: float, n_ode: int, sigma_min: float, rho: float):
        return x_hat_map(self.denoise, x, sigma, n_ode, sigma_min, rho)

    def predict(self, x: torch.Tensor, sigma: float, sigma_next: float, method: str) -> torch.Tensor:
        return predictor(self.denoise, x, sigma, sigma_next, method)


class TimedMaps(DenoiserMaps):
    """Another DenoiserMaps (local or remote) whose calls run inside `phase()`, a context manager: the runner's
    clock counts them as the step's prior time (phases.PhaseClock)."""

    def __init__(self, inner: DenoiserMaps, phase: Callable[[], AbstractContextManager]):
        super().__init__(inner.denoise)
        self.inner, self.phase = inner, phase

    def x_hat_map(self, x, sigma, n_ode, sigma_min, rho):
        with self.phase():
            return self.inner.x_hat_map(x, sigma, n_ode, sigma_min, rho)

    def predict(self, x, sigma, sigma_next, method):
        with self.phase():
            return self.inner.predict(x, sigma, sigma_next, method)


def maps_of(denoise: Denoiser | DenoiserMaps) -> DenoiserMaps:
    """A step's prior computations: `denoise` itself when it declares them (a DenoiserMaps), else in this process."""
    return denoise if isinstance(denoise, DenoiserMaps) else DenoiserMaps(denoise)


def initial_particles(seed: int, J: int, shape, sigma_max: float, dtype=torch.float64) -> torch.Tensor:
    """x_j ~ N(0, sigma_max^2 I), member j from its own stream."""
    return rng.member_normal(seed, rng.INIT, range(J), shape, dtype=dtype) * sigma_max


def corrector(
    denoise: Denoiser | DenoiserMaps,
    evaluate: Evaluate,
    x: torch.Tensor,
    i: int,
    sigma: float,
    y: torch.Tensor,
    Gamma: NoiseCovariance,
    cfg: EnKGConfig,
    seed: int,
    localiser: Localiser | None = None,
) -> tuple[torch.Tensor, list[Correction]]:
    """K guided updates at noise level sigma_i (EnKG eq. 10): x_hat0 map, forward runs, Kalman step (localised when
    a localiser is given), failure policy; then the spread control against the spread before the K updates."""
    J, maps = x.shape[0], maps_of(denoise)
    x_before, ok_all = x, torch.ones(J, dtype=torch.bool, device=x.device)
    n_ode = schedules.inner_ode_steps(i, cfg.num_steps, cfg.ode_divisor, cfg.ode_max_steps)
    s_i = schedules.guidance_scale(i, cfg.num_steps, cfg.scale, cfg.lr_min_ratio)
    out = []
    for k in range(cfg.num_corrections):
        x_hat = maps.x_hat_map(x, sigma, n_ode, cfg.sigma_min, cfg.rho)  # a remote prior: on its actors
        psi, ok = take_in(*evaluate(x_hat), J, y)
        x, info = kalman.enkg_update(x, psi, y, Gamma, s_i, cfg.step_rule, cfg.guard, ok, localiser)
        ok_all &= ok
        if cfg.failure_policy == "resample" and not bool(ok.all()):
            bad = (~ok).nonzero().reshape(-1).tolist()
            z = torch.cat([rng.member_normal(seed, rng.RESAMPLE, [j], (int(ok.sum()),), i, k) for j in bad])
            x = kalman.resample_failed(x, ok, z)
        out.append(Correction(k, psi, ok, info, n_ode))
    if out and cfg.inflation != "none":
        keep = ok_all if cfg.failure_policy == "keep" else None  # resampled members count as updated
        x = inflation.apply(cfg.inflation, cfg.inflation_factor, x_before, x, keep)
    return x, out


def enkg_step(denoise, evaluate, x, i, y, Gamma, cfg: EnKGConfig, seed: int = 0, sigmas=None,
              localiser: Localiser | None = None) -> StepRecord:
    """Step i of EnKG: corrector inside the guidance window, then the predictor to sigma_{i+1}. `denoise`: a
    denoiser, or a DenoiserMaps that runs the x_hat0 map and the predictor itself."""
    sigmas = cfg.sigmas() if sigmas is None else sigmas
    maps = maps_of(denoise)
    sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
    corrections = []
    if cfg.guided(i) and cfg.num_corrections > 0:
        x, corrections = corrector(maps, evaluate, x, i, sigma, y, Gamma, cfg, seed, localiser)
    x = maps.predict(x, sigma, sigma_next, cfg.predictor)
    return StepRecord(i, sigma, sigma_next, x, corrections)


def enkg_sample(
    denoise: Denoiser | DenoiserMaps,
    evaluate: Evaluate,
    x_T: torch.Tensor,
    y: torch.Tensor,
    Gamma: NoiseCovariance,
    cfg: EnKGConfig,
    seed: int = 0,
    callback: Callable[[StepRecord], None] | None = None,
    start: int = 0,
    localiser: Localiser | None = None,
    before_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Run EnKG from step `start` (x_T are the particles at sigma_start) to sigma = 0; returns the J particles.

    The hooks are where a runner joins the loop: `before_step(i)` before step i (e.g. the evaluator learns the step,
    to record and replay member outputs), `callback(record)` after it (commit to a store, progress, a clean stop at
    the step boundary by raising)."""
    sigmas, maps = cfg.sigmas(), maps_of(denoise)
    x = x_T
    for i in range(start, cfg.num_steps):
        if before_step is not None:
            before_step(i)
        rec = enkg_step(maps, evaluate, x, i, y, Gamma, cfg, seed, sigmas, localiser)
        x = rec.x
        if callback is not None:
            callback(rec)
    return x


class _Stacked:
    """Whitening of a stacked output [psi; x]: Gamma for the data part, the prior's C0^{-1/2} for the x part."""

    def __init__(self, Gamma: NoiseCovariance, prior_whiten: Callable[[torch.Tensor], torch.Tensor], m: int):
        self.Gamma, self.prior_whiten, self.m = Gamma, prior_whiten, m

    def whiten(self, r: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.Gamma.whiten(r[:, : self.m]), self.prior_whiten(r[:, self.m :])], dim=1)


def eki_step(
    evaluate: Evaluate,
    x: torch.Tensor,
    n: int,
    y: torch.Tensor,
    Gamma: NoiseCovariance,
    dt: float | str = 1.0,
    seed: int = 0,
    stochastic: bool = False,
    tikhonov: tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    localiser: Localiser | None = None,
    spread: tuple[str, float] = ("none", 1.0),
    t_done: float = 0.0,
) -> tuple[torch.Tensor, kalman.UpdateInfo]:
    """Iteration n of ensemble Kalman inversion (Iglesias, Law, Stuart 2013); see `eki`. `localiser` localises the
    gain (not with `tikhonov`), `spread` = (inflation kind, factor) follows the update. dt="auto": the data-misfit
    controller (schedules.data_misfit_step) with `t_done` the sum of the previous steps; once they reach 1 the
    ensemble is returned unchanged without evaluating. The step taken is returned as info.weight."""
    J = x.shape[0]
    if dt == "auto" and t_done >= 1.0:
        return x, kalman.UpdateInfo(0.0, 0.0, 0.0, 0.0, J, float("nan"), False)
    psi, ok = take_in(*evaluate(x), J, y)
    if dt == "auto":
        phi = 0.5 * Gamma.whiten(psi[ok] - y).pow(2).sum(1)
        dt = schedules.data_misfit_step(phi.cpu().numpy(), y.shape[0], t_done)
    target, whitener = y, Gamma
    if tikhonov is not None:
        m0, prior_whiten = tikhonov
        psi = torch.cat([psi, x.reshape(J, -1)], dim=1)
        target = torch.cat([y, m0.reshape(-1).to(device=y.device, dtype=y.dtype)])
        whitener = _Stacked(Gamma, prior_whiten, y.shape[0])
    eta = None
    if stochastic:
        z = rng.member_normal(seed, rng.PERTURB, range(J), (y.shape[0],), n, dtype=y.dtype).to(y.device)
        eta = torch.zeros_like(psi)
        eta[:, : y.shape[0]] = Gamma.color(z) / dt**0.5
    if localiser is not None and tikhonov is not None:
        raise ValueError("localisation is not available with Tikhonov-EKI (the stacked prior block is d x d)")
    x_new, info = kalman.eki_update(x, psi, target, whitener, dt, eta, ok, localiser)
    info = dataclasses.replace(info, weight=float(dt))
    return inflation.apply(spread[0], spread[1], x, x_new, ok), info


def eki(
    evaluate: Evaluate,
    x0: torch.Tensor,
    y: torch.Tensor,
    Gamma: NoiseCovariance,
    n_iter: int,
    dt: float | str = 1.0,
    seed: int = 0,
    stochastic: bool = False,
    tikhonov: tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    callback: Callable[[int, torch.Tensor, kalman.UpdateInfo], None] | None = None,
    start: int = 0,
    localiser: Localiser | None = None,
    spread: tuple[str, float] = ("none", 1.0),
    t_done: float = 0.0,
    before_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Ensemble Kalman inversion from the ensemble x0 (at iteration `start`), Iglesias, Law, Stuart 2013.

    With `tikhonov=(m0, prior_whiten)` it is Tikhonov-EKI (Chada, Stuart, Tong 2020): G is stacked with the identity
    and y with m0, whitened by C0^{-1/2}, so the mean converges to the minimiser of |G x - y|^2_Gamma + |x - m0|^2_C0,
    the posterior mean of a linear-Gaussian problem. `stochastic` perturbs y by N(0, Gamma/dt) per member. dt="auto"
    chooses each step by the data-misfit controller, whose clock starts at `t_done` (the steps taken before `start`:
    a resumed run restores it from the stored step weights). Hooks as in `enkg_sample`: `before_step(n)`, then
    `callback(n, x, info)` after iteration n.
    """
    x, t = x0, t_done
    for n in range(start, n_iter):
        if before_step is not None:
            before_step(n)
        x, info = eki_step(evaluate, x, n, y, Gamma, dt, seed, stochastic, tikhonov, localiser, spread, t)
        t += info.weight
        if callback is not None:
            callback(n, x, info)
    return x
