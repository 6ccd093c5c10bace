"""Ray metrics (exported to the Ray dashboard / Prometheus): forward evaluations, failures, step time."""

from __future__ import annotations

from functools import lru_cache

from ray.util import metrics


@lru_cache(maxsize=1)
def pool_metrics() -> dict:
    """Process-wide metric objects (created once)."""
    return {
        "evaluations": metrics.Counter("enkg_forward_evaluations", description="forward model evaluations"),
        "failures": metrics.Counter("enkg_forward_failures", description="failed forward evaluations"),
        "step_seconds": metrics.Histogram("enkg_step_seconds", description="wall time of one EnKG step",
                                          boundaries=[0.1, 0.5, 1, 5, 10, 60, 300, 1800]),
        "step": metrics.Gauge("enkg_step", description="index of the last finished EnKG step"),
    }
