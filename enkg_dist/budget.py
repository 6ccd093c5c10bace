"""What a run needs before it starts: forward evaluations (runner.forward_budget) and the driver's memory.

The driver holds the whole ensemble several times over during a step (particles, the clean estimates x̂0, the
denoiser's spectral work arrays, the update's result, the steps queued for the store and the copy its writer encodes)
plus the forward outputs and the Kalman update's own arrays: the unlocalised EnKG corrector one J x J matrix and the
output Gram matrix on its smaller side (enkg_dist.kalman, blocked past kalman.BLOCK_BYTES), the localised one
LOCALISED_COPIES more copies of the ensemble (enkg_dist.localisation works on transposed copies), EKI's J x J form
four J x J matrices. Add RUNTIME_BYTES for the interpreter and its libraries. Measured (issue 17, 2-core machine,
64x64 float64 linear-Gaussian, 4 steps, J = 10^4): peak RSS 4.80 GB localised (estimate 5.25 GB, +9 %), 4.03 GB
unlocalised (estimate 4.56 GB, +13 %); tests/test_budget.py checks the estimate against a real run's peak at
J = 1024. `check_memory` refuses a run whose estimate exceeds the memory this machine (or its cgroup) has
available, before anything is allocated. ENKG_MEMORY_CHECK=0 turns the refusal off.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from enkg_dist import config as cfgmod

ENSEMBLE_COPIES = 6  # of the (J, d) ensemble in the run's dtype, plus max_pending for the store's queue
LOCALISED_COPIES = 5  # more, in a localised update: the anomalies, their transpose, the gain's result, w Delta, x_new
RUNTIME_BYTES = 320 * 2**20  # the driver before its arrays: Python, torch, zarr (peak RSS of a J = 16 run)
KALMAN_BLOCK_BYTES = 64 * 2**20  # enkg_dist.kalman.BLOCK_BYTES: two blocks of the unlocalised update at a time
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
    method = cfg.eki if cfg.method == "eki" else cfg.enkg
    if method.localisation.kind != "none":
        kalman = ensemble * LOCALISED_COPIES + (m * m * 8 * 2 if cfg.method == "eki" else 0)  # EKI: m x m solve
    elif cfg.method == "eki":
        kalman = J * J * 8 * 4  # J x J systems of the Woodbury form
    else:  # A = R P^T / J, the Gram matrix on its smaller side, two column blocks
        kalman = J * J * item + min(J, m) ** 2 * item + 2 * min(ensemble, KALMAN_BLOCK_BYTES)
    parts = {
        "runtime": RUNTIME_BYTES,
        "ensemble": ensemble * (ENSEMBLE_COPIES + cfg.store.max_pending),
        "initial_draw": J * d * 8,  # the float64 draws of the first particles
        "forward_outputs": J * m * 8 * 4,  # psi, its anomalies, the recorder's copies
        "kalman": kalman,
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
