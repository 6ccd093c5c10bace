"""Forward outputs on their way to the Kalman update, judged by the one rule of what a failed member is.

A member fails when its simulator raised, timed out or was lost, or when any of its outputs is not finite (NaN or
inf). The rule lives in `failure` (torch-free, so the store needs no torch); `judge` applies it to a forward result,
and every one is judged where it is made (`problems.base.safe_evaluate`, which runs every in-process chunk and every
simulator worker's batch); the store records members through the rule, the evaluator counts failures against the
cap through it, and the sampler takes outputs in through it (`take_in`: an `evaluate` callable may be anyone's).
Judging twice changes nothing, so what the store records, what the cap counts and what the update sees always agree.
`kalman` only asserts the rule's result (no non-finite output among members marked ok).

Pure: torch only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from enkg_dist.failure import NON_FINITE, finite_rows, judged  # the rule itself, torch-free

# evaluate(x_hat) -> (psi (J, m), ok (J,)): the sampler's collaborator (an `Evaluator`, or any callable)
Evaluate = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class ForwardResult:
    """psi (B, m); ok (B,) bool; reasons[b] says why member b failed (None when it succeeded)."""

    psi: torch.Tensor
    ok: torch.Tensor
    reasons: list[str | None]

    @classmethod
    def from_outputs(cls, psi: torch.Tensor) -> ForwardResult:
        """A model's outputs, judged: rows with non-finite values failed."""
        return judge(cls(psi, torch.ones(psi.shape[0], dtype=torch.bool, device=psi.device), [None] * psi.shape[0]))


def judge(res: ForwardResult) -> ForwardResult:
    """`res` with the rule applied (see `judged`)."""
    ok, reasons = judged(res.psi, res.ok, list(res.reasons))
    return ForwardResult(res.psi, ok, reasons)


def take_in(psi: torch.Tensor, ok, J: int, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(psi, ok) as the update takes them: on y's device and dtype, judged, failed rows zeroed. Outputs may come back
    on the CPU in float64 while the particles live elsewhere in float32: this is the one place the driver takes them
    in (a value finite in float64 but not in y's dtype fails its member)."""
    if psi.shape != (J, y.shape[0]):
        raise ValueError(f"forward outputs have shape {tuple(psi.shape)}, expected ({J}, {y.shape[0]})")
    psi = psi.to(device=y.device, dtype=y.dtype)
    ok = torch.as_tensor(ok, dtype=torch.bool).reshape(-1).to(y.device)
    if ok.shape != (J,):
        raise ValueError(f"ok mask has shape {tuple(ok.shape)}, expected ({J},)")
    ok = ok & finite_rows(psi)
    return torch.where(ok[:, None], psi, torch.zeros((), dtype=psi.dtype, device=psi.device)), ok


class TooManyFailures(RuntimeError):
    """More members failed in one evaluation than the configured fraction allows."""


@dataclass
class Evaluator:
    """An `Evaluate` for the sampler around forward(x) -> ForwardResult: counts runs, keeps failure reasons, enforces
    the failure cap (TooManyFailures)."""

    forward: Callable[..., ForwardResult]  # forward(x, on_result=None)
    max_failed_fraction: float = 0.5
    n_evals: int = 0
    n_failed: int = 0
    last: ForwardResult | None = None
    failures: list[tuple[int, str]] = field(default_factory=list)

    def __call__(self, x_hat) -> tuple[torch.Tensor, torch.Tensor]:
        """(psi, ok) as CPU tensors, whatever device the forward model or the particles use."""
        res = self.evaluate(x_hat)
        res = judge(ForwardResult(res.psi.detach().cpu(), res.ok.cpu(), res.reasons))
        J = x_hat.shape[0]
        self.last = res
        self.failures = [(j, r) for j, r in enumerate(res.reasons) if r is not None]
        failed = int((~res.ok).sum())
        self.n_failed += failed
        if failed > self.max_failed_fraction * J:
            first = next((r for r in res.reasons if r), NON_FINITE)
            raise TooManyFailures(f"{failed} of {J} members failed (limit {self.max_failed_fraction:.0%}); "
                                  f"first reason: {first}")
        return res.psi, res.ok

    def evaluate(self, x_hat) -> ForwardResult:
        """All members' forward runs, counted in n_evals (a subclass may skip some or record them)."""
        self.n_evals += x_hat.shape[0]
        return self.forward(x_hat)
