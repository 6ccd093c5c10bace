"""The simulator pool at hundreds of slots, on an emulated multi-node Ray (ray.cluster_utils.Cluster) on this machine.

Each simulator slot is one thread of a worker actor (`execution.worker_concurrency`), running a simulator that sleeps
`--sleep` seconds per member (the CPU stays free, as it is for a driver whose simulators run elsewhere). For each W
(slots) the pool evaluates J = `--per-slot` x W members, after one untimed call that starts the workers and times the
members (automatic batching then sizes the tasks). Printed side by side, per W:
  parallel efficiency = (J x sleep / W) / measured wall time of one evaluate;
  driver CPU time per member = the driver process's CPU seconds during the evaluate / J (dispatch, wait, gather);
  bytes the driver put into the object store and fetched back per evaluate (distributed.traffic).
Usage: python benchmarks/bench_emulated_cluster.py [--slots 32,128,512] [--nodes 4] [--actors-per-node 4]
       [--sleep 1.0] [--per-slot 8] [--n 32] [--batch auto] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import time

import ray
import torch
from ray.cluster_utils import Cluster

from enkg_dist import threads
from enkg_dist.distributed.pool import PoolOptions, WorkerPool
from enkg_dist.distributed.traffic import DRIVER
from enkg_dist.problems.chaos import ChaosForward
from enkg_dist.problems.linear_gaussian import SubsampleBlur


def measure(pool: WorkerPool, x: torch.Tensor) -> tuple[float, float, int, int]:
    """Wall seconds, driver CPU seconds and driver bytes (sent, received) of one evaluate."""
    DRIVER.reset()
    c0, t0 = time.process_time(), time.perf_counter()
    res = pool.evaluate(x)
    t, c = time.perf_counter() - t0, time.process_time() - c0
    if not bool(res.ok.all()):
        raise RuntimeError(f"{int((~res.ok).sum())} members failed: {next(r for r in res.reasons if r)}")
    return t, c, DRIVER.sent, DRIVER.received


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--slots", default="32,128,512", help="emulated simulator slots W, comma-separated")
    ap.add_argument("--nodes", type=int, default=4, help="emulated worker nodes (plus the head, which runs none)")
    ap.add_argument("--actors-per-node", type=int, default=4, help="worker processes per node")
    ap.add_argument("--sleep", type=float, default=1.0, help="seconds per member")
    ap.add_argument("--per-slot", type=int, default=8, help="members per slot: J = per_slot x W")
    ap.add_argument("--n", type=int, default=32, help="state n x n (float64), observed on every 2nd point")
    ap.add_argument("--batch", default="auto", help="members per task, comma-separated ('auto' allowed)")
    ap.add_argument("--rounds", type=int, default=2, help="timed evaluates per point (the best is printed)")
    args = ap.parse_args()
    threads.set_threads(1)
    Ws = [int(w) for w in args.slots.split(",")]
    batches = [None if b == "auto" else int(b) for b in args.batch.split(",")]
    actors = args.nodes * args.actors_per_node

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(args.nodes):
        cluster.add_node(num_cpus=args.actors_per_node)
    ray.init(address=cluster.address, logging_level="warning")
    print(f"emulated cluster: head + {args.nodes} nodes x {args.actors_per_node} worker processes ({actors} in all); "
          f"simulator {args.sleep:g} s per member, state {args.n}x{args.n} float64; {os.cpu_count()} real cores; "
          f"load before: {os.getloadavg()[0]:.1f}")
    G = ChaosForward(SubsampleBlur(args.n, 2), fail_rate=0.0, delay=args.sleep)
    print("| W slots | workers x concurrency | J | members per task | ideal (s) | measured (s) | parallel efficiency "
          "| driver CPU per member (ms) | driver bytes sent / received per evaluate (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    try:
        for W in Ws:
            A = min(actors, W)
            if W % A:
                raise SystemExit(f"W = {W} is not a multiple of the {A} worker processes")
            J = args.per_slot * W
            x = torch.randn(J, 1, args.n, args.n, generator=torch.Generator().manual_seed(W), dtype=torch.float64)
            pool = WorkerPool(G, G.obs_size, PoolOptions(num_workers=A, num_cpus=1, concurrency=W // A,
                                                         batch_size=None, threads=1))
            pool.wait_ready()  # start-up (processes importing torch) is not dispatch
            for bs in batches:
                pool.options = PoolOptions(**{**pool.options.__dict__, "batch_size": bs})
                measure(pool, x)  # times the members (auto batching) and warms the object store
                best = min((measure(pool, x) for _ in range(args.rounds)), key=lambda r: r[0])
                t, c, sent, received = best
                ideal = J * args.sleep / W
                label = f"auto ({pool.stats.batch_sizes[-1]})" if bs is None else bs
                print(f"| {W} | {A} x {W // A} | {J} | {label} | {ideal:.2f} | {t:.2f} | {ideal / t:.3f} | "
                      f"{c / J * 1e3:.3f} | {sent / 2**20:.1f} / {received / 2**20:.2f} |", flush=True)
            pool.shutdown()
    finally:
        print(f"load after: {os.getloadavg()[0]:.1f}")
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
