"""The solver's lanes on CPU threads: a process-wide pool whose threads compute with one intra-op thread each, and
a queue that the calling thread and threads-1 pool threads drain. A lane's bits then depend on its members only,
never on the thread count (FFT results can depend on the intra-op thread count).
"""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_pid = -1
_pool_lock = threading.Lock()


def workers(extra: int) -> ThreadPoolExecutor:
    """A pool of at least `extra` threads whose torch ops run single-threaded (made once per process)."""
    global _pool, _pool_size, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_size < extra or _pool_pid != os.getpid():
            before = torch.get_num_threads()
            pool = ThreadPoolExecutor(extra, thread_name_prefix="ns-lane", initializer=torch.set_num_threads,
                                      initargs=(1,))
            started = threading.Barrier(extra + 1)
            for _ in range(extra):  # start every thread now, so that their set_num_threads(1) is over ...
                pool.submit(started.wait)
            started.wait()
            torch.set_num_threads(before)  # ... before this restores the process default it also set
            if _pool is not None and _pool_pid == os.getpid():
                _pool.shutdown(wait=False)
            _pool, _pool_size, _pool_pid = pool, extra, os.getpid()
        return _pool


@contextmanager
def single_threaded_ops():
    """torch ops in this thread on one intra-op thread (FFT results can depend on the intra-op thread count)."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_all(tasks, threads: int) -> None:
    """Run the zero-argument callables: here and on threads-1 pool threads, each taking the next from a queue."""
    tasks = deque(tasks)
    if threads <= 1 or len(tasks) <= 1:
        while tasks:
            tasks.popleft()()
        return

    def drain():
        while True:
            try:
                task = tasks.popleft()
            except IndexError:
                return
            task()

    futures = [workers(threads - 1).submit(drain) for _ in range(min(threads, len(tasks)) - 1)]
    try:
        drain()
    finally:
        errors = [f.exception() for f in futures]
    for e in errors:
        if e is not None:
            raise e
