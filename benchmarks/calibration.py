"""Calibration of EnKG against the exact posterior (linear-Gaussian): localisation and spread control side by side.

For each grid size, ensemble size J and setting, over truths 0..2 (the truth and the noise from the truth seed, the
initial particles from seed 100 + truth): the ensemble mean's error over the Bayes error (`ratio`), the ensemble's RMS
std over the exact posterior's (`spread`), the spread-skill ratio (1 when calibrated), the ensemble CRPS over the
exact posterior's own CRPS (`crps/post`, 1 is the best a sampler can do), forward runs and wall time per run. Runs
in-process through the same build and sampler as `enkg-dist run` (no run store). Threads pinned (--threads).

    python benchmarks/calibration.py --n 32 --J 64,256,1024
    python benchmarks/calibration.py --n 64 --J 64,256
    python benchmarks/calibration.py --n 64 --J 1024 --settings "J×J, guard 1;GC c=3s, guard 3s"
    python benchmarks/calibration.py --list
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from enkg_dist import config as cfgmod
from enkg_dist import metrics, runner, sampler

BASE = {32: "jobs/linear_gaussian_32.yaml", 64: "builtin:linear_gaussian_64"}

def _gc(c: float, guard: float) -> list[str]:
    return [f"enkg.localisation={{kind: gaspari_cohn, radius: {c}}}", f"enkg.guard={guard}", "enkg.inflation=none"]


# label -> overrides on the base job; s = n/32 scales radius and guard with the grid (measured best: c = 3 s, guard
# 3 s; the shipped jobs use these)
SETTINGS = {
    "default": lambda s: [],
    "J×J, guard 1": lambda s: ["enkg.localisation.kind=none", "enkg.guard=1", "enkg.inflation=none"],
    "J×J, guard 3s": lambda s: ["enkg.localisation.kind=none", f"enkg.guard={3 * s}", "enkg.inflation=none"],
    "GC c=3s, guard 3s": lambda s: _gc(3 * s, 3 * s),
    "GC + RTPS 0.3": lambda s: [*_gc(3 * s, 3 * s)[:2], "enkg.inflation=rtps", "enkg.inflation_factor=0.3"],
    "SEC α=1, guard 3s": lambda s: ["enkg.localisation={kind: sec, alpha: 1}", f"enkg.guard={3 * s}",
                                    "enkg.inflation=none"],
    "NICE, guard 3s": lambda s: ["enkg.localisation={kind: nice}", f"enkg.guard={3 * s}", "enkg.inflation=none"],
    "GC c=3s, guard 1": lambda s: _gc(3 * s, 1),
}
TABLE = ["J×J, guard 1", "J×J, guard 3s", "GC c=3s, guard 3s", "GC + RTPS 0.3", "SEC α=1, guard 3s", "NICE, guard 3s"]


def one_run(n: int, J: int, overrides: list[str], truth: int) -> dict:
    """One EnKG run in-process; its calibration against the exact posterior."""
    cfg = cfgmod.load_config(BASE[n], [*overrides, f"enkg.ensemble_size={J}", f"problem.truth_seed={truth}",
                                       f"seed={100 + truth}"])
    built = runner.build(cfg)
    pb, scfg = built.problem, cfg.enkg.sampler_config()
    count = {"runs": 0}

    def evaluate(x_hat):
        count["runs"] += x_hat.shape[0]
        r = pb.forward(x_hat)
        return r.psi, r.ok

    t0 = time.perf_counter()
    x_T = sampler.initial_particles(cfg.seed, J, pb.forward.state_shape, scfg.sigma_max)
    x = sampler.enkg_sample(built.prior.denoise, evaluate, x_T, pb.y, pb.Gamma, scfg, cfg.seed,
                            localiser=built.localiser)
    wall = time.perf_counter() - t0
    m = metrics.ensemble_metrics(x, pb.x_true)
    post = built.posterior
    m.update(metrics.posterior_metrics(m, pb.x_true, post.mean(pb.y), post.variance()))
    return {"ratio": m["ratio_to_bayes"], "spread": m["spread_ratio"], "spread_skill": m["spread_skill"],
            "crps_ratio": m["crps"] / m["posterior_crps"], "runs": count["runs"], "seconds": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32, choices=sorted(BASE))
    ap.add_argument("--J", default="64,256")
    ap.add_argument("--settings", default=";".join(TABLE), help="labels separated by ';' (--list)")
    ap.add_argument("--truths", default="0,1,2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="append one JSON line per row to this file")
    ap.add_argument("--custom", action="append", default=[],
                    help="LABEL=OVERRIDE|OVERRIDE...: another setting (e.g. 'g2=enkg.guard=2|enkg.num_corrections=4')")
    ap.add_argument("--list", action="store_true", help="print the settings and exit")
    a = ap.parse_args()
    for item in a.custom:
        label, _, rest = item.partition("=")
        SETTINGS[label] = lambda s, ov=rest.split("|"): ov
        if label not in a.settings.split(";"):
            a.settings += f";{label}"
    if a.list:
        for k, v in SETTINGS.items():
            print(f"{k}: {' '.join(v(1)) or '(the job as shipped)'}")
        return
    torch.set_num_threads(a.threads)
    truths = [int(t) for t in a.truths.split(",")]
    print(f"linear-Gaussian {a.n}x{a.n} ({BASE[a.n]}), truths {truths}, {a.threads} thread(s); load "
          f"{os.getloadavg()[0]:.1f} at start")
    print("| setting | J | ratio to Bayes | spread / posterior | spread-skill | CRPS / posterior CRPS | forward runs "
          "| s per run |")
    print("|---|---|---|---|---|---|---|---|")
    for J in [int(j) for j in a.J.split(",")]:
        for label in a.settings.split(";"):
            rows = [one_run(a.n, J, SETTINGS[label](a.n / 32), t) for t in truths]
            r = {k: np.array([row[k] for row in rows]) for k in rows[0]}
            print(f"| {label} | {J} | {r['ratio'].mean():.2f} ({r['ratio'].min():.2f}–{r['ratio'].max():.2f}) | "
                  f"{r['spread'].mean():.2f} | {r['spread_skill'].mean():.2f} | {r['crps_ratio'].mean():.2f} | "
                  f"{int(r['runs'].mean()):,} | {r['seconds'].mean():.1f} |", flush=True)
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps({"n": a.n, "J": J, "setting": label, "overrides": SETTINGS[label](a.n / 32),
                                        **{k: v.tolist() for k, v in r.items()}}) + "\n")


if __name__ == "__main__":
    main()
