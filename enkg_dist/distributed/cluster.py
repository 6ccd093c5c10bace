"""Connecting to Ray: an existing cluster (`auto`, HOST:PORT) or an embedded local one bound to loopback."""

from __future__ import annotations

import os

import ray


def connect(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
            dashboard: bool = False, host: str = "127.0.0.1", runtime_env: dict | None = None) -> dict:
    """Join the cluster at `address`, or start a local Ray sized to this machine; returns its resources.
    `runtime_env` (working_dir, py_modules, env_vars, ...) is the job's, for every worker and actor; it applies when
    this call connects (a process already connected keeps its own)."""
    if ray.is_initialized():
        return ray.cluster_resources()
    if address:
        ray.init(address=address, logging_level="warning", log_to_driver=True, runtime_env=runtime_env)
    else:
        # address="local": always a new embedded Ray, never a cluster that happens to run on this machine
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), num_gpus=num_gpus, include_dashboard=dashboard,
                 dashboard_host=host, _node_ip_address=host, logging_level="warning", runtime_env=runtime_env)
    return ray.cluster_resources()


def disconnect() -> None:
    if ray.is_initialized():
        ray.shutdown()
