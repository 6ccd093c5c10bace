"""The problem interface: forward models evaluate batches and report per-member success and failure reasons."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from enkg_dist.evaluation import ForwardResult, judge
from enkg_dist.noise import NoiseCovariance

__all__ = ["ForwardModel", "ForwardResult", "InverseProblem", "safe_evaluate"]  # ForwardResult: evaluation's


class ForwardModel(ABC):
    """G: (B, *state_shape) -> (B, m). Built once per worker; must give each member's output independently of the
    batch it came in (so results do not depend on how members were sharded)."""

    state_shape: tuple[int, ...]
    obs_size: int
    on_gpu: bool = False  # whether __call__ takes CUDA tensors (and computes where they are)

    def geometry(self):
        """Where the state's entries and the observations sit (`localisation.Geometry`), for distance-based
        localisation; None for a model that declares none."""
        return None

    def for_device(self, device: torch.device) -> ForwardModel:
        """This model computing on `device` (a simulator worker's GPU), taking and returning CPU tensors; a model
        that cannot returns itself (an external program sees its GPUs through CUDA_VISIBLE_DEVICES instead)."""
        return self

    @abstractmethod
    def __call__(self, x: torch.Tensor, members: Sequence[int] | None = None) -> ForwardResult:
        """Evaluate G on each row of x; `members` are the rows' ensemble indices (for naming and logging only: the
        result for a row must never depend on them, nor on the other rows)."""

    def check_input(self, x: torch.Tensor) -> None:
        if tuple(x.shape[1:]) != tuple(self.state_shape):
            raise ValueError(f"state shape mismatch: got {tuple(x.shape[1:])}, forward model expects "
                             f"{tuple(self.state_shape)}")


@dataclass
class InverseProblem:
    """y = G(x) + eps, eps ~ N(0, Gamma)."""

    name: str
    forward: ForwardModel
    y: torch.Tensor  # (m,)
    Gamma: NoiseCovariance
    x_true: torch.Tensor | None = None  # (*state_shape)
    extras: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.y.ndim != 1 or self.y.shape[0] != self.forward.obs_size or self.Gamma.m != self.y.shape[0]:
            raise ValueError(f"observation size mismatch: y {tuple(self.y.shape)}, G gives {self.forward.obs_size}, "
                             f"Gamma is {self.Gamma.m}x{self.Gamma.m}")


def _one_line(e: BaseException) -> str:
    lines = f"{type(e).__name__}: {e}".strip().splitlines()
    return lines[0] if lines else type(e).__name__


def safe_evaluate(G: ForwardModel, x: torch.Tensor, members: Sequence[int] | None = None) -> ForwardResult:
    """G(x), judged (evaluation.judge: non-finite outputs fail their members), where an exception fails only the
    members that raise: the batch is retried member by member."""
    members = list(range(x.shape[0])) if members is None else list(members)
    try:
        return judge(G(x, members=members))
    except Exception as e:  # the simulator is a black box: any exception is a failed member
        if x.shape[0] == 1:
            psi = torch.full((1, G.obs_size), float("nan"), dtype=x.dtype)
            return ForwardResult(psi, torch.zeros(1, dtype=torch.bool), [f"simulator raised {_one_line(e)}"])
    parts = [safe_evaluate(G, x[i : i + 1], [j]) for i, j in enumerate(members)]
    return ForwardResult(torch.cat([p.psi for p in parts]), torch.cat([p.ok for p in parts]),
                         [p.reasons[0] for p in parts])
