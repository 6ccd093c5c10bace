"""Shards ensemble members over simulator workers and gathers results as they finish (`ray.wait`).

Failures are handled per member: a simulator that raises or returns non-finite values fails that member; a task that
exceeds its timeout fails its members and its (stuck) worker is killed and replaced; a worker or node that dies has
its in-flight members re-dispatched to live workers. Optional straggler re-issue: a task running longer than
`straggler_factor` x the median task time is started again on an idle worker, the first result wins, and the
worker still running the losing copy is restarted.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, WorkerCrashedError

from enkg_dist.distributed.metrics import pool_metrics
from enkg_dist.distributed.workers import RemoteSimulatorWorker
from enkg_dist.problems.base import ForwardResult

WORKER_LOST = (RayActorError, ActorDiedError, ActorUnavailableError, WorkerCrashedError)


@dataclass(frozen=True)
class PoolOptions:
    """Sizes, resources and failure rules of a simulator pool."""

    num_workers: int = 2
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict = field(default_factory=dict)
    batch_size: int = 1  # members per task
    timeout: float | None = None  # seconds per member; a task gets batch_size x timeout
    straggler_factor: float | None = None  # re-issue tasks slower than this x the median
    max_retries: int = 3  # re-dispatches of a task whose worker died
    start_timeout: float = 300.0  # seconds to wait for any worker to start before giving up


@dataclass
class _Task:
    id: int
    members: list[int]
    ref: ray.ObjectRef  # the members' rows in the object store
    attempts: int = 0
    copies: int = 0  # straggler duplicates started


@dataclass
class PoolStats:
    evaluations: int = 0
    failures: int = 0
    workers_replaced: int = 0
    redispatched: int = 0
    reissued: int = 0
    timeouts: int = 0
    task_seconds: list[float] = field(default_factory=list)


class WorkerPool:
    """evaluate(x) -> ForwardResult for all rows of x, computed by `num_workers` simulator actors."""

    def __init__(self, spec, obs_size: int, options: PoolOptions | None = None, poll: float = 0.05):
        self.options = options or PoolOptions()
        if self.options.num_workers < 1 or self.options.batch_size < 1:
            raise ValueError("num_workers and batch_size must be >= 1")
        self.obs_size, self.poll = obs_size, poll
        self._spec = ray.put(spec)
        self._starting: dict[ray.ObjectRef, int] = {}  # readiness pings of workers still starting
        self._start_failures = 0
        self.workers = [None] * self.options.num_workers
        for w in range(self.options.num_workers):
            self._start_worker(w)
        self.stats = PoolStats()
        self._metrics = pool_metrics()

    def _start_worker(self, w: int) -> None:
        """A new actor in slot w; it takes work only once it answers (start-up never counts against timeouts)."""
        o = self.options
        self.workers[w] = RemoteSimulatorWorker.options(
            num_cpus=o.num_cpus, num_gpus=o.num_gpus, resources=dict(o.resources), max_restarts=0,
            max_task_retries=0).remote(self._spec)
        self._starting[self.workers[w].pid.remote()] = w

    def _replace(self, w: int, kill: bool) -> None:
        if kill:
            ray.kill(self.workers[w], no_restart=True)
        self._start_worker(w)
        self.stats.workers_replaced += 1

    def shutdown(self) -> None:
        for a in self.workers:
            ray.kill(a, no_restart=True)
        self.workers = []

    def evaluate(self, x: torch.Tensor, members=None) -> ForwardResult:
        """Forward runs for every row of x; the result of each row is independent of sharding and order."""
        xn = x.detach().cpu().numpy()
        J, bs = xn.shape[0], self.options.batch_size
        ids = list(range(J))
        queue = deque(_Task(t, ids[s : s + bs], ray.put(xn[s : s + bs])) for t, s in enumerate(range(0, J, bs)))
        psi = np.full((J, self.obs_size), np.nan, dtype=xn.dtype)
        ok = np.zeros(J, dtype=bool)
        reasons: list[str | None] = [None] * J
        done: set[int] = set()
        inflight: dict[ray.ObjectRef, tuple[_Task, int, float]] = {}
        idle = [w for w in range(len(self.workers)) if w not in self._starting.values()]

        def finish(task: _Task, p, o, r):
            done.add(task.id)
            psi[task.members], ok[task.members] = p, o
            for j, why in zip(task.members, r):
                reasons[j] = why

        def fail(task: _Task, why: str):
            finish(task, np.nan, False, [why] * len(task.members))

        def start(task: _Task, w: int):
            inflight[self.workers[w].evaluate.remote(task.members, task.ref)] = (task, w, time.monotonic())

        waiting_since = time.monotonic()
        while queue or inflight:
            if inflight or idle:
                waiting_since = time.monotonic()
            elif time.monotonic() - waiting_since > self.options.start_timeout:
                o = self.options
                raise RuntimeError(f"no simulator worker started within {o.start_timeout:.0f} s (each asks "
                                   f"{o.num_cpus} CPU, {o.num_gpus} GPU, {dict(o.resources)}; the cluster has "
                                   f"{ray.cluster_resources()})")
            while idle and queue:
                task = queue.popleft()
                if task.id not in done:
                    start(task, idle.pop())
            ready, _ = ray.wait([*inflight, *self._starting], num_returns=1, timeout=self.poll)
            for ref in ready:
                if ref in self._starting:
                    self._worker_started(ref, idle)
                    continue
                task, w, t0 = inflight.pop(ref)
                try:
                    _, p, o, r = ray.get(ref)
                except WORKER_LOST as e:
                    self._replace(w, kill=False)
                    if task.id in done or any(t.id == task.id for t, _, _ in inflight.values()):
                        continue  # another copy is still running or already won
                    task.attempts += 1
                    self.stats.redispatched += 1
                    if task.attempts > self.options.max_retries:
                        fail(task, f"worker lost {task.attempts} times ({type(e).__name__})")
                    else:
                        queue.appendleft(task)
                    continue
                idle.append(w)
                if task.id in done:
                    continue  # a straggler copy lost the race
                self.stats.task_seconds.append(time.monotonic() - t0)
                finish(task, p, o, r)
                for other, (t2, w2, _) in list(inflight.items()):
                    if t2.id == task.id:  # the losing straggler copy: stop it by restarting its worker
                        inflight.pop(other)
                        self._replace(w2, kill=True)
            self._check_time(inflight, idle, queue, done, fail)
        self._account(ok)
        return ForwardResult(torch.from_numpy(psi), torch.from_numpy(ok), reasons)

    def _worker_started(self, ref, idle: list[int]) -> None:
        """A starting worker answered (or died while starting: start another in its slot)."""
        w = self._starting.pop(ref)
        try:
            ray.get(ref)
            idle.append(w)
            self._start_failures = 0
        except WORKER_LOST as e:
            self._start_failures += 1
            if self._start_failures > 3 * len(self.workers):
                raise RuntimeError(f"simulator workers keep dying at start-up: {str(e).splitlines()[0]}") from None
            self._start_worker(w)
            self.stats.workers_replaced += 1

    def _check_time(self, inflight, idle, queue, done, fail) -> None:
        """Timeouts (fail members, kill and replace the worker) and straggler re-issue."""
        now, o = time.monotonic(), self.options
        for ref, (task, w, t0) in list(inflight.items()):
            if task.id in done:
                continue
            if o.timeout is not None and now - t0 > o.timeout * len(task.members):
                inflight.pop(ref)
                self.stats.timeouts += 1
                self._replace(w, kill=True)
                if not any(t.id == task.id for t, _, _ in inflight.values()):
                    fail(task, f"timeout after {o.timeout * len(task.members):.3g} s")
        if o.straggler_factor and idle and len(self.stats.task_seconds) >= 3 and not queue:
            median = statistics.median(self.stats.task_seconds[-100:])
            for ref, (task, w, t0) in list(inflight.items()):
                if idle and task.id not in done and task.copies == 0 and now - t0 > o.straggler_factor * median:
                    task.copies += 1
                    self.stats.reissued += 1
                    w2 = idle.pop()
                    inflight[self.workers[w2].evaluate.remote(task.members, task.ref)] = (task, w2, now)

    def _account(self, ok: np.ndarray) -> None:
        n, failed = ok.size, int((~ok).sum())
        self.stats.evaluations += n
        self.stats.failures += failed
        self._metrics["evaluations"].inc(n)
        if failed:
            self._metrics["failures"].inc(failed)
