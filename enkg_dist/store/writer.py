"""The store's background writer: one thread that runs queued step writes in order, gated by write windows.

With `defer`, a queued job starts only inside a `window()` (the runner opens one around the forward evaluations,
when the driver's cores are free), while someone waits for room or for the queue to drain (`hurried`), or on
flush/close. After a job fails, the writer drains the queue without running anything: no later step may commit.
"""

from __future__ import annotations

import atexit
import contextlib
import queue
import threading
import warnings
import weakref
from collections.abc import Callable

_OPEN: weakref.WeakSet = weakref.WeakSet()


class BackgroundWriter:
    """Runs `job()`s queued by `submit(step, job)` on one daemon thread; `on_error(step, exc)` builds the error
    that every later call raises."""

    def __init__(self, name: str, max_pending: int, defer: bool, on_error: Callable[[int, BaseException], Exception]):
        self.name, self._on_error = name, on_error
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, max_pending))
        self._defer, self._in_window, self._hurry = defer, 0, 0
        self._gate = threading.Condition()
        self._thread: threading.Thread | None = None
        self.error: Exception | None = None
        self.closed = False

    def submit(self, step: int, job: Callable[[], None]) -> None:
        """Queue a job; blocks (letting the writer run outside a window) while the queue is full."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
            _OPEN.add(self)
        try:
            self._queue.put_nowait((step, job))
        except queue.Full:
            with self.hurried():
                self._queue.put((step, job))
        self.raise_error()

    @contextlib.contextmanager
    def window(self):
        """While inside, a deferred writer runs its queued jobs."""
        with self._gate:
            self._in_window += 1
            self._gate.notify_all()
        try:
            yield
        finally:
            with self._gate:
                self._in_window -= 1

    @contextlib.contextmanager
    def hurried(self):
        with self._gate:
            self._hurry += 1
            self._gate.notify_all()
        try:
            yield
        finally:
            with self._gate:
                self._hurry -= 1

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                step, job = item
                if self.error is None:  # after a failure, drain without writing: no later step may commit
                    try:
                        with self._gate:
                            self._gate.wait_for(lambda: not self._defer or self._in_window or self._hurry)
                        job()
                    except BaseException as e:
                        self.error = self._on_error(step, e)
                        self.error.__cause__ = e
            finally:
                self._queue.task_done()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def join(self) -> None:
        """Wait until every queued job has run (or been dropped after a failure); raises nothing."""
        if self._thread is not None:
            with self.hurried():
                self._queue.join()

    def flush(self) -> None:
        """Wait for every queued job; raise the writer's error if any."""
        self.join()
        self.raise_error()

    def close(self) -> None:
        """Flush and stop the thread (the error, if any, is raised after the thread has stopped)."""
        if self.closed:
            return
        try:
            self.flush()
        finally:
            self.closed = True
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join()
                _OPEN.discard(self)


@atexit.register
def _flush_at_exit() -> None:
    """Let queued steps reach the store when the program ends without close() (the writer is a daemon)."""
    for writer in list(_OPEN):
        try:
            writer.close()
        except Exception as e:  # noqa: BLE001 - reported, never raised at exit
            warnings.warn(str(e), stacklevel=1)
