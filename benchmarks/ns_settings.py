"""EnKG settings on the default Navier-Stokes inversion: guard, scale, ensemble size and steps, side by side.

    python benchmarks/ns_settings.py [--truths 0,1] [--grid "guard=1.0;guard=4.0;guard=null"] [--set key=value ...]

Each grid entry is a ';'-separated list of runs, each a ','-separated list of overrides of the default job (the
embedded `builtin:default` job with the shipped learned prior); every run is repeated for each truth seed. Prints a
markdown table: relative L2 of the ensemble mean and of the particles (the paper's metric), the spread-skill ratio
(1 when calibrated), forward evaluations and wall time.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from enkg_dist import config as cfgmod
from enkg_dist import runner

DEFAULT_GRID = "guard=1.0;guard=4.0;guard=16.0;guard=null"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--truths", default="0,1")
    ap.add_argument("--grid", default=DEFAULT_GRID, help="runs separated by ';', overrides within a run by ','")
    ap.add_argument("--set", action="append", default=[], help="override applied to every run")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    truths = [int(s) for s in args.truths.split(",")]
    print("| settings | " + " | ".join(f"truth {t}: mean / particles / spread-skill" for t in truths)
          + " | mean over truths (ensemble mean) | forward evals | wall (s) |")
    print("|---|" + "---|" * len(truths) + "---|---|---|")
    with tempfile.TemporaryDirectory() as out:
        for r, run in enumerate(args.grid.split(";")):
            sets = [f"enkg.{s.strip()}" if "." not in s.split("=")[0] else s.strip() for s in run.split(",") if s]
            cells, means, walls, evals = [], [], [], 0
            for t in truths:
                cfg = cfgmod.load_config(None, [*args.set, *sets, f"problem.truth_seed={t}"])
                _, m = runner.run(cfg, Path(out) / f"{r}-{t}", progress=False)
                cells.append(f"{m['rel_l2_mean']:.3f} / {m['rel_l2_particles']:.3f} / {m['spread_skill']:.2f}")
                means.append(m["rel_l2_mean"])
                walls.append(m["wall_seconds"])
                evals = m["forward_evaluations"]
            label = ", ".join([*args.set, *sets]) or "default"
            print(f"| {label} | " + " | ".join(cells) + f" | {np.mean(means):.3f} | {evals} | "
                  f"{np.mean(walls):.0f} |", flush=True)


if __name__ == "__main__":
    main()
