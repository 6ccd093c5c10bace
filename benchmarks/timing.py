"""The benchmarks' stopwatch (each script runs as `python benchmarks/NAME.py`, so this module is on its path)."""

import time


def best_of(fn, repeats: int = 3, device=None) -> float:
    """Seconds of the fastest of `repeats` calls of fn, after one untimed warm-up call; on a CUDA `device` each call
    is timed up to torch.cuda.synchronize()."""
    if device is not None and getattr(device, "type", str(device)) == "cuda":
        import torch

        sync = torch.cuda.synchronize
    else:
        sync = lambda: None  # noqa: E731
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best
