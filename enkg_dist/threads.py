"""The thread budget: each process that computes (a simulator worker, a prior actor, the in-process driver) runs its
intra-op threads (torch, and OpenMP / MKL / OpenBLAS through threadpoolctl when it is installed) on the CPUs it was
given, never on every core of the node.

Measured (issue 16): with torch's default threads the Navier-Stokes solver ran more than 100x slower while another
CPU-bound process shared the 2 cores. So a Ray worker takes the CPUs Ray assigned it (`execution.worker_cpus`), and
the in-process driver the CPUs it may use and that are not busy (`free_cpus`: its affinity and cgroup quota, less
the node's load when it sees the whole node). `execution.threads` overrides both.

Pure: os, torch and (optionally) threadpoolctl; imports nothing of the project.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path

import torch

# read by OpenMP, MKL, OpenBLAS, BLIS, Accelerate and numexpr when they load: libraries a user's plug-in module
# loads after the budget is set get it too
ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "BLIS_NUM_THREADS",
            "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")

_limits = None  # the process-wide threadpoolctl limit, kept alive while the budget holds


def _threadpoolctl():
    try:
        import threadpoolctl
    except ImportError:  # optional: then torch's own threads are set, and the environment variables
        return None
    return threadpoolctl


def cgroup_cpus(root: str | os.PathLike = "/sys/fs/cgroup") -> float | None:
    """CPUs of this process's cgroup quota (cgroup v2 cpu.max, e.g. a container's --cpus), None when unlimited."""
    try:
        quota, period = Path(root, "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def affinity_cpus() -> int:
    """CPUs this process may run on (its affinity mask: what Slurm, taskset or a container pinned it to)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def free_cpus(load: float | None = None) -> int:
    """CPUs this process may use that are not busy: its affinity, capped by its cgroup quota; when it may run on
    every core of the node (nobody pinned it), less the node's 1-minute load (other processes' work). At least 1."""
    n = affinity_cpus()
    quota = cgroup_cpus()
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    if n >= (os.cpu_count() or n):  # the whole node is visible: share it with what already runs there
        if load is None:
            try:
                load = os.getloadavg()[0]
            except OSError:
                load = 0.0
        n = n - int(round(load))
    return max(1, n)


def for_cpus(cpus: float | None) -> int:
    """Threads for a process given `cpus` CPUs (Ray's fractional grants rounded down, at least 1)."""
    return max(1, int(math.floor(cpus))) if cpus else 1


def in_use() -> dict:
    """The threads this process runs: torch's intra-op threads, and the native pools threadpoolctl sees."""
    out = {"torch": torch.get_num_threads()}
    tpc = _threadpoolctl()
    if tpc is not None:
        for pool in tpc.threadpool_info():
            key = pool.get("internal_api") or pool.get("user_api")
            out[key] = max(out.get(key, 0), int(pool.get("num_threads", 0)))
    return out


def set_threads(n: int, environment: bool = True) -> dict:
    """Run this process's intra-op threads on `n` CPUs (torch; OpenMP/MKL/OpenBLAS through threadpoolctl; with
    `environment` also the variables libraries read when they load later). Returns `in_use()`."""
    global _limits
    n = max(1, int(n))
    torch.set_num_threads(n)
    if environment:
        for var in ENV_VARS:
            os.environ[var] = str(n)
    tpc = _threadpoolctl()
    if tpc is not None:
        _limits = tpc.threadpool_limits(limits=n)
    return in_use()


@contextmanager
def budget(n: int):
    """`set_threads(n)` for the body, then the previous torch threads, native pools and environment restored (the
    in-process driver: a run inside a notebook or a test leaves the process as it found it)."""
    global _limits
    before_torch, before_limits = torch.get_num_threads(), _limits
    before_env = {v: os.environ.get(v) for v in ENV_VARS}
    tpc = _threadpoolctl()
    saved = tpc.threadpool_limits(limits=None) if tpc is not None else None  # a no-op limit that remembers
    try:
        yield set_threads(n)
    finally:
        torch.set_num_threads(before_torch)
        if saved is not None:
            saved.restore_original_limits()
        _limits = before_limits
        for var, value in before_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
