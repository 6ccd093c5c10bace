"""What a run needs before it starts: forward evaluations (runner.forward_budget) and the driver's memory.

The driver holds the whole ensemble several times over during a step (particles, the clean estimates x̂0, the
denoiser's spectral work arrays, the anomalies and the update, the steps queued for the store and the copy its
writer encodes) plus the forward outputs and J x J matrices of the Kalman update. `driver_memory` counts them as
ENSEMBLE_COPIES copies of the ensemble in the run's dtype (measured: see tests/test_budget.py, which checks the
estimate against a real run's peak), and `check_memory` refuses a run whose estimate exceeds the memory this
machine (or its cgroup) has available, before anything is allocated. ENKG_MEMORY_CHECK=0 turns the refusal off.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from enkg_dist import config as cfgmod

ENSEMBLE_COPIES = 12  # of the (J, d) ensemble in the run's dtype, plus max_pending for the store's queue
GiB = 2**30


def _sizes(cfg: cfgmod.RunConfig) -> tuple[str, int, int, int]:
    """(the key of J, J, state size d, observation size m)."""
    p = cfg.problem
    key, J = ("eki.ensemble_size", cfg.eki.ensemble_size) if cfg.method == "eki" else \
        ("enkg.ensemble_size", cfg.enkg.ensemble_size)
    d = math.prod(p.shape) if p.kind == "python" else p.n * p.n
    m = p.obs_size if p.kind in ("external", "python") else (p.n // p.k) ** 2
    return key, J, d, m


def driver_memory(cfg: cfgmod.RunConfig) -> dict:
    """Bytes the driver needs, by part, and their total."""
    key, J, d, m = _sizes(cfg)
    item = 4 if cfg.dtype == "float32" else 8
    ensemble = J * d * item
    parts = {
        "ensemble": ensemble * (ENSEMBLE_COPIES + cfg.store.max_pending),
        "initial_draw": J * d * 8,  # the float64 draws of the first particles
        "forward_outputs": J * m * 8 * 4,  # psi, its anomalies, the recorder's copies
        "kalman": J * J * 8 * 4,  # J x J systems of the corrector
    }
    return {"J_key": key, "J": J, "state_size": d, "obs_size": m, "bytes_per_value": item,
            "ensemble_bytes": ensemble, "parts": parts, "total": sum(parts.values())}


def available_memory() -> int | None:
    """Bytes this process may still allocate: the smaller of MemAvailable and its cgroup's headroom (None when
    neither is known)."""
    limits = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        cg = Path("/sys/fs/cgroup")
        high = (cg / "memory.max").read_text().strip()
        if high != "max":
            limits.append(int(high) - int((cg / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        pass
    return min(limits) if limits else None


def _gib(n: float) -> str:
    return f"{n / GiB:.3g} GiB" if n >= 0.1 * GiB else f"{n / 2**20:.3g} MiB"


def describe(cfg: cfgmod.RunConfig) -> dict:
    """The --dry-run line: the driver's estimated peak memory and what is available here."""
    est, avail = driver_memory(cfg), available_memory()
    return {"driver_estimate": _gib(est["total"]), "ensemble": _gib(est["ensemble_bytes"]),
            "available_here": None if avail is None else _gib(avail)}


def check_memory(cfg: cfgmod.RunConfig, available: int | None = None) -> None:
    """Refuse, naming the keys to change, a run whose driver would not fit in the available memory."""
    if os.environ.get("ENKG_MEMORY_CHECK", "1") == "0":
        return
    est = driver_memory(cfg)
    avail = available_memory() if available is None else available
    if avail is None or est["total"] <= avail:
        return
    p = cfg.problem
    size = f"problem.n (now {p.n})" if getattr(p, "n", None) else f"the state's size ({est['state_size']})"
    raise cfgmod.ConfigError(
        f"config error: {est['J_key']}: the driver would need about {_gib(est['total'])} ({est['J']} members x "
        f"{est['state_size']} values x {est['bytes_per_value']} B, about {ENSEMBLE_COPIES + cfg.store.max_pending} "
        f"copies) and {_gib(max(avail, 0))} is available here; lower {est['J_key']} or {size}"
        + ("" if cfg.dtype == "float32" else ", or set dtype: float32")
        + " (ENKG_MEMORY_CHECK=0 skips this check)")
