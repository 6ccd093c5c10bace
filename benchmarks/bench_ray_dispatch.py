"""Orchestration overhead of the Ray worker pool, measured side by side with the in-process loop.

1. Parallel efficiency: a simulator that sleeps 50 ms per member (releasing the CPU), J = 256 members, W workers:
   efficiency = (J x 50 ms / W) / measured time.
2. Per-member dispatch overhead with a zero-cost simulator: (pool time - in-process time) / J.
   Each W runs with the members-per-task sizes of --batch ("auto": distributed.pool.auto_batch_size, which times
   members on the first call and re-sizes for the timed ones).
Usage: python benchmarks/bench_ray_dispatch.py [--workers 1,2,4,8,16,32] [--J 256] [--batch 1,auto]
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from timing import best_of

from enkg_dist.distributed import cluster
from enkg_dist.distributed.pool import PoolOptions, WorkerPool
from enkg_dist.problems.base import safe_evaluate
from enkg_dist.problems.chaos import ChaosForward
from enkg_dist.problems.linear_gaussian import SubsampleBlur


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", default="1,2,4,8,16,32")
    ap.add_argument("--J", type=int, default=256)
    ap.add_argument("--sleep", type=float, default=0.05)
    ap.add_argument("--batch", default="1,auto", help="members per task, comma-separated; 'auto' allowed")
    args = ap.parse_args()
    batches = [None if b == "auto" else int(b) for b in args.batch.split(",")]
    Ws = [int(w) for w in args.workers.split(",")]
    J = args.J
    cluster.connect(None, num_cpus=max(Ws) + 2)
    x = torch.randn(J, 1, 16, 16, dtype=torch.float64)
    slow = ChaosForward(SubsampleBlur(16, 2), fail_rate=0.0, delay=args.sleep)
    free = SubsampleBlur(16, 2)

    t_local_slow = best_of(lambda: safe_evaluate(slow, x[:32]), 1) * J / 32
    print(f"in-process loop, {args.sleep * 1e3:.0f} ms simulator: {t_local_slow:.2f} s for J={J} (extrapolated "
          f"from 32 members)")
    print("| workers W | members per task | ideal (s) | measured (s) | parallel efficiency | speed-up vs in-process |")
    print("|---|---|---|---|---|---|")
    for W in Ws:
        pool = WorkerPool(slow, slow.obs_size, PoolOptions(num_workers=W, num_cpus=1))
        pool.wait_ready()  # worker start-up (W processes importing torch on 2 cores) is not dispatch overhead
        for bs in batches:
            pool.options = replace(pool.options, batch_size=bs)
            t = best_of(lambda: pool.evaluate(x), 2)
            ideal = J * args.sleep / W
            label = f"auto ({pool.stats.batch_sizes[-1]})" if bs is None else bs
            print(f"| {W} | {label} | {ideal:.2f} | {t:.2f} | {ideal / t:.3f} | {t_local_slow / t:.1f}x |",
                  flush=True)
        pool.shutdown()

    t_local = best_of(lambda: [safe_evaluate(free, x[i : i + 1]) for i in range(J)])
    print(f"\nzero-cost simulator, J={J}, member by member: in-process {t_local / J * 1e3:.3f} ms/member")
    print("| workers W | batch | pool time (s) | per-member dispatch overhead (ms) |")
    print("|---|---|---|---|")
    for W, bs in [(1, 1), (2, 1), (4, 1), (2, 8), (4, 16)]:
        pool = WorkerPool(free, free.obs_size, PoolOptions(num_workers=W, num_cpus=1, batch_size=bs))
        pool.wait_ready()
        t = best_of(lambda: pool.evaluate(x))
        print(f"| {W} | {bs} | {t:.3f} | {(t - t_local) / J * 1e3:.3f} |", flush=True)
        pool.shutdown()
    cluster.disconnect()


if __name__ == "__main__":
    main()
