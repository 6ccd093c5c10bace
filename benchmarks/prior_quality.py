"""Quality of a learned prior, measured against exact references (issue 6 §4).

    python benchmarks/prior_quality.py grf                        # (a) learned vs exact Gaussian denoiser
    python benchmarks/prior_quality.py samples DATA.zarr [--checkpoint builtin:ns32]   # (b) PF-ODE samples vs data
    python benchmarks/prior_quality.py enkg DATA.zarr [--truths 0,1]                   # (c) EnKG: learned vs fitted
    python benchmarks/prior_quality.py denoise DATA.zarr --checkpoint A,B              # (d) denoiser MSE per sigma

(a) trains a small EDM UNet on draws of a Gaussian random field, whose exact denoiser is known, and prints the
    learned denoiser's mean squared error over the exact one's per sigma (1 is optimal; the identity's is sigma^2).
(b) draws samples from the learned prior (Heun PF-ODE, EDM schedule) and compares them with the held-out test split:
    radially summed energy spectrum (relative error per shell), a histogram distance of the pointwise values (total
    variation), and the relative L2 distance of each sample to its nearest training field (memorisation shows as
    samples far closer to the training set than held-out fields are). The Gaussian field fitted to the training
    split's spectrum is the baseline throughout.
(c) runs the same EnKG inversion (Navier-Stokes, the shipped default job's settings) with the learned prior and
    with the fitted Gaussian prior, and prints the relative L2 error of the ensemble mean for each truth.
(d) denoises the held-out test fields at fixed noise draws with each checkpoint and with the fitted Gaussian (the
    exact posterior mean were the data Gaussian), and prints each one's mean squared error against the clean fields.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from enkg_dist import sampler, schedules
from enkg_dist.priors.gaussian import GaussianFieldPrior, shell_sum


def pf_ode_samples(denoise, shape, S: int, steps: int, seed: int, sigma_max: float = 80.0) -> torch.Tensor:
    """S prior samples by the Heun PF-ODE over the EDM schedule (enkg.md §1), float64."""
    gen = torch.Generator().manual_seed(seed)
    sigmas = schedules.karras_sigmas(steps, sigma_max, 0.002)
    x = torch.randn((S, *shape), generator=gen, dtype=torch.float64) * sigmas[0]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = (sampler.pf_ode_heun if s_next > 0 else sampler.pf_ode_euler)(denoise, x, float(s), float(s_next))
    return x


def spectrum(x: torch.Tensor) -> torch.Tensor:
    """Mean radially summed energy spectrum of fields (S, 1, N, N)."""
    x = x.reshape(-1, x.shape[-2], x.shape[-1]).to(torch.float64)
    power = (torch.fft.rfft2(x, norm="ortho").abs() ** 2).mean(0)
    return shell_sum(power)


def tv_distance(a: torch.Tensor, b: torch.Tensor, bins: int = 60) -> float:
    """Total variation distance of the histograms of two sets of pointwise values (common bins)."""
    lo, hi = float(torch.minimum(a.min(), b.min())), float(torch.maximum(a.max(), b.max()))
    ha = torch.histc(a.flatten().float(), bins, lo, hi)
    hb = torch.histc(b.flatten().float(), bins, lo, hi)
    return 0.5 * float((ha / ha.sum() - hb / hb.sum()).abs().sum())


def nearest_rel_l2(x: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """For each field of x, min over training fields of |x - t| / |x|."""
    xf, tf = x.reshape(x.shape[0], -1).to(torch.float64), train.reshape(train.shape[0], -1).to(torch.float64)
    return torch.cdist(xf, tf).min(1).values / xf.norm(dim=1)


def grf(args) -> None:
    """(a) the learned denoiser's error over the exact Gaussian denoiser's, per sigma."""
    from enkg_dist.priors.learned import LearnedPrior
    from enkg_dist.priors.training import TrainConfig, train
    from enkg_dist.priors.unet import UNetConfig

    torch.set_num_threads(args.threads)
    n = args.n
    prior = GaussianFieldPrior.matern_like(n, 2.5, 3.0, 0.5)
    gen = torch.Generator().manual_seed(0)
    data = prior.sample(torch.randn(args.samples, 1, n, n, generator=gen, dtype=torch.float64)).float()
    cfg = TrainConfig(model=UNetConfig(resolution=n, model_channels=16, channel_mult=(1, 2), attn_resolutions=(),
                                       head_channels=32, sigma_data=float(data.std())),
                      steps=args.steps, batch_size=32, lr=1e-3, warmup_steps=100, augment="none",
                      val_every=10**9, checkpoint_every=args.steps, ema_halflife=5000)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        train(cfg, data, out, progress=False)
        learned = LearnedPrior.from_checkpoint(Path(out) / "prior.pt", device="cpu")
    took = time.perf_counter() - t0
    x0 = prior.sample(torch.randn(512, 1, n, n, generator=gen, dtype=torch.float64))
    print(f"(a) Gaussian random field {n}x{n} (spectrum (|k|^2+9)^-2.5, std 0.5): UNet trained {args.steps} steps on "
          f"{args.samples} draws in {took:.0f} s; 512 fresh draws")
    print("| sigma | exact MSE | learned MSE | learned / exact | identity / exact |")
    print("|---|---|---|---|---|")
    for sigma in (0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0):
        x = x0 + sigma * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        exact = float(((prior.denoise(x, sigma) - x0) ** 2).mean())
        mse = float(((learned.denoise(x, sigma) - x0) ** 2).mean())
        print(f"| {sigma:g} | {exact:.3e} | {mse:.3e} | {mse / exact:.3f} | {sigma**2 / exact:.2f} |", flush=True)


def _splits(args) -> tuple[torch.Tensor, torch.Tensor]:
    """The data set's train and test fields (float64), after pinning torch to args.threads."""
    from enkg_dist.data import open_dataset

    torch.set_num_threads(args.threads)
    return tuple(torch.from_numpy(np.asarray(open_dataset(args.data, split))).to(torch.float64)
                 for split in ("train", "test"))


def samples(args) -> None:
    """(b) samples from the learned prior against held-out data, with the fitted Gaussian as baseline."""
    from enkg_dist.priors.learned import LearnedPrior

    train_x, test_x = _splits(args)
    n = train_x.shape[-1]
    learned = LearnedPrior.from_checkpoint(args.checkpoint, device="cpu", resolution=n)
    fitted = GaussianFieldPrior.fit(train_x, radial=True)
    S = test_x.shape[0]
    t0 = time.perf_counter()
    xs = {"learned prior (PF-ODE)": pf_ode_samples(learned.denoise, (1, n, n), S, args.ode_steps, 1),
          "fitted Gaussian": fitted.sample(torch.randn(S, 1, n, n, generator=torch.Generator().manual_seed(2),
                                                       dtype=torch.float64)),
          "training fields (reference)": train_x[torch.randperm(train_x.shape[0],
                                                                generator=torch.Generator().manual_seed(3))[:S]]}
    took = time.perf_counter() - t0
    e_test = spectrum(test_x)
    shells = slice(1, n // 2 + 1)
    print(f"(b) {S} samples each against the {S} held-out test fields ({n}x{n}); learned sampling: {args.ode_steps} "
          f"Heun steps, {took:.1f} s")
    print("| fields | spectrum: mean rel. error over shells 1..N/2 | histogram TV distance | nearest-train rel. L2 "
          "(median) |")
    print("|---|---|---|---|")
    near_test = float(nearest_rel_l2(test_x, train_x).median())
    for name, x in xs.items():
        err = float(((spectrum(x)[shells] - e_test[shells]).abs() / e_test[shells]).mean())
        near = ("(is training data)" if name.startswith("training")
                else f"{float(nearest_rel_l2(x, train_x).median()):.3f}")
        print(f"| {name} | {err:.3f} | {tv_distance(x, test_x):.3f} | {near} |")
    print(f"| held-out test fields | 0 | 0 | {near_test:.3f} |")


def denoise(args) -> None:
    """(d) denoiser MSE on the held-out test split per sigma: each checkpoint's against the fitted Gaussian's."""
    from enkg_dist.priors.learned import LearnedPrior

    train_x, test_x = _splits(args)
    x0 = test_x.repeat(args.draws, 1, 1, 1)
    n = x0.shape[-1]
    names = args.checkpoint.split(",")
    denoisers = {"fitted Gaussian": GaussianFieldPrior.fit(train_x, radial=True).denoise}
    denoisers.update({c: LearnedPrior.from_checkpoint(c, device="cpu", resolution=n).denoise for c in names})
    sigmas = [float(v) for v in args.sigmas.split(",")]
    print(f"(d) denoiser MSE on {x0.shape[0]} noisy copies of the held-out test fields ({n}x{n}); in brackets: over "
          "the fitted Gaussian's")
    print("| sigma | " + " | ".join(denoisers) + " | identity |")
    print("|---|" + "---|" * (len(denoisers) + 1))
    for i, sigma in enumerate(sigmas):
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(100 + i), dtype=torch.float64)
        mse = {k: float(((d(x0 + sigma * noise, sigma) - x0) ** 2).mean()) for k, d in denoisers.items()}
        g = mse["fitted Gaussian"]
        print(f"| {sigma:g} | " + " | ".join(f"{v:.3e} ({v / g:.2f})" for v in mse.values()) + f" | {sigma**2:.3e} |",
              flush=True)


def enkg(args) -> None:
    """(c) the same EnKG inversion with the learned prior and with the fitted Gaussian prior."""
    from enkg_dist import config as cfgmod
    from enkg_dist import runner

    torch.set_num_threads(args.threads)
    base = cfgmod.load_config(None, args.set)
    priors = {"learned": {"kind": "learned", "checkpoint": args.checkpoint},
              "fitted Gaussian": {"kind": "gaussian_fit", "data": str(args.data), "radial": True}}
    print(f"(c) EnKG, {base.problem.n}x{base.problem.n} Navier-Stokes (k = {base.problem.k}, T = {base.problem.T}), "
          f"J = {base.enkg.ensemble_size}, N = {base.enkg.num_steps}, K = {base.enkg.num_corrections}")
    print("| truth seed | prior | rel. L2 of the ensemble mean | rel. L2 of particles (mean) | wall (s) |")
    print("|---|---|---|---|---|")
    rows = {k: [] for k in priors}
    with tempfile.TemporaryDirectory() as out:
        for seed in [int(s) for s in args.truths.split(",")]:
            for name, prior in priors.items():
                data = base.model_dump(mode="json")
                data["prior"] = prior
                data["problem"]["truth_seed"] = seed
                cfg = cfgmod.validate(data)
                _, m = runner.run(cfg, Path(out) / f"{seed}-{prior['kind']}", progress=False)
                rows[name].append(m["rel_l2_mean"])
                print(f"| {seed} | {name} | {m['rel_l2_mean']:.4f} | {m['rel_l2_particles']:.4f} | "
                      f"{m['wall_seconds']:.0f} |", flush=True)
    print("mean rel. L2 of the ensemble mean: " + ", ".join(f"{k} {np.mean(v):.4f}" for k, v in rows.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    a = sub.add_parser("grf")
    a.add_argument("--n", type=int, default=16)
    a.add_argument("--samples", type=int, default=4096)
    a.add_argument("--steps", type=int, default=1500)
    b = sub.add_parser("samples")
    b.add_argument("data")
    b.add_argument("--ode-steps", type=int, default=32)
    d = sub.add_parser("denoise")
    d.add_argument("data")
    d.add_argument("--sigmas", default="0.05,0.2,0.5,1,2,5")
    d.add_argument("--draws", type=int, default=4, help="noise draws per test field")
    c = sub.add_parser("enkg")
    c.add_argument("data")
    c.add_argument("--truths", default="0,1")
    c.add_argument("--set", action="append", default=[], help="override a key of the default job")
    for p in (b, c, d):
        p.add_argument("--checkpoint", default="builtin:ns32")
    for p in (a, b, c, d):
        p.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    {"grf": grf, "samples": samples, "enkg": enkg, "denoise": denoise}[args.what](args)


if __name__ == "__main__":
    main()
