"""The thread budget against a competing CPU-bound process: the Navier-Stokes solver's throughput, quiet and shared.

Each configuration runs in its own process, the same member solves (B members of 32x32 (64 by default), T = 0.25,
per-member steps, chunk 1 as NavierStokesForward runs them):
  quiet, default     nothing else running, torch's default threads (one per core)
  shared, default    a competing CPU-bound torch process (matrix products on its default threads), this one on torch's
                     default threads too (before the budget)
  shared, budget     the same competitor, threads from enkg_dist.threads.free_cpus() (what the in-process driver sets:
                     the node's cores less its 1-minute load) applied by threads.set_threads
The competitor starts `--warmup` seconds before the shared runs so that the 1-minute
load average, which free_cpus reads, has seen it. A run slower than `--limit` seconds is stopped and reported as
"> limit". Prints seconds, member solves per second and the ratio to the quiet figure (goal: shared with the budget
no worse than 2x quiet), with the load average and the threads each run used.

    python benchmarks/bench_thread_budget.py [--members 64] [--warmup 70] [--limit 120]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = """
import json, sys, time
import torch
from enkg_dist import threads
from enkg_dist.problems.navier_stokes import grf_vorticity, solve
mode, B = sys.argv[1], int(sys.argv[2])
if mode == "budget":
    threads.set_threads(threads.free_cpus())
w0 = torch.cat([grf_vorticity(32, s) for s in range(B)]).float()
solve(w0[:1], 0.05, chunk=1)  # warm-up
t = time.perf_counter()
solve(w0, 0.25, chunk=1)
print(json.dumps({"seconds": time.perf_counter() - t, "threads": torch.get_num_threads()}))
"""

SPIN = """
import torch
a = torch.randn(512, 512)
while True:
    a = torch.tanh(a @ a)
"""  # another torch process with its default threads: a second simulator or a training job on the node


def run(mode: str, members: int, limit: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    try:
        r = subprocess.run([sys.executable, "-c", CHILD, mode, str(members)], capture_output=True, text=True,
                           timeout=limit, env=env)
    except subprocess.TimeoutExpired:
        return {"seconds": None, "threads": None}
    if r.returncode != 0:
        raise SystemExit(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=64)
    ap.add_argument("--warmup", type=float, default=70.0)
    ap.add_argument("--limit", type=float, default=120.0)
    a = ap.parse_args()
    print(f"# cores {os.cpu_count()}, load before {os.getloadavg()[0]:.2f}", flush=True)
    rows = [("quiet, default", run("default", a.members, a.limit), os.getloadavg()[0])]
    spin = subprocess.Popen([sys.executable, "-c", SPIN])
    try:
        time.sleep(a.warmup)
        for label, mode in (("shared, default", "default"), ("shared, budget", "budget")):
            load = os.getloadavg()[0]
            rows.append((label, run(mode, a.members, a.limit), load))
    finally:
        spin.kill()
    quiet = rows[0][1]["seconds"]
    print("| configuration | threads | seconds | member solves / s | time / quiet | 1-min load at start |")
    print("|---|---|---|---|---|---|")
    for label, r, load in rows:
        s = r["seconds"]
        cells = (f"> {a.limit:.0f}", "-", f"> {a.limit / quiet:.0f}") if s is None else \
            (f"{s:.2f}", f"{a.members / s:.1f}", f"{s / quiet:.2f}")
        print(f"| {label} | {r['threads'] or '-'} | {cells[0]} | {cells[1]} | {cells[2]} | {load:.2f} |")


if __name__ == "__main__":
    main()
