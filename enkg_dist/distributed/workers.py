"""Simulator worker actors: each builds its forward model once and evaluates batches of members."""

from __future__ import annotations

import os

import numpy as np
import ray
import torch

from enkg_dist import threads
from enkg_dist.distributed.ensemble import gather
from enkg_dist.problems.base import ForwardModel, safe_evaluate


def build_forward(spec) -> ForwardModel:
    """A ForwardModel, or a zero-argument factory that builds one (for models holding unpicklable resources)."""
    return spec if isinstance(spec, ForwardModel) else spec()


def assigned_cpus() -> float:
    """The CPUs Ray assigned to this actor (0 for an actor that reserved none)."""
    return float(ray.get_runtime_context().get_assigned_resources().get("CPU", 0))


class SimulatorWorker:
    """Holds one forward model; `evaluate(members, x)` returns (members, psi, ok, reasons) as numpy arrays."""

    def __init__(self, spec, num_threads: int | None = None):
        # the thread budget first (before the model, and a user's plug-in module, load their libraries): the CPUs
        # Ray assigned this worker (execution.worker_cpus), or execution.threads
        self.threads = threads.set_threads(num_threads or threads.for_cpus(assigned_cpus()))
        self.G = build_forward(spec)
        if ray.get_gpu_ids():  # Ray set CUDA_VISIBLE_DEVICES to this worker's GPUs: cuda:0 is the first of them
            self.G = self.G.for_device(torch.device("cuda"))

    def thread_counts(self) -> dict:
        """The threads this worker runs (threads.in_use: torch's and the native pools'), asked from inside it."""
        return threads.in_use()

    def device(self) -> str:
        """Where this worker's forward model computes (for checks and logs)."""
        G = self.G
        while hasattr(G, "inner"):  # wrappers such as the chaos model
            G = G.inner
        return str(getattr(G, "device", None) or "cpu")

    def pid(self) -> int:
        return os.getpid()

    def evaluate(self, members: list[int], x: np.ndarray):
        """G on each row; an exception fails only the members that raise."""
        res = safe_evaluate(self.G, torch.from_numpy(np.array(x)), members)  # copy: object-store arrays are read-only
        return members, res.psi.numpy(), res.ok.numpy(), list(res.reasons)

    def evaluate_rows(self, members: list[int], refs: list, picks: list[tuple[int, int]]):
        """`evaluate` on rows this worker fetches itself from shard objects (ensemble.RemoteEnsemble.parts). When a
        shard cannot be had (lost with its node, not rebuilt) it returns no outputs and the reason, for the driver
        to compute the shards again."""
        try:
            arrays = ray.get(refs)
        except ray.exceptions.RayError as e:  # ObjectLostError and its kin, or the prior's own failure
            return members, None, None, f"x_hat0 lost ({type(e).__name__})"
        return self.evaluate(members, gather(arrays, picks))


RemoteSimulatorWorker = ray.remote(SimulatorWorker)
