"""Checkpoint overhead of the Zarr run store against this disk's own sequential write rate.

    python benchmarks/bench_store.py            # J = 1024 members at 128 x 128 float32 (64 MiB a step)
    python benchmarks/bench_store.py --quick    # J = 128 (8 MiB a step)
    python benchmarks/bench_store.py --step     # also: EnKG step time with the store on vs off (J = 1024, 128^2)

Times the blocking part of commit_step (what the EnKG loop waits for), the writer thread's throughput when steps
are committed back to back (writer-bound), per-member records (one at a time, and J members arriving in 8 groups),
and a plain-Python write of the same bytes, with and without fsync (the store itself never fsyncs: it relies on
atomic renames).

--step times whole guided EnKG steps (linear-Gaussian problem at n x n, float32, K = 1) the way the runner runs them,
with the store off (plain Evaluator) and on (RecordingEvaluator recording every member's output as it arrives, then
the runner's commit: mean, std and, every --checkpoint-every steps, the full ensemble, written by the deferred
writer while the next step's simulations run), alternating off/on. The simulator stands for a cluster of W workers
(--workers): every member takes `--sim` seconds, W run at once, results arrive spread over each wave. W = J is the
extreme where a whole step's members finish within one simulator time and the store's share is the largest. The
step times are means over all timed steps of a run (the steps that write an ensemble count with their share); the
overhead is the median over rounds of (run with the store on) / (run with it off, just before) - 1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

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
    psi = rng.standard_normal((J, obs)).astype(np.float32)
    t0 = time.perf_counter()
    for j in range(min(J, 64)):  # one member per write: a whole member block rewritten each time
        store.record_members(0, 0, [j], psi[j:j + 1], [True])
    per_member = (time.perf_counter() - t0) / min(J, 64)
    t0 = time.perf_counter()
    for rows in np.array_split(np.arange(J), 8):  # members arriving in 8 groups, as the recorder writes them
        store.record_members(1, 0, rows, psi[rows], np.ones(len(rows), bool))
    per_member_grouped = (time.perf_counter() - t0) / J
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
            "per_member": per_member, "per_member_grouped": per_member_grouped, "on_disk": on_disk}


def cluster_forward(G, sim: float, workers: int, groups: int = 8):
    """forward(x, on_result) as W = `workers` simulator workers would run it: waves of W members, each wave taking
    `sim` s of wall time, its results arriving in `groups` parts spread over the wave."""
    from enkg_dist.problems.base import ForwardResult

    def forward(x, on_result=None):
        res = G(x)
        ok = torch.ones(x.shape[0], dtype=torch.bool)
        for wave in np.array_split(np.arange(x.shape[0]), -(-x.shape[0] // workers)):
            for rows in np.array_split(wave, groups):
                time.sleep(sim / groups)
                if on_result is not None:
                    on_result(list(rows), res.psi[rows].numpy(), ok[rows].numpy(), [None] * len(rows))
        return ForwardResult(res.psi, ok, [None] * x.shape[0])

    return forward


def _commit(store, ev, i, x, sigma, infos, t0) -> None:
    """The runner's commit (runner._StepHooks._commit): the member records first, then the step."""
    ev.wait_records()
    store.commit_step(i, x.detach().cpu(), {"sigma": sigma, "misfit": [u.misfit for u in infos],
                                            "weight": [u.weight for u in infos],
                                            "timings": {"total": time.perf_counter() - t0}}, copy=False)


def bench_step(root: Path, J: int, n: int, sim: float, workers: int, steps: int, rounds: int, every: int) -> dict:
    """Seconds of each guided EnKG step with the store off and on (the full ensemble written every `every` steps)."""
    from enkg_dist import sampler
    from enkg_dist.evaluation import Evaluator
    from enkg_dist.problems.linear_gaussian import make_problem
    from enkg_dist.recording import RecordingEvaluator

    problem, prior, _ = make_problem(n=n, k=2, noise_std=0.1, dtype=torch.float32)
    forward = cluster_forward(problem.forward, sim, workers)
    cfg = sampler.EnKGConfig(num_steps=steps + 1, num_corrections=1, guidance_start=0.0, guidance_end=0.0)
    y, sigmas = problem.y.to(torch.float32), cfg.sigmas()
    x0 = sampler.initial_particles(0, J, prior.state_shape, cfg.sigma_max, torch.float32)
    times = {"off": [[] for _ in range(rounds)], "on": [[] for _ in range(rounds)]}
    for r in range(rounds):
        for mode in ("off", "on"):
            store = None
            if mode == "on":
                store = RunStore.create(root / f"step-{workers}-{every}-{r}.zarr", config={}, config_yaml="",
                                        J=J, state_shape=prior.state_shape, obs_size=problem.forward.obs_size,
                                        num_steps=steps + 1, num_corrections=1, dtype="float32",
                                        full_every=every, checkpoint_every=every, defer_writes=True)
                ev = RecordingEvaluator(forward, store=store)
            else:
                ev = Evaluator(forward)
            x = x0.clone()
            for i in range(steps):
                t0 = time.perf_counter()
                if store is not None:
                    ev.begin_step(i)
                rec = sampler.enkg_step(prior.denoise, ev, x, i, y, problem.Gamma, cfg, 0, sigmas)
                x = rec.x
                if store is not None:
                    _commit(store, ev, i, x, rec.sigma, [c.info for c in rec.corrections], t0)
                if i > 0:  # the first step warms caches and thread pools
                    times[mode][r].append(time.perf_counter() - t0)
            if store is not None:
                ev.close()
                store.close()
    return {k: np.array(v) for k, v in times.items()}  # (rounds, steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="J = 128 instead of 1024")
    p.add_argument("--J", type=int, default=None)
    p.add_argument("--n", type=int, default=128, help="state is n x n float32")
    p.add_argument("--steps", type=int, default=None, help="half paced, half back to back (16 quick, 8 full)")
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    p.add_argument("--step", action="store_true", help="also time EnKG steps with the store on vs off")
    p.add_argument("--sim", type=float, default=1.0, help="seconds per member of the --step simulator")
    p.add_argument("--rounds", type=int, default=3, help="off/on pairs of --step runs (8 timed steps each); the "
                   "overhead is the median of the pairs' ratios, robust to a slow spell of a shared machine")
    p.add_argument("--workers", default="64,1024", help="--step: simulator workers emulated (comma-separated)")
    p.add_argument("--checkpoint-every", default="1,4",
                   help="--step: write the full ensemble every n-th step (store.full_every = checkpoint_every = n)")
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
        Ws = [int(w) for w in a.workers.split(",")] if a.step else []
        ms = [int(m) for m in a.checkpoint_every.split(",")]
        st = {(W, m): bench_step(root, J, a.n, a.sim, W, 9, a.rounds, m) for W in Ws for m in ms}
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
        ("record a member alone (psi of 1024 float32)", f"{r['per_member'] * 1e3:9.2f} ms"),
        (f"record per member, J in 8 groups of {J // 8}", f"{r['per_member_grouped'] * 1e3:9.3f} ms"),
    ]
    print(f"{'what':50s} {'value':>12s}")
    for what, value in rows:
        print(f"{what:50s} {value:>12s}")
    for (W, m), t in st.items():
        off, on = t["off"].mean(1), t["on"].mean(1)  # per round: a run with the store off, then one with it on
        ratios = on / off - 1
        print(f"\nguided EnKG step, J = {J}, {a.n}x{a.n} float32, K = 1, simulator {a.sim:g} s per member on {W} "
              f"workers, {a.rounds} rounds of {t['off'].shape[1]} steps off then on; ensemble written every {m} "
              "step(s):")
        print(f"{'store off, mean step':50s} {off.mean():9.2f} s")
        print(f"{'store on (every member recorded, commits)':50s} {on.mean():9.2f} s")
        print(f"{'overhead per round (on / off - 1)':50s} {' '.join(f'{100 * q:.1f}' for q in ratios):>12s} %")
        print(f"{'checkpoint overhead, median of the rounds':50s} {np.median(ratios) * 100:9.1f} %")

if __name__ == "__main__":
    main()
