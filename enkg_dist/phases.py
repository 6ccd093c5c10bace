"""Where a step's time goes: seconds in the prior (x_hat0 maps and predictor), in the forward runs (dispatch,
simulators, gather), in the run store (waiting for member records, handing the step to the writer), and the rest
(the Kalman update, localisation, inflation: the driver's own maths). Recorded per step in the store's `timings`."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager

PHASES = ("denoise", "forward", "update", "store")  # a step's row besides its total (the store's timing fields)


class PhaseClock:
    """Seconds per phase since `start_step`; `timings(total)` gives the step's row (update = total - the others)."""

    PHASES = tuple(p for p in PHASES if p != "update")  # the ones timed; update is what they leave

    def __init__(self):
        self.seconds = dict.fromkeys(self.PHASES, 0.0)

    def start_step(self) -> None:
        self.seconds = dict.fromkeys(self.PHASES, 0.0)

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0

    def wrap(self, name: str, fn: Callable) -> Callable:
        """fn, its calls counted in phase `name`."""

        def timed(*args, **kwargs):
            with self.phase(name):
                return fn(*args, **kwargs)

        return timed

    def timings(self, total: float) -> dict[str, float]:
        """The step's row: total, each phase, and update = what the phases leave of the total."""
        s = self.seconds
        return {"total": total, **s, "update": max(0.0, total - sum(s.values()))}
