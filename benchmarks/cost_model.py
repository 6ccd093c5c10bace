"""A cost model of one EnKG run, checked against measured runs, and extrapolated to the paper's problem at scale.

Per step i (K corrections inside the guidance window, n_ode(i) inner ODE steps, J members, W simulator slots,
P prior actors, state size d, observation size m):

    denoise_i = E_i J t_D(d) / P + c_p (1 + K [guided])    E_i = K n_ode(i) [guided] + predictor evaluations
                                                      (2 Heun, 1 last); c_p: a call to Ray prior actors (0 locally)
    forward_i = K (ceil(J / W) t_G + c_0 + J c_d + J r)   [guided]; in-process: K J (t_G + r) (one batched call);
                                                      r: recording a member's output in the run store
    update_i  = c_s + K (a J (d + m) + (4 J^2 m + 2 J^2 d) / R)   [guided]; the J x J update: two Gram products and
                                                      the move (GEMM), the element-wise passes over X and Psi, and
                                                      the loop's own per-step cost c_s
    store_i   = not modelled: the writer works behind the next step; the step waits only for its member records

with constants measured in isolation, in this process, before the runs: t_D(d) (seconds per member and denoiser
evaluation of the x_hat0 map, ODE arithmetic included, at the run's size and batch), t_G (simulator seconds per
member), c_0 + J c_d (the Ray pool's wall time per evaluate over the simulator's own, zero-cost simulator, J = 64 and
1024), a and R (kalman.enkg_update timed at J = 256 and 1024 on 64^2, solved for the two), c_s (the mean step
of a run of 4 members on 8^2, where nothing else costs), r (run-store records of J members at once), c_p (a
Ray prior call over the same call in this process). Each measured run records
its phases (denoise, forward, update, store: phases.PhaseClock) in its store; the table prints model against
measurement and the error per phase. Then the same formulas, with this machine's constants or stated assumptions
where a part cannot be measured here (GPU denoiser rate), give the paper's problem (128^2, m = 64^2) at J = 10^4 on
1,000 GPUs and 10^4 simulator slots: which term saturates first.

Usage: python benchmarks/cost_model.py [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import numpy as np
import torch
import zarr

from timing import best_of

from enkg_dist import config as cfgmod
from enkg_dist import runner, schedules, threads


def gemm_rate(dtype: torch.dtype, J: int = 1024, n: int = 4096) -> float:
    """Flop/s of a (J x J) @ (J x n) product, the shape of the update's move."""
    a, b = torch.randn(J, J, dtype=dtype), torch.randn(J, n, dtype=dtype)
    return 2 * J * J * n / best_of(lambda: a @ b)


def denoiser_seconds(built, J: int, dtype, n_ode: int = 4) -> float:
    """t_D: seconds per member and denoiser evaluation of the x_hat0 map (n_ode Euler steps) on a batch of J."""
    from enkg_dist.sampler import x_hat_map

    x = torch.randn(J, *built.problem.forward.state_shape, dtype=dtype)
    return best_of(lambda: x_hat_map(built.prior.denoise, x, 5.0, n_ode, 0.002, 7.0)) / (J * n_ode)


def update_constants(dtype) -> tuple[float, float]:
    """a (s per member-entry) and R (flop/s) from kalman.enkg_update at J = 256 and 1024, d = 64^2, m = 32^2."""
    from enkg_dist import kalman
    from enkg_dist.noise import NoiseCovariance

    d, m = 64 * 64, 32 * 32
    rows = []
    for J in (256, 1024):
        x, psi, y = torch.randn(J, 1, 64, 64, dtype=dtype), torch.randn(J, m, dtype=dtype), torch.randn(m, dtype=dtype)
        G = NoiseCovariance.scalar(0.01, m)
        t = best_of(lambda: kalman.enkg_update(x, psi, y, G, 1.0, "frobenius", 1.0))
        rows.append((J * (d + m), 4 * J * J * m + 2 * J * J * d, t))
    (e1, f1, t1), (e2, f2, t2) = rows
    inv_R = (t2 - t1 * e2 / e1) / (f2 - f1 * e2 / e1)
    return max((t1 - f1 * inv_R) / e1, 0.0), 1 / inv_R

def simulator_seconds(built, J: int, dtype) -> float:
    """t_G: seconds per member of the forward model on a batch of J (chaos delay included)."""
    x = torch.randn(J, *built.problem.forward.state_shape, dtype=dtype)
    return best_of(lambda: built.problem.forward(x), 2) / J


def record_seconds(J: int, state_shape, m: int) -> float:
    """r: seconds per member to record J members' outputs in the run store, arriving at once (what the in-process
    evaluator hands the recorder each correction)."""
    from enkg_dist.store import RunStore

    with tempfile.TemporaryDirectory() as d:
        store = RunStore.create(os.path.join(d, "r.zarr"), config={}, config_yaml="", J=J, state_shape=state_shape,
                                obs_size=m, num_steps=4, num_corrections=1)
        psi, ok = np.random.rand(J, m), np.ones(J, bool)
        times = []
        for step in range(4):
            t0 = time.perf_counter()
            store.record_members(step, 0, list(range(J)), psi, ok)
            times.append(time.perf_counter() - t0)
        store.close()
    return float(np.median(times)) / J


def prior_overhead(built, J: int, dtype) -> float:
    """c_p: seconds a step's prior call costs more on a Ray prior actor than in this process (the particles out, the
    shape back, x_hat0 kept in the object store), at batch J with one inner ODE step."""
    from enkg_dist.distributed import cluster
    from enkg_dist.distributed.prior import RemotePrior
    from enkg_dist.sampler import DenoiserMaps

    cluster.connect(None, num_cpus=4)
    remote = RemotePrior(built.prior, 1, 0.0, num_cpus=0, device="cpu", keep_x_hat=True, threads=1)
    x = torch.randn(J, *built.problem.forward.state_shape, dtype=dtype)
    local = DenoiserMaps(built.prior.denoise)
    t_remote = best_of(lambda: remote.x_hat_map(x, 5.0, 1, 0.002, 7.0).shape)
    t_local = best_of(lambda: local.x_hat_map(x, 5.0, 1, 0.002, 7.0))
    remote.shutdown()
    return max(t_remote - t_local, 0.0)


def pool_overhead(W: int, concurrency: int, batch_size: int | None = None) -> tuple[float, float]:
    """c_0, c_d: the Ray pool's wall time per evaluate = c_0 + J c_d with a zero-cost simulator (None: auto
    batching)."""
    from enkg_dist.distributed import cluster
    from enkg_dist.distributed.pool import PoolOptions, WorkerPool
    from enkg_dist.problems.linear_gaussian import SubsampleBlur

    cluster.connect(None, num_cpus=W // concurrency + 1)
    G = SubsampleBlur(16, 2)
    pool = WorkerPool(G, G.obs_size, PoolOptions(num_workers=W // concurrency, concurrency=concurrency,
                                                 batch_size=batch_size, threads=1))
    pool.wait_ready()
    times = {}
    for J in (64, 1024):
        x = torch.randn(J, 1, 16, 16, dtype=torch.float64)
        times[J] = best_of(lambda: pool.evaluate(x), 3) - best_of(lambda: G(x), 3)
    pool.shutdown()
    c_d = (times[1024] - times[64]) / (1024 - 64)
    return max(times[64] - 64 * c_d, 0.0), c_d


def step_counts(e) -> list[tuple[bool, int, int]]:
    """Per step: guided, n_ode, denoiser evaluations per member."""
    cfg = e.sampler_config()
    sig = cfg.sigmas()
    out = []
    for i in range(cfg.num_steps):
        guided = cfg.guided(i) and cfg.num_corrections > 0
        n_ode = schedules.inner_ode_steps(i, cfg.num_steps, cfg.ode_divisor, cfg.ode_max_steps)
        pred = 1 if (cfg.predictor != "heun" or sig[i + 1] == 0) else 2
        out.append((guided, n_ode, (cfg.num_corrections * n_ode if guided else 0) + pred))
    return out


def model(cfg, c: dict) -> dict:
    """Predicted seconds per phase, summed over the run's steps (store: not modelled)."""
    e, ex = cfg.enkg, cfg.execution
    J, K, d, m = e.ensemble_size, e.num_corrections, c["d"], c["m"]
    on_ray = ex.backend == "ray"
    W, P = ex.num_workers * ex.worker_concurrency, ex.prior_actors
    out = dict.fromkeys(("denoise", "forward", "update"), 0.0)
    for guided, _, E in step_counts(e)[1:]:  # step 0 holds the start-up of Ray's actors: left out of both
        out["update"] += c["c_s"]
        out["denoise"] += E * J * c["t_D"] / (P if on_ray else 1) + (c["c_p"] * (1 + K * guided) if on_ray else 0)
        if guided:
            fwd = (math.ceil(J / W) * c["t_G"] + c["c_0"] + J * c["c_d"] if on_ray else J * c["t_G"]) + J * c["r"]
            out["forward"] += K * fwd
            out["update"] += K * (c["a"] * J * (d + m) + (4 * J * J * m + 2 * J * J * d) / c["R"])
    out["total"] = sum(out.values())
    return out


def step_overhead(tmp: str) -> float:
    """c_s: seconds per step that are neither denoiser, simulator nor update arithmetic: a run of J = 4 members on 8^2,
    where those are negligible (its mean step time)."""
    cfg = cfgmod.load_config("builtin:linear_gaussian_64", BASE + ["problem.n=8", "enkg.ensemble_size=4",
                                                                   f"output_dir={tmp}"])
    out, _ = runner.run(cfg, os.path.join(tmp, "overhead"), progress=False)
    got = measured(out)
    return (got["total"] - got["store"]) / cfg.enkg.num_steps


def measured(run_dir) -> dict:
    z = zarr.open_group(str(run_dir / "store.zarr"), mode="r")
    fields, t = list(z.attrs["timing_fields"]), np.asarray(z["timings"][:])
    return {f: float(t[1:, fields.index(f)].sum()) for f in fields}  # steps 1.. (as the model)


POINTS = [  # (label, overrides): linear-Gaussian, unlocalised J x J update, a cheap or a sleeping simulator
    ("32², J=64, in-process", ["problem.n=32", "enkg.ensemble_size=64"]),
    ("32², J=256, in-process", ["problem.n=32", "enkg.ensemble_size=256"]),
    ("64², J=256, in-process", ["problem.n=64", "enkg.ensemble_size=256"]),
    ("64², J=1024, in-process", ["problem.n=64", "enkg.ensemble_size=1024"]),
    ("32², J=256, Ray W=32 (2x16), 20 ms simulator",
     ["problem.n=32", "enkg.ensemble_size=256", "execution.backend=ray", "execution.num_workers=2",
      "execution.worker_concurrency=16", "chaos={fail_rate: 0, delay: 0.02}"]),
    ("32², J=1024, Ray W=64 (2x32), 20 ms simulator",
     ["problem.n=32", "enkg.ensemble_size=1024", "execution.backend=ray", "execution.num_workers=2",
      "execution.worker_concurrency=32", "chaos={fail_rate: 0, delay: 0.02}"]),
]
BASE = ["enkg.num_steps=8", "enkg.localisation={kind: none}", "enkg.guard=1", "store.full_every=1000"]


def check(points, tmp: str) -> list[float]:
    dtype = torch.float64
    a, R = update_constants(dtype)
    print(f"update constants (kalman.enkg_update at J = 256, 1024 on 64^2): a = {a * 1e9:.2f} ns per member-entry, "
          f"R = {R / 1e9:.1f} GFLOP/s (GEMM alone: {gemm_rate(dtype) / 1e9:.1f})")
    c_s = step_overhead(tmp)
    print(f"per-step overhead of the run's loop (hooks, evaluator, progress; a J = 4, 8^2 run): {c_s * 1e3:.1f} ms")
    errors, pool_consts, t_D = [], {}, {}
    print("| run | phase | model (s) | measured (s) | error |")
    print("|---|---|---|---|---|")
    for label, over in points:
        cfg = cfgmod.load_config("builtin:linear_gaussian_64", BASE + over + [f"output_dir={tmp}"])
        built = runner.build(cfg)
        J, n = cfg.enkg.ensemble_size, cfg.problem.n
        if (n, J) not in t_D:  # the denoiser's rate at this size and batch
            t_D[n, J] = denoiser_seconds(built, J, dtype)
        c = {"d": n * n, "m": built.problem.forward.obs_size, "t_D": t_D[n, J], "a": a, "R": R, "c_0": 0.0,
             "c_d": 0.0, "c_s": c_s}
        # runner.build wrapped the forward model in the chaos settings: a sleeping member's time
        c["t_G"] = simulator_seconds(built, 8 if cfg.chaos else J, dtype)
        c["r"] = record_seconds(J, built.problem.forward.state_shape, c["m"])
        c["c_p"] = prior_overhead(built, J, dtype) if cfg.execution.backend == "ray" else 0.0
        if cfg.execution.backend == "ray":
            key = (cfg.execution.num_workers, cfg.execution.worker_concurrency)
            if key not in pool_consts:
                pool_consts[key] = pool_overhead(key[0] * key[1], key[1])
            c["c_0"], c["c_d"] = pool_consts[key]
        pred = model(cfg, c)
        out, _ = runner.run(cfg, os.path.join(tmp, f"point{len(errors)}"), progress=False)
        got = measured(out)
        for phase in ("denoise", "forward", "update", "store", "total"):
            p = pred.get(phase)
            err = p / got[phase] - 1 if p is not None and got[phase] > 0 else None
            if phase == "total":
                errors.append(err)
            print(f"| {label} | {phase} | {'-' if p is None else f'{p:.3f}'} | {got[phase]:.3f} | "
                  f"{'-' if err is None else f'{err:+.0%}'} |", flush=True)
        print(f"|  | constants | t_D {c['t_D'] * 1e6:.1f} us, t_G {c['t_G'] * 1e3:.2f} ms, c_0 {c['c_0'] * 1e3:.1f} "
              f"ms, c_d {c['c_d'] * 1e3:.3f} ms, r {c['r'] * 1e3:.3f} ms, c_p {c['c_p'] * 1e3:.1f} ms | | |",
              flush=True)
    return errors


def extrapolate(R_cpu: float, c_d: float, c_0: float, args) -> None:
    """The paper's problem at J = 10^4 on P GPUs and W simulator slots: seconds per guided correction, by term."""
    J, d, m, K = 10_000, 128 * 128, 64 * 64, 2
    e = cfgmod.load_config("builtin:linear_gaussian_64", []).enkg  # the sampler's defaults: N = 80 ... use n_ode
    n_ode = max(n for _, n, _ in step_counts(e))
    flops_D = args.denoiser_gflop * 1e9
    t_D = flops_D / (args.gpu_tflops * 1e12)
    terms = {
        "denoise (x_hat0 map, n_ode = %d, on %d GPUs)" % (n_ode, args.gpus): n_ode * J * t_D / args.gpus,
        "simulators (ceil(J/W) x t_G, %d slots)" % args.slots: math.ceil(J / args.slots) * args.t_G,
        "driver dispatch + gather (c_0 + J c_d)": c_0 + J * c_d,
        "update on the driver's CPU (this machine's R)": (4 * J * J * m + 2 * J * J * d) / R_cpu,
        "update on one GPU (%.0f TFLOP/s)" % args.gpu_tflops:
            (4 * J * J * m + 2 * J * J * d) / (args.gpu_tflops * 1e12),
        "store: the ensemble (J d float32) at %.1f GB/s" % args.disk_gbs: J * d * 4 / (args.disk_gbs * 1e9),
    }
    print(f"\nThe paper's problem at J = {J}: d = 128², m = 64², K = {K}, per correction (a guided step has K of "
          f"them plus the predictor):")
    print("| term | seconds per correction |")
    print("|---|---|")
    for k, v in terms.items():
        print(f"| {k} | {v:.3g} |")
    print(f"assumptions (not measured here): a denoiser of {args.denoiser_gflop:g} GFLOP per member at 128² run at "
          f"{args.gpu_tflops:g} TFLOP/s per GPU; t_G = {args.t_G:g} s per member (the 128², T = 1 solve measured on "
          f"one core here); a parallel file system at {args.disk_gbs:g} GB/s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="the in-process points only")
    ap.add_argument("--gpus", type=int, default=1000)
    ap.add_argument("--slots", type=int, default=10_000)
    ap.add_argument("--t-G", dest="t_G", type=float, default=1.0, help="s per member of the 128^2 simulator")
    ap.add_argument("--denoiser-gflop", type=float, default=2.4,
                    help="GFLOP per member of the denoiser at 128^2 (the shipped UNet's 0.152 at 32^2, x16)")
    ap.add_argument("--gpu-tflops", type=float, default=50.0, help="sustained denoiser TFLOP/s per GPU (assumed)")
    ap.add_argument("--disk-gbs", type=float, default=2.0)
    args = ap.parse_args()
    threads.set_threads(args.threads)
    print(f"{args.threads} thread(s); load {os.getloadavg()[0]:.1f} at start")
    points = POINTS[:4] if args.quick else POINTS
    with tempfile.TemporaryDirectory() as tmp:
        errors = check(points, tmp)
    print(f"\ntotal-time error over {len(errors)} runs: median {np.median(np.abs(errors)):.0%}, "
          f"worst {max(errors, key=abs):+.0%}; load {os.getloadavg()[0]:.1f} at the end")
    # at J = W every task holds one member: the driver's cost per member at one member per task
    c_0, c_d = pool_overhead(32, 16, batch_size=1) if not args.quick else (5e-3, 1e-3)
    extrapolate(gemm_rate(torch.float32), c_d, c_0, args)


if __name__ == "__main__":
    main()
