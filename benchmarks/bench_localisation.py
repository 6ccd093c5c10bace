"""Cost of the localised EnKG update against the unlocalised J x J form, at the paper's scale (d = 128^2, m = 64^2,
J = 2048, float32), each in a fresh process so that its peak memory (max RSS) is its own.

    python benchmarks/bench_localisation.py                    # the README's table
    python benchmarks/bench_localisation.py --J 256 --n 64     # smaller

Prints seconds per update (best of --repeats after a warm-up), the ratio to the unlocalised update, the peak RSS of
the process and the bytes of one block of C (the largest temporary besides the (J, d + m) arrays).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

VARIANTS = ["none", "gaspari_cohn:4", "gaspari_cohn:8", "sec", "nice"]


def child(variant: str, J: int, n: int, k: int, threads: int, repeats: int) -> dict:
    """One variant's timing and memory, in this (fresh) process."""
    import torch

    from enkg_dist import kalman, localisation
    from enkg_dist.noise import NoiseCovariance

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    m = (n // k) ** 2
    x = torch.randn(J, 1, n, n, generator=g)
    psi = x[..., ::k, ::k].reshape(J, -1) + 0.1 * torch.randn(J, m, generator=g)
    y = torch.randn(m, generator=g)
    Gamma = NoiseCovariance.scalar(0.01, m)
    loc = None
    if variant.startswith("gaspari_cohn"):
        loc = localisation.GaspariCohn(localisation.grid_geometry(n, k), float(variant.split(":")[1]))
    elif variant == "sec":
        loc = localisation.SEC(1.0)
    elif variant == "nice":
        loc = localisation.NICE()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kalman.enkg_update(x, psi, y, Gamma, 2.0, localiser=loc)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        kalman.enkg_update(x, psi, y, Gamma, 2.0, localiser=loc)
        best = min(best, time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    block = min(localisation.BLOCK_ELEMENTS, n * n * m) * 4 if loc is not None else 0
    return {"variant": variant, "seconds": best, "rss_mib": peak / 1024, "rss_over_inputs_mib": (peak - base) / 1024,
            "block_mib": block / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--J", type=int, default=2048)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.J, a.n, a.k, a.threads, a.repeats)))
        return
    m = (a.n // a.k) ** 2
    print(f"EnKG update, J = {a.J}, d = {a.n}², m = {m} ({a.n // a.k}²), float32, {a.threads} threads; load "
          f"{os.getloadavg()[0]:.1f} at start")
    print("| gain | s per update | vs J × J | peak RSS (MiB) | of which after inputs | one C block (MiB) |")
    print("|---|---|---|---|---|---|")
    ref = None
    for v in a.variants.split(","):
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
        out = subprocess.run([sys.executable, __file__, "--child", v, "--J", str(a.J), "--n", str(a.n), "--k",
                              str(a.k), "--threads", str(a.threads), "--repeats", str(a.repeats)],
                             capture_output=True, text=True, env=env, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        ref = ref or r["seconds"]
        label = "J × J (no localisation)" if v == "none" else v.replace(":", ", c = ")
        print(f"| {label} | {r['seconds']:.2f} | {r['seconds'] / ref:.2f} | {r['rss_mib']:.0f} | "
              f"{r['rss_over_inputs_mib']:.0f} | {r['block_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
