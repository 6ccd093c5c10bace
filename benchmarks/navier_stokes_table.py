"""Navier-Stokes inversions side by side: EnKG as the authors run it, EnKG with localisation, EKI, the unconditional
prior and DPS (gradients by autograd through our solver), on the same problem, prior and truths.

    python benchmarks/navier_stokes_table.py --n 64 --k 4 --noise 0 --J 32 --truths 0,1,2 --prior gaussian_fit:data/ns64.zarr
    python benchmarks/navier_stokes_table.py --n 32 --k 2 --prior builtin:ns32 --curve 16,32,64,128
    python benchmarks/navier_stokes_table.py --n 64 --prior builtin:ns64 --truths 0,1,2,3,4,5,6,7,8,9 --truth-spectra

Per method and truth: relative L2 of the ensemble mean and of the particles (the paper's metric), spread-skill, CRPS
(in model units x = w/10), forward runs (DPS: forward and backward solves) and wall time; then the means over
truths, and the published numbers with what differs. --curve adds the accuracy-against-forward-runs figure for EnKG
and localised EnKG over ensemble sizes (written to --out). Threads pinned (--threads); the load is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from enkg_dist import config as cfgmod
from enkg_dist import dps, fields, metrics, runner, sampler

PUBLISHED = [  # (source, setting, method, rel. L2, note)
    ("EnKG paper (Zheng et al. 2024)", "128², k = 2, σ = 0", "EnKG", 0.120, "J = 2048, 26.8 M-parameter prior, ~295 k "
     "forward runs; particles' metric"),
    ("EnKG paper", "128², k = 2, σ = 0", "EKI (GRF prior)", 0.577, "1,024 k forward runs"),
    ("EnKG paper", "128², k = 2, σ = 0", "DPG", 0.325, "4,000 k forward runs"),
    ("EnKG paper", "128², k = 2, σ = 1 / 2", "EnKG", 0.191, "σ = 1; 0.294 at σ = 2"),
    ("newer comparison (issue 13)", "64², k = 4, low noise", "EnKG", 0.129, "J = 100, own trained prior"),
    ("newer comparison", "64², k = 4, low noise", "Blade (calibrated successor)", 0.069, "J = 100"),
    ("newer comparison", "64², k = 4, low noise", "EKI", 0.517, "J = 100"),
]


def gaussian_prior_override(spec: str) -> str:
    """The job's Gaussian prior: `grf` (alpha 2.5, tau 3, std 0.5, the paper's EKI prior) or `gaussian_fit:DATA`."""
    if spec == "grf":
        return "prior={kind: gaussian, alpha: 2.5, tau: 3.0, std: 0.5}"
    return "prior={kind: gaussian_fit, data: " + spec.split(":", 1)[1] + "}"


def methods(a) -> dict[str, list[str]]:
    """Method label -> config overrides on the base job."""
    loc = [f"enkg.localisation={{kind: gaspari_cohn, radius: {a.radius}}}", f"enkg.guard={a.guard}"]
    eki_prior = ("Gaussian prior" if a.eki_prior == "grf" else "fitted Gaussian prior",
                 gaussian_prior_override(a.eki_prior))
    return {
        "EnKG, authors' step (s = 2, |A|_F, no guard)": ["enkg.localisation.kind=none", "enkg.guard=null"],
        "EnKG, guard 1 (previous default)": ["enkg.localisation.kind=none", "enkg.guard=1"],
        f"EnKG + Gaspari-Cohn c = {a.radius}, guard {a.guard}": loc,
        f"EnKG + GC + RTPS {a.rtps}": [*loc, "enkg.inflation=rtps", f"enkg.inflation_factor={a.rtps}"],
        "unconditional prior (no guidance)": ["enkg.num_corrections=0"],
        f"EKI, data-misfit controller ({eki_prior[0]})": ["method=eki", "eki.dt=auto", f"eki.ensemble_size={a.J}",
                                                          f"eki.iterations={a.eki_iterations}", eki_prior[1]],
        "DPS (autograd through the solver)": [],
        f"EnKG + SEC alpha = {a.sec_alpha}, guard {a.guard}": [
            f"enkg.localisation={{kind: sec, alpha: {a.sec_alpha}}}", f"enkg.guard={a.guard}"],
        f"EnKG + NICE, guard {a.guard}": ["enkg.localisation={kind: nice}", f"enkg.guard={a.guard}"],
        f"EnKG + Gaspari-Cohn c = {a.radius} on the deviations only (raw mean), guard {a.guard}": [
            f"enkg.localisation={{kind: gaspari_cohn, radius: {a.radius}, mean_update: raw}}", f"enkg.guard={a.guard}"],
        f"EnKG + Gaspari-Cohn c = {a.radius} on scales |k| > {a.large_scales} (larger ones unlocalised), guard "
        f"{a.guard}": [f"enkg.localisation={{kind: gaspari_cohn, radius: {a.radius}, large_scales: {a.large_scales}}}",
                       f"enkg.guard={a.guard}"],
    }


def add_problem_args(ap: argparse.ArgumentParser) -> None:
    """The problem's options: grid, observation, time, Reynolds number, noise (shared with ns_4dvar.py)."""
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--T", type=float, default=1.0)
    ap.add_argument("--Re", type=float, default=200.0)
    ap.add_argument("--noise", type=float, default=0.0, help="observation noise std, vorticity units")


def problem_override(a, truth: int) -> str:
    """The job's problem for one truth."""
    return (f"problem={{kind: navier_stokes, n: {a.n}, k: {a.k}, T: {a.T}, Re: {a.Re}, noise_std: {a.noise}, "
            f"truth_seed: {truth}, member_chunk: auto}}")


def base(a, J: int, truth: int) -> list[str]:
    prior = (["prior={kind: learned, checkpoint: " + a.prior + "}"] if not a.prior.startswith("gaussian_fit:")
             else ["prior={kind: gaussian_fit, data: " + a.prior.split(":", 1)[1] + "}"])
    return [problem_override(a, truth), *prior, f"enkg.ensemble_size={J}",
            f"enkg.num_steps={a.N}", f"enkg.num_corrections={a.K}", "output_dir=/tmp/unused", f"seed={truth}",
            f"name=navier-stokes-{a.n}-k{a.k}-noise{a.noise:g}"]


def run_dps(cfg, a) -> dict:
    """DPS in-process with the same problem, prior and initial noise as the EnKG runs; gradient via autograd."""
    built = runner.build(cfg)
    pb, prior = built.problem, built.prior
    denoise = getattr(prior, "denoise_with_grad", prior.denoise)
    count = {"runs": 0}

    def forward(x):
        count["runs"] += 2 * x.shape[0]  # a forward and a backward solve per member
        return pb.forward(x).psi

    J = cfg.enkg.ensemble_size
    dcfg = dps.DPSConfig(num_steps=a.N, scale=a.dps_scale)
    x_T = sampler.initial_particles(cfg.seed, J, pb.forward.state_shape, dcfg.sigma_max)
    t0 = time.perf_counter()
    x = dps.dps_sample(denoise, forward, x_T, pb.y, pb.Gamma, dcfg)
    m = metrics.ensemble_metrics(x.detach(), pb.x_true)
    m.update({"forward_evaluations": count["runs"], "wall_seconds": time.perf_counter() - t0})
    return m


_RUNS = [0]


def one(a, label: str, overrides: list[str], J: int, truth: int, out: Path) -> dict:
    cfg = cfgmod.load_config(None, [*base(a, J, truth), *overrides, *a.set])
    if label.startswith("DPS"):
        return run_dps(cfg, a)
    _RUNS[0] += 1
    _, m = runner.run(cfg, out / f"run-{_RUNS[0]}", progress=False)  # a fresh run directory each time
    return m


def high_k_share(a, truth: int, k_cut: float = 8.0) -> float:
    """The truth's share of vorticity variance at |k| > k_cut: sum |w_hat|^2 there over the sum (the mean is zero)."""
    x = runner.build(cfgmod.load_config(None, base(a, a.J, truth))).problem.x_true.reshape(a.n, a.n)
    k1, k2 = fields.wavenumbers(a.n)
    P = fields.rfft_weights(a.n) * torch.fft.rfft2(x.to(torch.float64)).abs() ** 2  # Parseval on the half-grid
    return float(P[k1**2 + k2**2 > k_cut**2].sum() / P.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_problem_args(ap)
    ap.add_argument("--prior", default="builtin:ns64", help="learned checkpoint, or gaussian_fit:DATA.zarr")
    ap.add_argument("--J", type=int, default=32)
    ap.add_argument("--N", type=int, default=20)
    ap.add_argument("--K", type=int, default=2)
    ap.add_argument("--radius", type=float, default=8.0)
    ap.add_argument("--guard", type=float, default=3.0)
    ap.add_argument("--rtps", type=float, default=0.3)
    ap.add_argument("--large-scales", type=float, default=4.0, help="wavenumber up to which the scale-dependent "
                    "row leaves the state's scales unlocalised")
    ap.add_argument("--sec-alpha", type=float, default=1.0, help="SEC power alpha (rho = |R|^alpha)")
    ap.add_argument("--eki-iterations", type=int, default=34, help="EKI iterations (its budget: J x iterations)")
    ap.add_argument("--eki-prior", default="grf", help="EKI's prior: grf (a Gaussian random field, alpha 2.5, tau 3, "
                    "std 0.5, as the paper's EKI) or gaussian_fit:DATA.zarr (the Gaussian fitted to the training data)")
    ap.add_argument("--dps-scale", type=float, default=1.0, help="DPS zeta (data units; measured: 1 fits, 5 diverges)")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE override of every run's job, after "
                    "the method's own (e.g. enkg.scale=4); recorded in --json's args")
    ap.add_argument("--truths", default="0,1")
    ap.add_argument("--methods", default="all",
                    help="comma-separated indices into the method list, all, or none (--curve only)")
    ap.add_argument("--curve", default="", help="ensemble sizes for the accuracy-vs-forward-runs figure")
    ap.add_argument("--curve-methods", default="0,2", help="indices of the methods the curve runs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="append one JSON line per run")
    ap.add_argument("--out", default="ns_table", help="folder for the figure")
    ap.add_argument("--truth-spectra", action="store_true", help="print each truth's share of vorticity variance at "
                    "|k| > 8 (its small-scale content) and stop")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    truths = [int(t) for t in a.truths.split(",")]
    if a.truth_spectra:
        for t in truths:
            print(f"truth {t}: {high_k_share(a, t):.3f} of the variance at |k| > 8")
        return
    table = methods(a)
    chosen = (list(table) if a.methods == "all" else [] if a.methods == "none"
              else [list(table)[int(i)] for i in a.methods.split(",")])
    print(f"Navier-Stokes {a.n}², k = {a.k}, T = {a.T}, Re = {a.Re}, noise {a.noise}, prior {a.prior}, J = {a.J}, "
          f"N = {a.N}, K = {a.K}, truths {truths}; {a.threads} thread(s), load {os.getloadavg()[0]:.1f} at start")
    print("| method | rel. L2 of mean | of particles | spread-skill | CRPS | forward runs | s per run |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for label in chosen:
            rows = [one(a, label, table[label], a.J, t, Path(tmp)) for t in truths]
            r = {k: np.array([row.get(k, np.nan) for row in rows], dtype=float)
                 for k in ("rel_l2_mean", "rel_l2_particles", "spread_skill", "crps", "forward_evaluations",
                           "wall_seconds")}
            print(f"| {label} | {r['rel_l2_mean'].mean():.3f} ({r['rel_l2_mean'].std():.3f}) | "
                  f"{r['rel_l2_particles'].mean():.3f} | {r['spread_skill'].mean():.2f} | {r['crps'].mean():.4f} | "
                  f"{int(r['forward_evaluations'].mean()):,} | {r['wall_seconds'].mean():.0f} |", flush=True)
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps({"args": vars(a), "method": label, **{k: v.tolist() for k, v in r.items()}})
                            + "\n")
        print("\nPublished (different priors, resolutions and ensembles; see the note per row):\n")
        print("| source | setting | method | rel. L2 | what differs |\n|---|---|---|---|---|")
        for src, setting, meth, val, note in PUBLISHED:
            print(f"| {src} | {setting} | {meth} | {val:.3f} | {note} |")
        if a.curve:
            curve(a, truths, Path(tmp), table)


def curve(a, truths, tmp: Path, table: dict) -> None:
    """Accuracy against forward runs over ensemble sizes for the --curve-methods (one JSON line per point with
    --json), then the figure of every curve point in --json (so curves run in several processes end in one figure)."""
    points = []
    for label in [list(table)[int(i)] for i in a.curve_methods.split(",")]:
        for J in [int(j) for j in a.curve.split(",")]:
            ms = [one(a, label, table[label], J, t, tmp) for t in truths]
            p = {"curve": label, "J": J, "truths": truths, "forward_evaluations": float(np.mean(
                 [m["forward_evaluations"] for m in ms])), **{k: float(np.mean([m[k] for m in ms])) for k in
                 ("rel_l2_mean", "rel_l2_particles", "spread_skill", "crps", "wall_seconds")}}
            points.append(p)
            print(f"curve | {label} | J = {J} | {p['rel_l2_mean']:.3f} | {p['spread_skill']:.2f} | "
                  f"{int(p['forward_evaluations']):,} |", flush=True)
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps({"args": vars(a), **p}) + "\n")
    if a.json:
        points = [r for r in map(json.loads, Path(a.json).read_text().splitlines()) if "curve" in r]
    curve_figure(points, f"NS {a.n}², k = {a.k}, noise {a.noise:g}: accuracy against forward runs", Path(a.out))


def curve_figure(points: list[dict], title: str, out: Path) -> None:
    """Relative L2 of the mean (and spread-skill) against forward runs, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for label in dict.fromkeys(p["curve"] for p in points):
        ps = sorted((p for p in points if p["curve"] == label), key=lambda p: p["J"])
        xs = [p["forward_evaluations"] for p in ps]
        ax.plot(xs, [p["rel_l2_mean"] for p in ps], "o-", label=label)
        ax2.plot(xs, [p["spread_skill"] for p in ps], "o-", label=label)
        for p in ps:
            ax.annotate(f"J={p['J']}", (p["forward_evaluations"], p["rel_l2_mean"]), fontsize=6)
    ax.set(xscale="log", xlabel="forward runs", ylabel="relative L2 of the ensemble mean", title=title)
    ax2.axhline(1.0, color="k", ls=":", lw=1)
    ax2.set(xscale="log", yscale="log", xlabel="forward runs", ylabel="spread / skill",
            title="spread-skill (1: calibrated)")
    ax.legend(fontsize=7)
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_forward_runs.png", dpi=120)
    print(f"figure: {out / 'accuracy_vs_forward_runs.png'}")


if __name__ == "__main__":
    main()
