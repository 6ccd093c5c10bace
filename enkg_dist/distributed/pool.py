"""Shards ensemble members over simulator workers and gathers results as they finish (`ray.wait`).

Failures are handled per member: a simulator that raises or returns non-finite values fails that member; a task that
exceeds its timeout fails its members and its (stuck) worker is killed and replaced; a worker or node that dies has
its in-flight members re-dispatched to live workers. Optional straggler re-issue: a task running longer than
`straggler_factor` x the median task time is started again on an idle worker, the first result wins, and the
worker still running the losing copy is restarted.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, WorkerCrashedError

from enkg_dist.distributed.ensemble import RemoteEnsemble
from enkg_dist.distributed.metrics import pool_metrics
from enkg_dist.distributed.traffic import DRIVER, nbytes
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
    batch_size: int | None = 1  # members per task; None: auto_batch_size, from J, W and measured member times
    timeout: float | None = None  # seconds per member; a task gets batch_size x timeout
    straggler_factor: float | None = None  # re-issue tasks slower than this x the median
    max_retries: int = 3  # re-dispatches of a task whose worker died
    depth: int = 2  # tasks queued per worker, so a worker never idles during a round trip
    start_timeout: float = 300.0  # seconds to wait for any worker to start before giving up
    threads: int | None = None  # intra-op threads per worker (None: the CPUs it reserved, num_cpus)
    concurrency: int = 1  # tasks one worker runs at once, in threads (simulators that wait: programs, MPI, sleeps)


@dataclass
class _Task:
    id: int
    members: list[int]
    x: np.ndarray | None  # the members' rows (Ray passes large ones through the object store); None: by reference
    attempts: int = 0
    copies: int = 0  # straggler duplicates started
    generation: int = 0  # of the source's shards when last submitted (rows by reference)


@dataclass
class PoolStats:
    evaluations: int = 0
    failures: int = 0
    workers_replaced: int = 0
    redispatched: int = 0
    reissued: int = 0
    timeouts: int = 0
    # recent timings only (a run of days must not grow them without bound)
    task_seconds: deque = field(default_factory=lambda: deque(maxlen=100))
    member_seconds: deque = field(default_factory=lambda: deque(maxlen=1000))  # task time / members in the task
    batch_sizes: deque = field(default_factory=lambda: deque(maxlen=1000))  # members per task, per evaluate call


AUTO_OVERHEAD = 2e-3  # driver seconds per task assumed by auto batching (measured: 1.2-1.3 ms here)


def auto_batch_size(J: int, W: int, member_seconds: float | None, overhead: float = AUTO_OVERHEAD,
                    busy: float = 0.05) -> int:
    """Members per task: enough that dispatching costs the driver under `busy` of the workers' time, yet at most
    J / (2 W) so that every worker gets two tasks or more (load balance); J / (2 W) before any member was timed."""
    cap = max(1, J // (2 * W))
    if not member_seconds or member_seconds <= 0:
        return cap
    need = math.ceil(W * overhead / (busy * member_seconds))
    return max(1, min(need, cap))


class WorkerPool:
    """evaluate(x) -> ForwardResult for all rows of x, computed by `num_workers` simulator actors."""

    def __init__(self, spec, obs_size: int, options: PoolOptions | None = None, poll: float = 0.05):
        self.options = options or PoolOptions()
        o = self.options
        if o.num_workers < 1 or o.concurrency < 1 or (o.batch_size is not None and o.batch_size < 1):
            raise ValueError("num_workers, concurrency and batch_size must be >= 1")
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
            max_task_retries=0, max_concurrency=o.concurrency).remote(self._spec, o.threads)
        self._starting[self.workers[w].pid.remote()] = w

    def _replace(self, w: int, kill: bool) -> None:
        if kill:
            ray.kill(self.workers[w], no_restart=True)
        self._start_worker(w)
        self.stats.workers_replaced += 1

    def wait_ready(self, timeout: float | None = None) -> int:
        """Block until every worker has started (or `timeout` s passed); returns how many are still starting."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._starting:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(self._starting), num_returns=len(self._starting), timeout=left)
            for ref in ready:
                self._worker_started(ref)
            if deadline is not None and time.monotonic() >= deadline:
                break
        return len(self._starting)

    def threads(self, timeout: float = 10.0) -> list[dict]:
        """The threads each worker runs, asked from inside it (threads.in_use); workers that do not answer within
        `timeout` seconds (lost with their node, restarting) are left out."""
        return answered([a.thread_counts.remote() for a in self.workers if a is not None], timeout)

    def shutdown(self) -> None:
        for a in self.workers:
            ray.kill(a, no_restart=True)
        self.workers = []

    def evaluate(self, x: torch.Tensor | RemoteEnsemble, on_result=None) -> ForwardResult:
        """Forward runs for every row of x; the result of each row is independent of sharding and order. A
        RemoteEnsemble (x_hat0 left with the prior actors) is fetched by the workers themselves, by reference.

        `on_result(rows, psi, ok, reasons)` is called as each task's results arrive (rows index x)."""
        remote = isinstance(x, RemoteEnsemble)
        xn = None if remote else x.detach().cpu().numpy()
        J = x.shape[0]
        bs = self.batch_size(J)
        self.stats.batch_sizes.append(bs)
        ids = list(range(J))
        d = _Dispatch(self, deque(_Task(t, ids[s : s + bs], None if remote else xn[s : s + bs])
                                  for t, s in enumerate(range(0, J, bs))),
                      J, x.np_dtype if remote else xn.dtype, on_result, x if remote else None)
        d.run()
        self._account(d.ok)
        return ForwardResult(torch.from_numpy(d.psi), torch.from_numpy(d.ok), d.reasons)

    def batch_size(self, J: int) -> int:
        """Members per task for a call with J members: the configured size, or auto_batch_size."""
        if self.options.batch_size is not None:
            return self.options.batch_size
        if self.options.timeout is not None:
            return 1  # a timeout fails its whole task: one member per task, so a hang costs only that member
        recent = self.stats.member_seconds
        return auto_batch_size(J, self.slots, statistics.median(recent) if recent else None)

    @property
    def slots(self) -> int:
        """Tasks the pool runs at once: workers x concurrency."""
        return len(self.workers) * self.options.concurrency

    def _worker_started(self, ref) -> int | None:
        """A starting worker answered: its slot index; or it died while starting: start another, return None."""
        w = self._starting.pop(ref)
        try:
            ray.get(ref)
            self._start_failures = 0
            return w
        except WORKER_LOST as e:
            self._start_failures += 1
            if self._start_failures > 3 * len(self.workers):
                raise RuntimeError(f"simulator workers keep dying at start-up: {str(e).splitlines()[0]}") from None
            self._start_worker(w)
            self.stats.workers_replaced += 1
            return None

    def _account(self, ok: np.ndarray) -> None:
        n, failed = ok.size, int((~ok).sum())
        self.stats.evaluations += n
        self.stats.failures += failed
        self._metrics["evaluations"].inc(n)
        if failed:
            self._metrics["failures"].inc(failed)


class _Dispatch:
    """The state of one `evaluate` call: task queue, per-worker in-flight lists, results."""

    def __init__(self, pool: WorkerPool, queue: deque, J: int, dtype, on_result=None,
                 source: RemoteEnsemble | None = None):
        self.pool, self.o, self.queue, self.on_result = pool, pool.options, queue, on_result
        self.source = source  # the rows by reference, when the tasks carry none
        self.psi = np.full((J, pool.obs_size), np.nan, dtype=dtype)
        self.ok = np.zeros(J, dtype=bool)
        self.reasons: list[str | None] = [None] * J
        self.done: set[int] = set()
        self.inflight: dict[ray.ObjectRef, list] = {}  # ref -> [task, worker slot, actor handle, started at]
        self.lanes: dict[int, list[ray.ObjectRef]] = {w: [] for w in range(len(pool.workers))}
        self.ready_workers = {w for w in range(len(pool.workers)) if w not in pool._starting.values()}

    def finish(self, task: _Task, p, o, r) -> None:
        self.done.add(task.id)
        self.psi[task.members], self.ok[task.members] = p, o
        for j, why in zip(task.members, r):
            self.reasons[j] = why
        if self.on_result is not None:
            self.on_result(task.members, self.psi[task.members], self.ok[task.members], list(r))

    def fail(self, task: _Task, why: str) -> None:
        self.finish(task, np.nan, False, [why] * len(task.members))

    def rows_lost(self, task: _Task, why: str) -> None:
        """A task's rows were lost from the object store: the source computes them again (the same values) and the
        task goes back to the queue, counted as an attempt; past max_retries, or without a way to recompute, its
        members fail."""
        task.attempts += 1
        self.pool.stats.redispatched += 1
        if self.running(task):
            return  # a straggler copy may still get its rows
        if task.attempts > self.o.max_retries or not self.source.refresh(task.generation):
            self.fail(task, why)
        else:
            self.queue.appendleft(task)

    def running(self, task: _Task) -> bool:
        return any(v[0].id == task.id for v in self.inflight.values())

    def submit(self, task: _Task, w: int) -> None:
        actor = self.pool.workers[w]
        if task.x is None:
            task.generation = self.source.generation
            ref = actor.evaluate_rows.remote(task.members, *self.source.parts(task.members))
        else:
            ref = actor.evaluate.remote(task.members, task.x)
            DRIVER.sent += nbytes(task.x)
        lane = self.lanes[w]
        # a queued task's clock starts when one of the `concurrency` running ahead of it finishes
        self.inflight[ref] = [task, w, actor, time.monotonic() if len(lane) < self.o.concurrency else float("inf")]
        lane.append(ref)

    def fill(self) -> None:
        """Queue tasks on ready workers round by round: every worker gets one before any gets a second."""
        ready = sorted(self.ready_workers)
        for level in range(1, self.o.depth * self.o.concurrency + 1):
            if not self.queue:  # the loop wakes often with nothing queued: no pass over every level and worker
                return
            for w in ready:
                while self.queue and len(self.lanes[w]) < level:
                    task = self.queue.popleft()
                    if task.id not in self.done:
                        self.submit(task, w)

    def replace(self, w: int, actor, kill: bool) -> None:
        """Restart slot w (once per dead actor); its queued tasks go back to the queue."""
        if self.pool.workers[w] is not actor:
            return
        self.pool._replace(w, kill)
        self.ready_workers.discard(w)
        for ref in self.lanes[w]:
            task = self.inflight.pop(ref)[0]
            if task.id not in self.done and not self.running(task):
                self.queue.appendleft(task)
        self.lanes[w] = []

    def collect(self, ref) -> None:
        task, w, actor, t0 = self.inflight.pop(ref)
        lane = self.lanes[w]
        if ref in lane:
            lane.remove(ref)
        for queued in lane[: self.o.concurrency]:
            if self.inflight[queued][3] == float("inf"):
                self.inflight[queued][3] = time.monotonic()
        try:
            _, p, o, r = ray.get(ref)
            DRIVER.received += nbytes(p, o)
        except WORKER_LOST as e:
            self.replace(w, actor, kill=False)
            if task.id in self.done or self.running(task):
                return  # another copy is still running or already won
            task.attempts += 1
            self.pool.stats.redispatched += 1
            if task.attempts > self.o.max_retries:
                self.fail(task, f"worker lost {task.attempts} times ({type(e).__name__})")
            else:
                self.queue.appendleft(task)
            return
        if task.id in self.done:
            return
        if p is None:  # the worker could not fetch its rows: compute x_hat0 again, run the task again
            self.rows_lost(task, r)
            return
        seconds = time.monotonic() - t0
        self.pool.stats.task_seconds.append(seconds)
        self.pool.stats.member_seconds.append(seconds / len(task.members))
        self.finish(task, p, o, r)
        if task.copies:
            for other, (t2, w2, a2, _) in list(self.inflight.items()):
                if t2.id == task.id:  # the losing straggler copy: stop it by restarting its worker
                    self.replace(w2, a2, kill=True)

    def run(self) -> None:
        waiting_since = time.monotonic()
        while self.queue or self.inflight:
            if self.inflight or self.ready_workers:
                waiting_since = time.monotonic()
            elif time.monotonic() - waiting_since > self.o.start_timeout:
                raise RuntimeError(f"no simulator worker started within {self.o.start_timeout:.0f} s (each asks "
                                   f"{self.o.num_cpus} CPU, {self.o.num_gpus} GPU, {dict(self.o.resources)}; the "
                                   f"cluster has {ray.cluster_resources()})")
            self.fill()
            refs = [*self.inflight, *self.pool._starting]
            ready, rest = ray.wait(refs, num_returns=1, timeout=self.pool.poll)
            if ready and rest:  # take everything else that is already done too
                ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
            for ref in ready:
                if ref in self.pool._starting:
                    w = self.pool._worker_started(ref)
                    if w is not None:
                        self.ready_workers.add(w)
                elif ref in self.inflight:
                    self.collect(ref)
            self.check_time()

    def check_time(self) -> None:
        """Timeouts (fail members, kill and replace the worker) and straggler re-issue; nothing to scan (the
        driver's time per member stays flat at thousands of tasks in flight) when neither is configured."""
        now, o = time.monotonic(), self.o
        if o.timeout is not None:
            for ref, (task, w, actor, t0) in list(self.inflight.items()):
                if ref not in self.inflight or task.id in self.done:
                    continue
                if now - t0 > o.timeout * len(task.members):
                    self.pool.stats.timeouts += 1
                    if not any(v[0].id == task.id for r2, v in self.inflight.items() if r2 != ref):
                        self.fail(task, f"timeout after {o.timeout * len(task.members):.3g} s")
                    self.replace(w, actor, kill=True)  # the stuck worker; its queued tasks go back to the queue
        if not o.straggler_factor or self.queue or len(self.pool.stats.task_seconds) < 3:
            return
        free = [w for w in self.ready_workers for _ in range(o.concurrency - len(self.lanes[w]))]
        median = statistics.median(self.pool.stats.task_seconds)
        for ref, (task, w, actor, t0) in list(self.inflight.items()):
            if free and task.id not in self.done and task.copies == 0 and now - t0 > o.straggler_factor * median:
                task.copies += 1
                self.pool.stats.reissued += 1
                self.submit(task, free.pop())


def answered(refs: list, timeout: float) -> list:
    """The results of the tasks among `refs` that finish within `timeout` seconds (failed ones left out), in order."""
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    out = []
    for r in refs:
        if r in ready:
            try:
                out.append(ray.get(r))
            except ray.exceptions.RayError:
                pass
    return out
