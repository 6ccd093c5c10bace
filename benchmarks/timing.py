"""The benchmarks' stopwatch (each script runs as `python benchmarks/NAME.py`, so this module is on its path)."""

import time


def best_of(fn, repeats: int = 3) -> float:
    """Seconds of the fastest of `repeats` calls of fn, after one untimed warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best
