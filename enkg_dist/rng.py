"""One random stream per ensemble member, keyed by (run seed, purpose, member, step...), as in EDM's per-sample seeds.

A member's numbers never depend on how many members there are, how they were batched, or in which order they ran,
so a run gives the same ensemble on any number of workers and after any restart.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# Purposes, so that two uses of one member's stream never share numbers.
INIT = 1  # x_T ~ N(0, sigma_max^2 I)
RESAMPLE = 2  # redraw of a failed member
OBS_NOISE = 3  # synthetic observation noise
PERTURB = 4  # perturbed observations in stochastic EKI
DATA = 5  # data-set generation
TRAIN = 100  # prior training: batches, augmentation, sigma, noise, dropout (priors/training.py)
VALIDATE = 101  # prior training: the fixed validation draws


def torch_seeds(seed: int, purpose: int, *keys: int) -> tuple[int, int]:
    """Two independent 63-bit seeds for torch generators, keyed by (seed, purpose, *keys)."""
    a, b = np.random.SeedSequence([int(seed), int(purpose), *map(int, keys)]).generate_state(2, np.uint64)
    return int(a) >> 1, int(b) >> 1


def member_generator(seed: int, purpose: int, member: int, *keys: int) -> np.random.Generator:
    """A counter-based Philox stream for one member; `keys` (step, correction, ...) select independent sub-streams."""
    entropy = [int(seed), int(purpose), int(member), *map(int, keys)]
    if min(entropy) < 0:
        raise ValueError(f"seeds and keys must be non-negative, got {entropy}")
    return np.random.Generator(np.random.Philox(np.random.SeedSequence(entropy)))


def member_normal(
    seed: int,
    purpose: int,
    members: Sequence[int] | np.ndarray,
    shape: Sequence[int],
    *keys: int,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Standard normal draws of `shape` for each member, stacked to (len(members), *shape)."""
    out = np.empty((len(members), *shape), dtype=np.float64)
    for row, j in enumerate(members):
        out[row] = member_generator(seed, purpose, int(j), *keys).standard_normal(tuple(shape))
    return torch.from_numpy(out).to(dtype)
