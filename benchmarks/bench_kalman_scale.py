"""The unlocalised EnKG update up to J = 10^4 (d = 128^2, m = 64^2): seconds, GFLOP/s, fraction of this machine's
GEMM rate, and peak memory, one subprocess per point (issue 17, item 2).

Each point runs in a fresh process pinned to the given thread count (torch.set_num_threads, OMP/MKL_NUM_THREADS), so
its ru_maxrss is that point's own peak: the inputs (x (J, d), psi (J, m)) plus whatever the update allocates. The
GEMM rate is measured in the same process, after the update, on a plain matmul of the update's main shape
(J x J) @ (J x 2048). The update's flops are counted as 2 J^2 m (A = R P^T) + 2 J^2 d (Delta = A X) + the output
Gram matrix (2 J^2 m when J <= m or small, else 2 J m^2); fraction = (flops / update seconds) / GEMM rate.
Usage:
    python benchmarks/bench_kalman_scale.py [--J 1024 2048 4096 10000] [--dtype float32 float64] [--threads 1 2]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

POINT = r"""
import json, resource, sys, time
import torch
J, d, m, dtype, threads, repeats = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
                                    int(sys.argv[5]), int(sys.argv[6]))
torch.set_num_threads(threads)
from enkg_dist import kalman
from enkg_dist.noise import NoiseCovariance
dt = getattr(torch, dtype)
g = torch.Generator().manual_seed(0)
x = torch.randn(J, d, generator=g, dtype=dt)
psi = torch.randn(J, m, generator=g, dtype=dt)
y = torch.randn(m, generator=g, dtype=dt)
Gamma = NoiseCovariance.scalar(0.01, m)
def rss():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * resource.getpagesize()
inputs_rss = rss()
times = []
for _ in range(repeats):
    t0 = time.perf_counter()
    out, info = kalman.enkg_update(x, psi, y, Gamma, 2.0)
    times.append(time.perf_counter() - t0)
    del out
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
gram = 2 * J * J * m if (J <= m or J * J * x.element_size() <= kalman.BLOCK_BYTES) else 2 * J * m * m
flops = 2 * J * J * m + 2 * J * J * d + gram
A = torch.randn(J, J, generator=g, dtype=dt)
B = torch.randn(J, 2048, generator=g, dtype=dt)
A @ B[:, :256]
gemm = []
for _ in range(1 if J > 4096 else 2):
    t0 = time.perf_counter()
    A @ B
    gemm.append(time.perf_counter() - t0)
gemm_rate = 2 * J * J * 2048 / min(gemm)
print(json.dumps(dict(J=J, d=d, m=m, dtype=dtype, threads=threads, seconds=min(times), all_seconds=times,
                      gflops=flops / min(times) / 1e9, gemm_gflops=gemm_rate / 1e9,
                      fraction_of_gemm=flops / min(times) / gemm_rate, peak_rss_bytes=peak, inputs_rss_bytes=inputs_rss,
                      ensemble_bytes=J * d * x.element_size(), block_bytes=kalman.BLOCK_BYTES)))
"""


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def run_point(J, d, m, dtype, threads, repeats) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    r = subprocess.run([sys.executable, "-c", POINT, str(J), str(d), str(m), dtype, str(threads), str(repeats)],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"point J={J} {dtype} threads={threads} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--J", type=int, nargs="+", default=[1024, 2048, 4096, 10000])
    ap.add_argument("--dtype", nargs="+", default=["float32", "float64"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--d", type=int, default=128 * 128)
    ap.add_argument("--m", type=int, default=64 * 64)
    ap.add_argument("--json", help="also write the points here")
    args = ap.parse_args()
    print(f"d={args.d} m={args.m} cores={os.cpu_count()} load before: {load()}", flush=True)
    print("| J | dtype | threads | update (s) | GFLOP/s | GEMM GFLOP/s | fraction of GEMM | peak RSS (GiB) | "
          "inputs (GiB) | peak - inputs (ensembles of J x d) | load (1 min) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    points = []
    for threads in args.threads:
        for dtype in args.dtype:
            for J in args.J:
                p = run_point(J, args.d, args.m, dtype, threads, 1 if J > 4096 else 2)
                p["load_after"] = load()
                points.append(p)
                extra = (p["peak_rss_bytes"] - p["inputs_rss_bytes"]) / p["ensemble_bytes"]
                print(f"| {J} | {dtype} | {threads} | {p['seconds']:.2f} | {p['gflops']:.1f} | "
                      f"{p['gemm_gflops']:.1f} | {p['fraction_of_gemm']:.2f} | {p['peak_rss_bytes'] / 2**30:.2f} | "
                      f"{p['inputs_rss_bytes'] / 2**30:.2f} | {extra:.2f} | {p['load_after'].split()[0]} |", flush=True)
    print(f"load after: {load()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(points, f, indent=1)


if __name__ == "__main__":
    main()
