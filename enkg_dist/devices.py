"""Where tensors live: device names resolved in one place, and the settings that make a device's results repeatable.

What is bit-identical across what (README, "Reproducibility"):
- across simulator workers, prior actors and in-process vs Ray, on the same hardware: members are sharded and the
  prior is batched by global member index (`member_chunks`), never by how many processes share the work;
- across a resume on the same hardware kind: every random draw comes from a per-member counter-based stream;
- NOT across hardware kinds (CPU vs CUDA, or two GPU models): kernels differ at round-off. A resume on another kind
  is accepted with a warning (`hardware_kind`, recorded with the run).
"""

from __future__ import annotations

import os

import torch

# The driver's `device: auto` means the GPU only once tests/gpu has passed on a real GPU (scripts/gpu_check.sh).
# Until then, auto puts the driver's particles on the CPU; the prior and the simulators may still use GPUs.
DRIVER_AUTO_USES_GPU = False


def resolve_device(name: str | torch.device) -> torch.device:
    """'auto' -> cuda when available, else cpu; ValueError when cuda is asked for and there is none."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("'cuda' was asked but no CUDA device is available")
    return device


def driver_device(name: str) -> torch.device:
    """The driver's device for `device: NAME`: 'auto' is the CPU until the GPU suite has passed (see above)."""
    if name == "auto" and not DRIVER_AUTO_USES_GPU:
        return torch.device("cpu")
    return resolve_device(name)


def actor_device(name: str, has_gpu: bool) -> torch.device:
    """The device of a Ray actor that was (or was not) given a GPU: 'auto' follows the grant, 'cuda' needs one."""
    if name == "auto":
        return torch.device("cuda" if has_gpu else "cpu")
    if name == "cuda" and not has_gpu:
        raise ValueError("device 'cuda' was asked but this actor was given no GPU")
    return torch.device(name)


def repeatable(device: torch.device, training: bool = False) -> None:
    """No TF32, cuDNN's deterministic algorithms and no autotuning; with `training`, deterministic kernels only
    (CUDA's backward scatter-adds otherwise differ run to run)."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    if training:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def hardware_kind(device: torch.device) -> str:
    """'cpu', or 'cuda:<GPU model>': results are bit-identical only within one kind."""
    if device.type != "cuda":
        return "cpu"
    return f"cuda:{torch.cuda.get_device_name(device)}"


def member_chunks(J: int, max_batch: int | None, parts: int) -> list[list[tuple[int, int]]]:
    """Split members 0..J-1 into chunks [s, e) of `max_batch` by global index and deal whole chunks to `parts`
    contiguous shards, so that a member's batch never depends on how many shards there are. Without a max_batch the
    whole ensemble is one batch (one shard does all the work: batched FFTs differ from split ones at round-off)."""
    size = max_batch or max(J, 1)
    chunks = [(s, min(s + size, J)) for s in range(0, J, size)]
    per, extra = divmod(len(chunks), parts)
    out, at = [], 0
    for p in range(parts):
        n = per + (1 if p < extra else 0)
        out.append(chunks[at : at + n])
        at += n
    return out
