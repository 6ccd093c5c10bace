"""A forward model given as Python code (`problem.kind: python`): a factory "package.module:factory" returns G.

G is either a plain callable on a batch of states, `G(x) -> (B, obs_size)` values (torch tensors, or numpy arrays
with `array="numpy"`), or a `problems.base.ForwardModel`. What travels to a Ray worker is the factory's name and
keyword arguments (`factories.FactorySpec`): each worker imports the module and builds G once, at its first batch.
A member fails exactly as with the built-in problems: G raising fails only the members that raise (`safe_evaluate`
retries the batch member by member), and a non-finite output fails its member (`evaluation.judge`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch

from enkg_dist.factories import FactorySpec  # noqa: F401 - the type of `spec`
from enkg_dist.localisation import Geometry
from enkg_dist.problems.base import ForwardModel, ForwardResult


class PluginForward(ForwardModel):
    """G = factory(**kwargs) on states of shape `state_shape`, returning `obs_size` values per member."""

    def __init__(self, spec: FactorySpec, state_shape: Sequence[int], obs_size: int, array: str = "torch",
                 obs_coordinates: torch.Tensor | None = None):
        if array not in ("torch", "numpy"):
            raise ValueError(f"array must be torch or numpy, got {array!r}")
        self.spec, self.array = spec, array
        self.state_shape, self.obs_size = tuple(int(s) for s in state_shape), int(obs_size)
        self.obs_coordinates = obs_coordinates  # (m, 2) grid coordinates of the outputs, when declared
        self.device: torch.device | None = None  # set by for_device (a simulator worker's GPU)

    @property
    def name(self) -> str:
        return self.spec.name

    def model(self):
        """G, built once in this process (a factory taking `device` is given this model's device)."""
        extra = {}
        if self.device is not None and "device" not in self.spec.kwargs and self.spec.accepts("device"):
            extra["device"] = str(self.device)
        G = self.spec.build(**extra)
        if isinstance(G, torch.nn.Module) and self.device is not None:
            G = G.to(self.device)
        return G

    def geometry(self):
        """The n x n grid of a (C, n, n) state, with the outputs where `coordinates` put them; None without them."""
        s = self.state_shape
        if self.obs_coordinates is None or len(s) != 3 or s[1] != s[2]:
            return None
        return Geometry(s[1], s[0], self.obs_coordinates)

    def for_device(self, device: torch.device) -> PluginForward:
        other = copy.copy(self)
        other.spec = self.spec.fresh()  # built anew there
        other.device = torch.device(device)
        return other

    def __call__(self, x: torch.Tensor, members: Sequence[int] | None = None) -> ForwardResult:
        self.check_input(x)
        G = self.model()
        if isinstance(G, ForwardModel):
            res = G(x, members=members)
            return ForwardResult(res.psi.detach().cpu().to(x.dtype), res.ok.cpu(), list(res.reasons))
        inp = x if self.device is None else x.to(self.device)
        if self.array == "numpy":
            inp = inp.detach().cpu().numpy()
        out = G(inp)
        psi = out.detach().cpu() if isinstance(out, torch.Tensor) else torch.from_numpy(np.array(out, dtype=float))
        if psi.ndim == 0 or psi.shape[0] != x.shape[0] or psi[0].numel() != self.obs_size:
            raise ValueError(f"{self.spec.key} {self.spec.name!r} returned shape {tuple(psi.shape)} for "
                             f"{x.shape[0]} members; expected ({x.shape[0]}, {self.obs_size})")
        return ForwardResult.from_outputs(psi.reshape(x.shape[0], self.obs_size).to(x.dtype))
