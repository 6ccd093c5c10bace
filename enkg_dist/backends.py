"""Execution backends: where the prior and the forward model run (this process, or Ray actors)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from enkg_dist.evaluation import ForwardResult
from enkg_dist.problems.base import safe_evaluate


@dataclass
class Backend:
    """denoise(x, sigma) for the sampler, forward(x) -> ForwardResult, and what to close at the end."""

    name: str
    denoise: Callable
    forward: Callable[[torch.Tensor], ForwardResult]
    close: Callable[[], None] = lambda: None
    stats: Callable[[], dict] = dict
    on_step: Callable[[int, float], None] = lambda i, seconds: None  # e.g. export metrics
    threads: Callable[[], dict] = dict  # the threads each remote process runs (threads.in_use), by kind


def local_forward(G, batch_size: int = 0):
    """forward(x, on_result) in this process, in chunks of batch_size members (0: all at once). Particles on a GPU
    reach G there when G can run on one (`G.on_gpu`), else they are moved to the CPU first."""

    def forward(x: torch.Tensor, on_result=None) -> ForwardResult:
        if x.device.type != "cpu" and not getattr(G, "on_gpu", False):
            x = x.detach().cpu()
        J = x.shape[0]
        step = batch_size or J
        parts = []
        for s in range(0, J, step):
            rows = list(range(s, min(s + step, J)))
            res = safe_evaluate(G, x[s : s + step], rows)
            if on_result is not None:
                on_result(rows, res.psi.detach().cpu().numpy(), res.ok.cpu().numpy(), list(res.reasons))
            parts.append(res)
        return ForwardResult(torch.cat([p.psi.cpu() for p in parts]), torch.cat([p.ok.cpu() for p in parts]),
                             [r for p in parts for r in p.reasons])

    return forward


def local_backend(prior, problem, batch_size: int = 0) -> Backend:
    """Everything in this process."""
    return Backend("local", prior.denoise, local_forward(problem.forward, batch_size))


def ray_backend(prior, problem, ex, address: str | None, prior_device: str = "auto") -> Backend:
    """Prior actors and a simulator worker pool on a Ray cluster (embedded local Ray when no address);
    `prior_device` (the config's prior.device) is resolved by each prior actor against its own GPU grant."""
    from enkg_dist.distributed import cluster
    from enkg_dist.distributed.metrics import pool_metrics
    from enkg_dist.distributed.pool import PoolOptions, WorkerPool
    from enkg_dist.distributed.prior import RemotePrior

    cluster.connect(address or ex.address, num_cpus=ex.num_cpus, dashboard=ex.dashboard,
                    runtime_env=ex.runtime_env)
    remote_prior = RemotePrior(prior, ex.prior_actors, ex.prior_gpus, num_cpus=0 if ex.prior_gpus == 0 else 1,
                               device=prior_device, keep_x_hat=True,  # x_hat0 goes to the workers by reference
                               threads=ex.threads)
    pool = WorkerPool(problem.forward, problem.forward.obs_size, PoolOptions(
        num_workers=ex.num_workers, num_cpus=ex.worker_cpus, num_gpus=ex.worker_gpus,
        resources=dict(ex.worker_resources), batch_size=ex.batch_size, timeout=ex.timeout,
        straggler_factor=ex.straggler_factor, max_retries=ex.max_retries, threads=ex.threads,
        concurrency=ex.worker_concurrency))

    seen: dict = {}  # the processes' thread counts, asked before they are shut down (recorded in metrics.json)

    def live_threads() -> dict:
        return {"simulator_workers": pool.threads(), "prior_actors": remote_prior.threads()}

    def close():
        try:
            seen.update(live_threads())
        except Exception:  # noqa: BLE001 - a worker lost at the end: the counts are informative only
            pass
        pool.shutdown()
        remote_prior.shutdown()

    def stats():
        s = pool.stats
        return {"workers_replaced": s.workers_replaced, "redispatched": s.redispatched, "reissued": s.reissued,
                "timeouts": s.timeouts}

    def on_step(i: int, seconds: float) -> None:
        m = pool_metrics()
        m["step_seconds"].observe(seconds)
        m["step"].set(i)

    return Backend("ray", remote_prior, pool.evaluate, close, stats, on_step, lambda: dict(seen) or live_threads())
