"""Whole-store verification: every chunk a committed step owns is decoded (its CRC32C checked); a bad one is named
by array, step and file (`enkg-dist inspect --verify`, and the report on the arrays it draws)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import zarr
from zarr.core.sync import sync

from enkg_dist.store import layout as L

STEP_ARRAYS = ("mean", "std")  # a chunk for every committed step (sigma, misfit, weight and timings of older stores
# left out all-NaN rows: for them a missing chunk reads as what was written)
RECORD_ARRAYS = ("psi", "status", "reason")


@dataclass(frozen=True)
class BadChunk:
    """One chunk that is missing or does not decode."""

    array: str
    step: int | None  # the run's step (for resume slots: the step the slot holds); None when unknown
    file: str  # the chunk's file (or key under an fsspec URL)
    problem: str

    def line(self) -> str:
        where = f"step {self.step}" if self.step is not None else "no step"
        return f"array '{self.array}' {where}: {self.file}: {self.problem}"


def _keys(arr: zarr.Array) -> set[str]:
    """The chunk keys present on the store for `arr`."""
    prefix = L.join(arr.store_path.path, "c/")

    async def collect():
        return {k async for k in arr.store_path.store.list_prefix(prefix)}

    return {k for k in sync(collect()) if not k.endswith(".partial")}


def _file(path, key: str) -> str:
    local = L.local_path(path)
    return str(local / key) if local is not None else f"{str(path).rstrip('/')}/{key}"


def _open_array(path, name: str, storage_options) -> zarr.Array | None:
    try:
        return zarr.open_array(path, path=name, mode="r", storage_options=storage_options)
    except Exception:  # noqa: BLE001 - reported by the caller as a missing array
        return None


def verify_store(path, arrays: Iterable[str] | None = None, storage_options: dict | None = None,
                 steps: int | None = None) -> list[BadChunk]:
    """Bad chunks of the committed steps (all arrays, or `arrays`): missing where a committed step must have one,
    or present but not decoding. `steps`: check steps 0..steps-1 (default: the committed ones)."""
    a = L.root_attrs(path, storage_options)
    if "format_version" not in a:
        raise L.StoreError(f"run store {path}: no store there")
    n = int(a["committed_step"]) + 1 if steps is None else int(steps)
    names = tuple(arrays) if arrays is not None else (*L.ARRAYS, *(f"{L.REFERENCE}/{r}" for r in
                                                                   ("truth", "observation", "posterior_mean",
                                                                    "posterior_var")))
    bad: list[BadChunk] = []
    misfit = _open_array(path, "misfit", storage_options)
    for name in names:
        arr = _open_array(path, name, storage_options)
        if arr is None:
            if not name.startswith(L.REFERENCE):
                bad.append(BadChunk(name, None, _file(path, L.join(name, "zarr.json")), "array metadata missing "
                                    "or unreadable"))
            continue
        present = _keys(arr)
        wanted = _wanted(name, arr, n, a, misfit, present)
        for index, step in wanted:
            key = L.chunk_key(arr, index)
            if key not in present:
                bad.append(BadChunk(name, step, _file(path, key), "missing"))
                continue
            try:
                arr.blocks[index]
            except Exception as e:  # noqa: BLE001 - any decode failure is damage
                bad.append(BadChunk(name, step, _file(path, key), f"does not decode ({L.one_line(e)})"))
    return bad


def _wanted(name, arr, n, attrs, misfit, present) -> list[tuple[tuple, int | None]]:
    """(chunk index, step) of the chunks to check: required ones, and the present ones of committed steps."""
    rest = [tuple(r) for r in np.ndindex(*arr.cdata_shape[1:])] if arr.ndim > 1 else [()]
    if name.startswith(L.REFERENCE):
        return [(tuple(i), None) for i in np.ndindex(*arr.cdata_shape)]
    if name == "resume/step":
        return [((s,), None) for s in range(2) if L.chunk_key(arr, (s,)) in present]
    if name == "resume/particles":
        stamps = _stamps(arr)
        return [((slot, *r), int(stamps[slot])) for slot in range(2) if 0 <= stamps[slot] < n for r in rest]
    out = []
    for s in range(min(n, arr.shape[0])):
        required = name in STEP_ARRAYS or (name == "particles" and L.is_kept(s, attrs["full_every"],
                                                                          attrs["num_steps"]))
        ran = _corrections_run(misfit, s) if name in ("psi", "status") else set()
        for r in rest:
            if required or (name in ("psi", "status") and r[0] in ran) or L.chunk_key(arr, (s, *r)) in present:
                out.append(((s, *r), s))
    return out


def _stamps(resume_particles: zarr.Array) -> np.ndarray:
    try:
        group = zarr.open_group(resume_particles.store_path.store, mode="r", path="resume")
        return np.asarray(group["step"][:])
    except Exception:  # noqa: BLE001 - unreadable stamps: no slot is trusted
        return np.array([-1, -1])


def _corrections_run(misfit: zarr.Array | None, step: int) -> set[int]:
    """Corrections of a committed step that ran (their misfit is recorded): their member blocks must exist."""
    if misfit is None:
        return set()
    try:
        return {int(k) for k in np.flatnonzero(np.isfinite(np.asarray(misfit[step])))}
    except Exception:  # noqa: BLE001 - the misfit chunk's own damage is reported under 'misfit'
        return set()
