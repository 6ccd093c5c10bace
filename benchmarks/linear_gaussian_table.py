"""EnKG against the exact posterior on the linear-Gaussian problem (enkg.md §8): the README's accuracy table.

32x32 field, prior spectrum (|k|^2 + 9)^-2 with pointwise std 0.5, every 2nd point observed, noise std 0.1, exact
Gaussian denoiser, 3 truths. ratio = |ensemble mean - truth| / |posterior mean - truth|; spread = ensemble std /
posterior std (root mean pointwise variance). Usage: python benchmarks/linear_gaussian_table.py [--quick]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from enkg_dist import rng, sampler
from enkg_dist.metrics import ensemble_metrics, relative_l2
from enkg_dist.problems.linear_gaussian import make_problem

CASES = [  # (label, J, rule, scale, guard)
    ("authors: s=2, ‖A‖_F, no guard", 64, "frobenius", 2.0, None),
    ("authors: s=2, ‖A‖_F, no guard", 256, "frobenius", 2.0, None),
    ("authors: s=2, ‖A‖_F, no guard", 1024, "frobenius", 2.0, None),
    ("paper: s=1, 1/tr(C_yy)", 256, "trace", 1.0, None),
    ("paper: s=1, 1/tr(C_yy)", 1024, "trace", 1.0, None),
    ("enkg-dist default: s=2, ‖A‖_F, guard 1", 64, "frobenius", 2.0, 1.0),
    ("enkg-dist default: s=2, ‖A‖_F, guard 1", 256, "frobenius", 2.0, 1.0),
    ("enkg-dist default: s=2, ‖A‖_F, guard 1", 1024, "frobenius", 2.0, 1.0),
]


def evaluator(problem):
    def evaluate(x_hat):
        r = problem.forward(x_hat)
        return r.psi, r.ok

    return evaluate


def run_case(J, rule, scale, guard, truths=(0, 1, 2)):
    rows = []
    for t in truths:
        problem, prior, post = make_problem(n=32, k=2, alpha=2.0, tau=3.0, std=0.5, noise_std=0.1, truth_seed=t)
        cfg = sampler.EnKGConfig(scale=scale, step_rule=rule, guard=guard)
        x_T = sampler.initial_particles(100 + t, J, prior.state_shape, cfg.sigma_max)
        x = sampler.enkg_sample(prior.denoise, evaluator(problem), x_T, problem.y, problem.Gamma, cfg, seed=100 + t)
        m = ensemble_metrics(x, problem.x_true)
        bayes = float(relative_l2(post.mean(problem.y)[None], problem.x_true)[0])
        rows.append((m["rel_l2_mean"], bayes, m["rel_l2_particles"],
                     m["spread"] / float(post.variance().mean().sqrt())))
    return np.array(rows)


def one_shot_enkf(J=256, truths=(0, 1, 2)):
    out = []
    for t in truths:
        problem, prior, post = make_problem(n=32, k=2, noise_std=0.1, truth_seed=t)
        x0 = prior.sample(rng.member_normal(10 + t, rng.INIT, range(J), prior.state_shape))
        x = sampler.eki(evaluator(problem), x0, problem.y, problem.Gamma, 1, stochastic=True, seed=t)
        m = ensemble_metrics(x, problem.x_true)
        bayes = float(relative_l2(post.mean(problem.y)[None], problem.x_true)[0])
        out.append((m["rel_l2_mean"], bayes, m["rel_l2_particles"], m["spread"] / float(post.variance().mean().sqrt())))
    return np.array(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="skip J = 1024")
    args = ap.parse_args()
    torch.set_num_threads(2)
    print("| setting | J | mean rel. L2 | Bayes rel. L2 | ratio | particles' rel. L2 | spread / posterior | s |")
    print("|---|---|---|---|---|---|---|---|")
    for label, J, rule, scale, guard in CASES:
        if args.quick and J > 256:
            continue
        t0 = time.perf_counter()
        r = run_case(J, rule, scale, guard)
        ratio = r[:, 0] / r[:, 1]
        print(f"| {label} | {J} | {r[:, 0].mean():.3f} | {r[:, 1].mean():.3f} | {ratio.mean():.2f} "
              f"({ratio.min():.2f}-{ratio.max():.2f}) | {r[:, 2].mean():.3f} | {r[:, 3].mean():.2f} | "
              f"{time.perf_counter() - t0:.0f} |", flush=True)
    r = one_shot_enkf()
    ratio = r[:, 0] / r[:, 1]
    print(f"| one-shot stochastic EnKF (no diffusion) | 256 | {r[:, 0].mean():.3f} | {r[:, 1].mean():.3f} | "
          f"{ratio.mean():.2f} ({ratio.min():.2f}-{ratio.max():.2f}) | {r[:, 2].mean():.3f} | "
          f"{r[:, 3].mean():.2f} | - |")


if __name__ == "__main__":
    main()
