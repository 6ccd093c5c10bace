"""Strong-constraint 4D-Var on the Navier-Stokes benchmark: the MAP estimate of the initial vorticity under a Gaussian
prior, by L-BFGS with the exact gradient (autograd through our torch solver). It is the gradient-access point estimate
that EnKG's forward-only answer is read against, and a measure of what the observations determine.

    python benchmarks/ns_4dvar.py --truths 0,1,2 --iterations 400 --sigma 1 --report 100,200,300
    python benchmarks/ns_4dvar.py --truths 0 --iterations 200 --sigma 0.1 --prior gaussian_fit:data/ns64_2k.zarr

Objective in the prior's white coordinates z (x = mu + C^{1/2} z, the usual control-variable transform):
Phi(z) = 1/2 |(G(x) - y) / sigma|^2 + 1/2 |z|^2, sigma in vorticity units (for noiseless y it is the misfit weight:
the MAP of the problem with that noise). Starts at the prior mean. Prints per truth the relative L2 of x against the
truth (at the iterations in --report), the data misfit per observation, the forward and backward solves and the wall
time. A point estimate: it has no spread, so no spread-skill or CRPS.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from navier_stokes_table import add_problem_args, gaussian_prior_override, problem_override

from enkg_dist import config as cfgmod
from enkg_dist import runner


def build(a, truth: int):
    """Problem and Gaussian prior of the benchmark's config for one truth."""
    cfg = cfgmod.load_config(None, [problem_override(a, truth), gaussian_prior_override(a.prior),
                                    "output_dir=/tmp/unused", f"seed={truth}"])
    built = runner.build(cfg)
    return built.problem, built.prior


def lbfgs_direction(g: torch.Tensor, S: list, Y: list) -> torch.Tensor:
    """-H g by the L-BFGS two-loop recursion (Nocedal & Wright 2006, Alg. 7.4), H0 = s'y / y'y."""
    q, alphas = g.clone(), []
    for s, y in reversed(list(zip(S, Y))):
        a = float(s @ q) / float(y @ s)
        q -= a * y
        alphas.append(a)
    if S:
        q *= float(S[-1] @ Y[-1]) / float(Y[-1] @ Y[-1])
    for (s, y), a in zip(zip(S, Y), reversed(alphas)):
        q += (a - float(y @ q) / float(y @ s)) * s
    return -q


def var4d(pb, prior, sigma: float, iterations: int, report: set[int], max_step: float, history: int = 10) -> dict:
    """L-BFGS on Phi(z) from z = 0, each step capped at |dz| <= max_step and backtracked (Armijo) until Phi falls and
    the solve stays finite; the relative L2 and rms misfit at the reported iterations."""
    x_true, y = pb.x_true[None], pb.y
    shape, count = x_true.shape, {"solves": 0}

    def phi_and_grad(z: torch.Tensor) -> tuple[float, torch.Tensor | None]:
        z = z.reshape(shape).detach().requires_grad_(True)
        r = pb.forward(prior.sample(z)).psi[0] - y  # vorticity units
        phi = 0.5 * (r / sigma).pow(2).sum() + 0.5 * z.pow(2).sum()
        count["solves"] += 1
        if not torch.isfinite(phi):
            return float("inf"), None
        phi.backward()
        count["solves"] += 1  # the backward solve
        return float(phi.detach()), z.grad.reshape(-1).clone()

    z = torch.zeros(x_true.numel(), dtype=x_true.dtype)
    f, g = phi_and_grad(z)
    S, Y = [], []
    out, t0 = {"rel_l2": {}, "rms_misfit": {}}, time.perf_counter()
    for it in range(1, iterations + 1):
        d = lbfgs_direction(g, S, Y)
        if float(d @ g) >= 0:  # not a descent direction: restart from steepest descent
            S, Y, d = [], [], -g
        t = min(1.0, max_step / float(d.norm()))
        for _ in range(20):
            f_new, g_new = phi_and_grad(z + t * d)
            if f_new <= f + 1e-4 * t * float(d @ g):
                break
            t *= 0.3
        else:
            print(f"  iteration {it}: no decrease along the direction, stopping", flush=True)
            break
        s_k, y_k = t * d, g_new - g
        if float(s_k @ y_k) > 1e-12 * float(s_k.norm() * y_k.norm()):
            S, Y = (S + [s_k])[-history:], (Y + [y_k])[-history:]
        z, f, g = z + s_k, f_new, g_new
        if it in report or it == iterations:
            with torch.no_grad():
                x = prior.sample(z.reshape(shape))
                rel = float((x - x_true).norm() / x_true.norm())
                misfit = float((pb.forward(x).psi[0] - y).pow(2).mean().sqrt())
            out["rel_l2"][it], out["rms_misfit"][it] = rel, misfit
            print(f"  iteration {it}: rel. L2 {rel:.3f}, rms misfit {misfit:.3g} (vorticity units), Phi {f:.4g}, "
                  f"{count['solves']} solves, {time.perf_counter() - t0:.0f} s", flush=True)
    out.update({"iterations": it, "solves": count["solves"], "wall_seconds": time.perf_counter() - t0,
                "final_rel_l2": out["rel_l2"][max(out["rel_l2"])] if out["rel_l2"] else None})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_problem_args(ap)
    ap.add_argument("--prior", default="grf", help="grf (alpha 2.5, tau 3, std 0.5, as EKI's) or gaussian_fit:DATA")
    ap.add_argument("--sigma", type=float, default=1.0, help="the misfit's noise std, vorticity units")
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--max-step", type=float, default=8.0, help="largest step in white coordinates (a prior draw's |z| "
                    "is n)")
    ap.add_argument("--report", default="10,25,50", help="iterations at which to print the error")
    ap.add_argument("--truths", default="0")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="append one JSON line per truth")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"threads {a.threads}, load {os.getloadavg()[0]:.1f}; prior {a.prior}, sigma {a.sigma:g}, "
          f"{a.n}², k = {a.k}, noise {a.noise:g}", flush=True)
    rows = []
    for truth in [int(t) for t in a.truths.split(",")]:
        print(f"truth {truth}", flush=True)
        pb, prior = build(a, truth)
        r = var4d(pb, prior, a.sigma, a.iterations, {int(i) for i in a.report.split(",")}, a.max_step)
        rows.append(r["final_rel_l2"])
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps({"truth": truth, "args": vars(a), **r}) + "\n")
    print(f"mean rel. L2 over truths {sum(rows) / len(rows):.3f} ({' / '.join(f'{v:.3f}' for v in rows)}); "
          f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
