"""The Gaussian-field prior: a stationary Gaussian random field is its own exact denoiser (a Fourier multiplier).

The field itself lives in the neutral pure module `enkg_dist.fields` (problems and the data generator draw from it
too); this module names it as a prior.
"""

from __future__ import annotations

from enkg_dist.fields import GaussianField, rfft_weights, shell_average, shell_sum, wavenumbers

GaussianFieldPrior = GaussianField  # fitted (`fit`) or spectral (`matern_like`); exact denoise, sample, whiten

__all__ = ["GaussianFieldPrior", "rfft_weights", "shell_average", "shell_sum", "wavenumbers"]
