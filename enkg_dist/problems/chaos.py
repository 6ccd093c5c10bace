"""A forward model that fails on purpose: wraps another and makes chosen members raise, return NaN, or hang.

For testing a deployment's fault handling (and ours). Which members fail depends only on the seed and the member's
input values, never on the worker or the order, so a chaotic run is reproducible.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import torch

from enkg_dist.problems.base import ForwardModel, ForwardResult

MODES = ("raise", "nan", "hang")


class SimulatorCrash(RuntimeError):
    """The error a chaotic member raises."""


class ChaosForward(ForwardModel):
    """G_chaos(x) = G(x), except a fraction `fail_rate` of members fail by one of `modes`; `delay` s per member."""

    def __init__(self, inner: ForwardModel, fail_rate: float = 0.1, modes=MODES, seed: int = 0,
                 hang_seconds: float = 3600.0, delay: float = 0.0, log: str | None = None):
        bad = set(modes) - set(MODES)
        if bad:
            raise ValueError(f"unknown chaos modes {sorted(bad)}; allowed: {', '.join(MODES)}")
        self.inner, self.fail_rate, self.modes, self.seed = inner, fail_rate, tuple(modes), seed
        self.hang_seconds, self.delay, self.log = hang_seconds, delay, log
        self.state_shape, self.obs_size, self.on_gpu = inner.state_shape, inner.obs_size, inner.on_gpu

    def geometry(self):
        return self.inner.geometry()

    def for_device(self, device: torch.device) -> ChaosForward:
        """The same failures around the inner model on `device`."""
        return ChaosForward(self.inner.for_device(device), self.fail_rate, self.modes, self.seed, self.hang_seconds,
                            self.delay, self.log)

    def _hash(self, row: torch.Tensor) -> int:
        h = hashlib.blake2b(row.detach().cpu().numpy().tobytes(), digest_size=8, key=str(self.seed).encode())
        return int.from_bytes(h.digest(), "little")

    def fate(self, row: torch.Tensor) -> str | None:
        """The failure mode of a member with this input, or None: a hash of (seed, input bytes)."""
        u = self._hash(row) / 2**64
        return self.modes[int(u / self.fail_rate * len(self.modes))] if u < self.fail_rate else None

    def __call__(self, x: torch.Tensor, members=None) -> ForwardResult:
        fates = [self.fate(row) for row in x]
        if self.delay:
            time.sleep(self.delay * x.shape[0])
        if self.log:  # one line per evaluated member: lets a test count re-evaluations across restarts
            with open(self.log, "a") as f:
                f.write("".join(f"{self._hash(row):016x}\n" for row in x))
        if "hang" in fates:
            time.sleep(self.hang_seconds)
        if "raise" in fates:
            raise SimulatorCrash(f"chaos: simulated crash of a member (seed {self.seed})")
        res = self.inner(x, members)
        psi = res.psi.clone()
        psi[[i for i, f in enumerate(fates) if f == "nan"]] = float("nan")
        return ForwardResult.from_outputs(psi)

    def expected_failures(self, x: torch.Tensor) -> np.ndarray:
        """Boolean mask of the members this model will fail."""
        return np.array([self.fate(row) is not None for row in x])
