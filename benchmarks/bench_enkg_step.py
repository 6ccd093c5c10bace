"""Wall time of one full guided EnKG step (K = 2 corrections: x_hat0 maps, J forward solves each, updates, predictor)
on the small Navier-Stokes problem, in-process against Ray with W simulator workers, in the same run; on Ray also the
bytes of array data the driver sent and received in that step (distributed.traffic: task arguments out, ray.get in).

Usage: python benchmarks/bench_enkg_step.py [--n 32] [--J 32] [--workers 1,2] [--problem navier_stokes|linear_gaussian]
"""

from __future__ import annotations

import argparse
import time

import torch

from enkg_dist import config as cfgmod
from enkg_dist import runner, sampler
from enkg_dist.distributed.traffic import DRIVER


LINEAR_JOB = "builtin:linear_gaussian_64"  # a base job with the Gaussian prior, changed to NS below


def one_step(cfg, address=None) -> tuple[float, int, int]:
    built = runner.build(cfg)
    backend = runner.make_backend(cfg, built, address)
    try:
        pb, scfg = built.problem, cfg.enkg.sampler_config()
        i = scfg.num_steps // 2  # a guided step in the middle: n_ode inner steps, K corrections
        x = sampler.initial_particles(0, cfg.enkg.ensemble_size, pb.forward.state_shape, scfg.sigma_max)
        x = x * float(scfg.sigmas()[i]) / scfg.sigma_max
        from enkg_dist.evaluation import Evaluator

        ev = Evaluator(backend.forward)
        sampler.enkg_step(backend.denoise, ev, x, i, pb.y, pb.Gamma, scfg)  # warm-up (workers start)
        DRIVER.reset()
        t0 = time.perf_counter()
        sampler.enkg_step(backend.denoise, ev, x, i, pb.y, pb.Gamma, scfg)
        return time.perf_counter() - t0, DRIVER.sent, DRIVER.received
    finally:
        backend.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--J", type=int, default=32)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--problem", default="navier_stokes", choices=["navier_stokes", "linear_gaussian"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.problem == "navier_stokes":
        base = [f"problem={{kind: navier_stokes, n: {args.n}, k: 2}}", "prior.alpha=2.5"]
    else:
        base = [f"problem.n={args.n}", "enkg.localisation.kind=none"]
    base += [f"enkg.ensemble_size={args.J}", "enkg.num_steps=40"]
    t_local, _, _ = one_step(cfgmod.load_config(LINEAR_JOB, base))
    d = args.n**2 * 8  # bytes of one member's state (float64)
    print(f"{args.problem} {args.n}^2, J = {args.J}, one guided step (K = 2); one ensemble of states is "
          f"{args.J * d / 2**20:.2f} MiB:")
    print("| backend | step wall time (s) | vs in-process | driver sent (MiB) | driver received (MiB) |")
    print("|---|---|---|---|---|")
    print(f"| in-process | {t_local:.2f} | 1.00 | - | - |", flush=True)
    for W in [int(w) for w in args.workers.split(",")]:
        t, sent, got = one_step(cfgmod.load_config(LINEAR_JOB, base + ["execution.backend=ray",
                                                                       f"execution.num_workers={W}",
                                                                       "execution.num_cpus=4"]))
        print(f"| Ray, {W} workers | {t:.2f} | {t_local / t:.2f}x | {sent / 2**20:.2f} | {got / 2**20:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
