"""Clean stop on SIGTERM / SIGINT (Slurm's walltime warning, Ctrl-C): the run stops at its next safe point.

While `stop_on_signals()` is active, the first SIGTERM or SIGINT only sets a flag. The runner checks it at safe
points: after each step's commit is queued, and after each batch of member results has been handed to the store
(`checked(forward)`). There `check()` raises `Interrupted`; the runner then lets the store write the member records
and the queued steps (the commit marker last), shuts the backend down, and the CLI exits with `EXIT_INTERRUPTED`.
Members still in flight are abandoned; the step in progress is not committed, and its recorded members are reused by
`enkg-dist resume`, which ends with the same ensemble as an uninterrupted run. A second signal acts as if no handler
were installed (SIGTERM ends the process, SIGINT raises KeyboardInterrupt): the store survives that like a kill -9.

Other threads can ask for the same kind of stop with an error of their own (`fail`): the run directory's lease
keeper does when the lease is lost or the directory disappears.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

EXIT_INTERRUPTED = 75  # sysexits.h EX_TEMPFAIL: stopped cleanly, resume to continue (not 143: a hard SIGTERM kill)
SIGNALS = (signal.SIGTERM, signal.SIGINT)

_state: dict = {"active": False, "received": None, "previous": {}, "fault": None}


class Interrupted(Exception):
    """A stop signal arrived; the run stopped at a safe point with every complete step committed."""

    def __init__(self, signame: str):
        super().__init__(f"interrupted by {signame}")
        self.signame = signame
        self.step: int | None = None  # the first step not committed: where a resume continues
        self.run_dir: Path | None = None

    def message(self) -> str:
        """The one-line report: where it stopped and how to continue."""
        return f"interrupted by {self.signame} at step {self.step}; resume with: enkg-dist resume {self.run_dir}"


def _handler(signum: int, frame) -> None:
    """Record the first stop signal, and give a second one its previous meaning."""
    _state["received"] = signal.Signals(signum).name
    _restore()


def _restore() -> None:
    for sig, previous in _state["previous"].items():
        signal.signal(sig, previous)


def rearm() -> None:
    """Install the handlers again while active (ray.init replaces the SIGTERM handler with its own)."""
    if _state["active"] and _state["received"] is None:
        for sig in SIGNALS:
            signal.signal(sig, _handler)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT request a clean stop; the previous handlers come back afterwards."""
    _state.update(active=True, received=None, previous={sig: signal.getsignal(sig) for sig in SIGNALS})
    rearm()
    try:
        yield
    finally:
        _restore()
        _state.update(active=False, received=None, previous={})


def active() -> bool:
    """Whether a `stop_on_signals()` block is active in this process (a caller inside one does not nest another)."""
    return bool(_state["active"])


def check() -> None:
    """Raise Interrupted when a stop signal has arrived, or the fault another thread reported (call at safe points
    only)."""
    fault = _state["fault"]
    if fault is not None:
        _state["fault"] = None
        raise fault
    if _state["received"] is not None:
        raise Interrupted(_state["received"])


def fail(exc: BaseException) -> None:
    """From another thread (the run directory's lease keeper): stop the run at its next safe point with `exc`."""
    _state["fault"] = exc


def clear_fault(exc: BaseException | None = None) -> None:
    """Forget a reported fault (only `exc`, when given) that no run will raise any more."""
    if exc is None or _state["fault"] is exc:
        _state["fault"] = None


def checked(forward: Callable) -> Callable:
    """forward(x, on_result) that stops before dispatching, and after each batch of results is handed on."""

    def each_result(on_result):
        def handle(*result) -> None:
            if on_result is not None:
                on_result(*result)
            check()

        return handle

    def wrapped(x, on_result=None):
        check()
        return forward(x, on_result=each_result(on_result))

    return wrapped
