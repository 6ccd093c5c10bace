"""The learned denoiser on the CPU with freed memory kept in the process (`enkg_dist.heap`) and without, side by side.

A UNet call on a batch of B members allocates activations of B x channels x N^2 floats at every layer (67 MiB at
B = 256, 16 channels, 64^2). Above glibc's mmap ceiling (32 MiB) each one is a fresh mmap, faulted in and zeroed
by the kernel, and unmapped again on free. `LearnedPrior` on the CPU (and CPU training) now keep freed memory in
the process; ENKG_RETAIN_FREED_MEMORY=0 turns that off, which is the "off" column here. Each (setting, batch) runs
in a fresh process (mallopt is process-wide), in turn, `--rounds` times; the figure is the fastest round, per call,
with the process's user and system CPU seconds per call beside it. One torch thread (pinned).

    python benchmarks/bench_prior_heap.py [--checkpoint builtin:ns64] [--batches 32 128 256] [--calls 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

PROBE = """
import json, resource, sys, time, torch
torch.set_num_threads(1)
from enkg_dist import heap
from enkg_dist.priors.learned import LearnedPrior
prior = LearnedPrior.from_checkpoint(sys.argv[1], device="cpu")
B, calls = int(sys.argv[2]), int(sys.argv[3])
x = torch.randn(B, *prior.state_shape, generator=torch.Generator().manual_seed(0)) * 0.5
prior.denoise(x, 1.0)
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(calls):
    prior.denoise(x, 1.0)
r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
print(json.dumps({"wall": (t1 - t0) / calls, "user": (r1.ru_utime - r0.ru_utime) / calls,
                  "sys": (r1.ru_stime - r0.ru_stime) / calls, "retained": heap.retained()}))
"""


def probe(checkpoint: str, batch: int, calls: int, retain: bool) -> dict:
    env = {**os.environ, "ENKG_RETAIN_FREED_MEMORY": "1" if retain else "0", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE, checkpoint, str(batch), str(calls)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="builtin:ns64")
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 128, 256])
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    print(f"LearnedPrior.denoise on the CPU, {a.checkpoint}, one thread, fastest of {a.rounds} rounds of {a.calls} "
          f"calls; load average {os.getloadavg()[0]:.2f}")
    best: dict = {}
    for _ in range(a.rounds):
        for B in a.batches:
            for retain in (False, True):
                r = probe(a.checkpoint, B, a.calls, retain)
                assert r["retained"] == retain, r
                if (B, retain) not in best or r["wall"] < best[B, retain]["wall"]:
                    best[B, retain] = r
    print(f"{'batch':>5} | {'off: wall':>9} {'user':>6} {'sys':>6} | {'on: wall':>8} {'user':>6} {'sys':>6} | "
          f"{'speed-up':>8}")
    for B in a.batches:
        off, on = best[B, False], best[B, True]
        print(f"{B:>5} | {off['wall']:>8.2f}s {off['user']:>6.2f} {off['sys']:>6.2f} | {on['wall']:>7.2f}s "
              f"{on['user']:>6.2f} {on['sys']:>6.2f} | {off['wall'] / on['wall']:>7.2f}x")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
