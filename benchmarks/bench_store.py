"""Checkpoint overhead of the Zarr run store against this disk's own sequential write rate.

    python benchmarks/bench_store.py            # J = 1024 members at 128 x 128 float32 (64 MiB a step)
    python benchmarks/bench_store.py --quick    # J = 128 (8 MiB a step)

Times the blocking part of commit_step (what the EnKG loop waits for), the writer thread's throughput when steps
are committed back to back (writer-bound), per-member record_member calls, and a plain-Python write of the same
bytes, with and without fsync (the store itself never fsyncs: it relies on atomic renames).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from enkg_dist.store import RunStore

MiB = 2**20


def plain_write(path: Path, block: np.ndarray, n: int, fsync: bool) -> float:
    """Seconds to write n copies of block sequentially (then fsync when asked)."""
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(n):
            f.write(block.data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    dt = time.perf_counter() - t0
    path.unlink()
    return dt


def bench_store(root: Path, J: int, n: int, steps: int, obs: int) -> dict:
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((J, n, n), dtype=np.float32) for _ in range(2)]
    store = RunStore.create(root / "run.zarr", config={}, config_yaml="", J=J, state_shape=(n, n), obs_size=obs,
                            num_steps=steps, num_corrections=1, dtype="float32", max_pending=2)
    psi = rng.standard_normal(obs).astype(np.float32)
    t0 = time.perf_counter()
    for j in range(min(J, 64)):
        store.record_member(0, 0, j, psi, True)
    per_member = (time.perf_counter() - t0) / min(J, 64)
    half = steps // 2
    paced = []  # the loop computes for longer than a write takes: the queue has room, commit_step only copies
    for t in range(half):
        store.flush()
        t1 = time.perf_counter()
        store.commit_step(t, xs[t % 2], {"sigma": 1.0})
        paced.append(time.perf_counter() - t1)
    store.flush()
    full = []  # back to back: the writer is the bottleneck, commit_step waits for room in the queue
    t0 = time.perf_counter()
    for t in range(half, steps):
        t1 = time.perf_counter()
        store.commit_step(t, xs[t % 2], {"sigma": 1.0})
        full.append(time.perf_counter() - t1)
    store.flush()
    total = time.perf_counter() - t0
    store.close()
    on_disk = sum(f.stat().st_size for f in (root / "run.zarr").rglob("*") if f.is_file())
    return {"paced": np.array(paced), "full": np.array(full), "total": total, "n_full": steps - half,
            "per_member": per_member, "on_disk": on_disk}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="J = 128 instead of 1024")
    p.add_argument("--J", type=int, default=None)
    p.add_argument("--n", type=int, default=128, help="state is n x n float32")
    p.add_argument("--steps", type=int, default=None, help="half paced, half back to back (16 quick, 8 full)")
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    a = p.parse_args()
    J = a.J or (128 if a.quick else 1024)
    a.steps = a.steps or (16 if a.quick else 8)
    root = Path(tempfile.mkdtemp(prefix="bench-store-", dir=a.dir))
    try:
        step_bytes = J * a.n * a.n * 4
        r = bench_store(root, J, a.n, a.steps, obs=1024)
        block = np.random.default_rng(1).standard_normal(step_bytes // 4, dtype=np.float32)
        cached = plain_write(root / "plain.bin", block, a.steps, fsync=False)
        synced = plain_write(root / "plain.bin", block, a.steps, fsync=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    step_mib = step_bytes / MiB
    print(f"J = {J}, state {a.n}x{a.n} float32: {step_mib:.1f} MiB of particles a step, {a.steps} steps "
          f"(full_every = 1), on disk {r['on_disk'] / MiB:.1f} MiB")
    rows = [
        ("commit_step blocking, queue has room (median)", f"{np.median(r['paced']) * 1e3:9.1f} ms"),
        ("commit_step blocking, writer saturated (median)", f"{np.median(r['full']) * 1e3:9.1f} ms"),
        ("store writer throughput (back to back)", f"{r['n_full'] * step_mib / r['total']:7.1f} MiB/s"),
        ("plain write, no fsync (page cache)", f"{a.steps * step_mib / cached:7.1f} MiB/s"),
        ("plain write + fsync (disk)", f"{a.steps * step_mib / synced:7.1f} MiB/s"),
        ("store throughput / (write + fsync)", f"{(r['n_full'] / r['total']) / (a.steps / synced):9.2f} x"),
        ("record_member, one psi of 1024 float32", f"{r['per_member'] * 1e3:9.2f} ms"),
    ]
    print(f"{'what':50s} {'value':>12s}")
    for what, value in rows:
        print(f"{what:50s} {value:>12s}")

if __name__ == "__main__":
    main()
