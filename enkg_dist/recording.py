"""An evaluator that records each member's forward output in the run store as it arrives, and skips members a
crashed driver had already finished (ClimaCalibrate.jl-style per-member markers)."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from enkg_dist.backends import Evaluator
from enkg_dist.problems.base import ForwardResult


@dataclass
class RecordingEvaluator(Evaluator):
    """Evaluator bound to a RunStore: `begin_step(i)` before each step; corrections are counted per call."""

    store: object = None
    skip_done: bool = False  # look for members recorded by a previous process (the first step after a resume)
    step: int = -1
    k: int = 0
    skipped: int = 0
    _pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(max_workers=4))
    _pending: list[Future] = field(default_factory=list)

    def begin_step(self, i: int, skip_done: bool = False) -> None:
        self.step, self.k, self.skip_done = i, 0, skip_done

    def _record(self, k: int, rows, psi, ok, reasons) -> None:
        self._pending.append(self._pool.submit(self.store.record_members, self.step, k, list(rows), np.array(psi),
                                               np.array(ok), list(reasons)))

    def wait_records(self) -> None:
        """Block until every member record of this step is written (called before the step commits)."""
        for f in self._pending:
            f.result()
        self._pending.clear()

    def evaluate(self, x_hat: torch.Tensor) -> ForwardResult:
        k, self.k = self.k, self.k + 1
        J = x_hat.shape[0]
        done = self.store.completed_members(self.step, k) if self.skip_done else {}
        todo = [j for j in range(J) if j not in done]
        self.skipped += len(done)
        psi = torch.full((J, self.store.array("psi").shape[-1]), float("nan"), dtype=x_hat.dtype)
        ok = torch.zeros(J, dtype=torch.bool)
        reasons: list[str | None] = [None] * J
        for j, (p, o, r) in done.items():
            psi[j], ok[j], reasons[j] = torch.from_numpy(np.asarray(p)).to(x_hat.dtype), o, r
        if todo:
            idx = np.array(todo)
            self.n_evals += len(todo)
            res = self.forward(x_hat[idx], on_result=lambda rows, p, o, r: self._record(k, idx[rows], p, o, r))
            psi[idx], ok[idx] = res.psi.to(x_hat.dtype), res.ok
            for j, r in zip(todo, res.reasons):
                reasons[j] = r
        return ForwardResult(psi, ok, reasons)

    def close(self) -> None:
        self.wait_records()
        self._pool.shutdown(wait=True)
