"""An evaluator that records each member's forward output in the run store as it arrives, and skips members a
crashed driver had already finished (ClimaCalibrate.jl-style per-member markers)."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from enkg_dist.evaluation import Evaluator, ForwardResult


@dataclass
class RecordingEvaluator(Evaluator):
    """Evaluator bound to a RunStore: `begin_step(i)` before each step; corrections are counted per call."""

    store: object = None
    skip_done: bool = False  # look for members recorded by a previous process (the first step after a resume)
    step: int = -1
    k: int = 0
    skipped: int = 0
    _pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "run-store-recorder"))
    _pending: list[Future] = field(default_factory=list)
    _arrived: list = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def begin_step(self, i: int, skip_done: bool = False) -> None:
        self.step, self.k, self.skip_done = i, 0, skip_done

    def _record(self, k: int, rows, psi, ok, reasons) -> None:
        with self._lock:
            self._arrived.append((self.step, k, np.asarray(rows), np.array(psi), np.array(ok), list(reasons)))
        self._pending.append(self._pool.submit(self._write_arrived))

    def _write_arrived(self) -> None:
        """Recorder thread: everything that arrived since its last write, in one store call per correction."""
        with self._lock:
            arrived, self._arrived = self._arrived, []
        for step, k in dict.fromkeys((a[0], a[1]) for a in arrived):
            parts = [a for a in arrived if (a[0], a[1]) == (step, k)]
            self.store.record_members(step, k, np.concatenate([a[2] for a in parts]),
                                      np.concatenate([a[3] for a in parts]), np.concatenate([a[4] for a in parts]),
                                      [r for a in parts for r in a[5]])

    def wait_records(self) -> None:
        """Block until every member record of this step is written (called before the step commits); a failed write
        (a full disk) is raised once, after all of them have finished."""
        pending, self._pending = self._pending, []
        errors = [f.exception() for f in pending]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first

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
            with self.store.write_window():  # the previous step's commit is written while the simulators run
                res = self.forward(x_hat[idx], on_result=lambda rows, p, o, r: self._record(k, idx[rows], p, o, r))
            psi[idx], ok[idx] = res.psi.to(device=psi.device, dtype=x_hat.dtype), res.ok.cpu()
            for j, r in zip(todo, res.reasons):
                reasons[j] = r
        return ForwardResult(psi, ok, reasons)

    def close(self) -> None:
        try:
            self.wait_records()
        finally:
            self._pool.shutdown(wait=True)
