"""Keep freed memory in the process (glibc's malloc), for code whose every operation allocates large temporaries.

glibc serves an allocation above its mmap threshold (128 KiB, growing to at most 32 MiB) with a fresh mmap and
unmaps it on free, and returns the heap's free top to the kernel above its trim threshold. A spectral solver on a
large grid allocates and frees fields of several MiB at every operation, so each one comes back as fresh pages that
the kernel must fault in and zero. Measured (issue 18, `benchmarks/bench_mpi_ns.py`, one rank, float64, quiet
machine): 52.6 -> 29.8 ms a step at 512^2 and 1928 -> 730 ms at 2048^2 with every allocation served from the heap
and the heap never trimmed below 1 GiB. Callers: every CPU solve of the serial solver, every MPI solver rank, and the
learned prior and its training on the CPU (a UNet batch's activations: at B = 256, 64^2, 16 channels, 67 MiB a layer;
`benchmarks/bench_prior_heap.py`). Memory is not lost: freed blocks are reused by the next allocation; the
process keeps its peak resident size (up to `trim_bytes` of it free) instead of returning it to the kernel.

Pure: os and ctypes; imports nothing of the project. A no-op where the C library is not glibc (macOS, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
DEFAULT_TRIM_BYTES = 1 << 30

_applied: int | None = None  # the trim threshold set in this process (None: not yet)


@functools.cache
def _glibc():
    """The C library when it is glibc (looked up once per process), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - present only in glibc
    except (OSError, AttributeError):
        return None
    return libc


def retain_freed_memory(trim_bytes: int = DEFAULT_TRIM_BYTES) -> bool:
    """Serve every allocation from the heap (no mmap) and keep up to trim_bytes of freed heap: True when set.

    Idempotent per process (a later call with another trim_bytes sets that one). The environment variable
    ENKG_RETAIN_FREED_MEMORY=0 turns it off.
    """
    global _applied
    if os.environ.get("ENKG_RETAIN_FREED_MEMORY", "1") == "0":
        return False
    if _applied == trim_bytes:
        return True
    libc = _glibc()
    if libc is None:
        return False
    # M_MMAP_MAX = 0 first: setting a trim threshold alone also freezes the mmap threshold at 128 KiB (slower)
    ok = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, int(trim_bytes)))
    if ok:
        _applied = trim_bytes
    return ok


def retained() -> bool:
    """Whether retain_freed_memory took effect in this process."""
    return _applied is not None
