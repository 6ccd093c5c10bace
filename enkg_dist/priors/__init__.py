"""Priors: each offers `denoise(x, sigma) ~ E[x0 | x0 + sigma n = x]` on batches of shape (B, *state_shape).

What the sampler, the runner and the prior actors use of a prior is declared here (`Prior`, `GaussianPrior`), so
none of them probes a prior with hasattr:
- every prior: `state_shape`, `denoise(x, sigma)`, `device` (where its weights are), `max_batch` (members per
  network call, None for all at once: the prior actors batch members by global index with it), `to(device)`;
- Gaussian priors (the exact field and the fitted one) also `sample(z)`, `whiten(x)` and `mean`: EKI draws its
  ensemble and Tikhonov-EKI whitens with them, and a synthetic twin draws its truth.
The two prior computations of a step, the x_hat0 map and the predictor, are `sampler.DenoiserMaps`: by default they
run in this process through `denoise`; a remote prior (`distributed.prior.RemotePrior`) is a `DenoiserMaps` that runs
them on its actors, where the model lives.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Prior(Protocol):
    """A denoiser prior on fields of shape `state_shape` (learned.LearnedPrior, gaussian.GaussianFieldPrior)."""

    @property
    def state_shape(self) -> tuple[int, ...]: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def max_batch(self) -> int | None: ...

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor: ...

    def to(self, device) -> Prior: ...


@runtime_checkable
class GaussianPrior(Prior, Protocol):
    """A Gaussian prior N(mean, C): draws and whitening besides its exact denoiser (gaussian.GaussianFieldPrior)."""

    mean: torch.Tensor

    def sample(self, z: torch.Tensor) -> torch.Tensor: ...

    def whiten(self, x: torch.Tensor) -> torch.Tensor: ...
