"""The store's layout on disk: its arrays, how a store is created so that a kill cannot leave a half-made one, the
recovery copy of its root metadata, and the readers that need no RunStore (marker, probe, xarray).

Creation. The whole layout (root group, arrays, the `reference` group, the recovery copy) is built where no reader
takes it for a store, then made to appear at once: on a local disk under a temporary sibling name
(`store.zarr.creating-PID-HEX`) renamed to its final name (one atomic rename); elsewhere (an fsspec URL, where a
rename is a copy) the root's `format_version`, the creation marker, is written last. A store that lacks it is
half-created: it never committed a step, and a run starts it afresh (`probe` says "half-created").

Root metadata. The root group's attributes (the config, the shape of the run, the commit marker) are needed by every
reader. A copy lives in the group `recovery/` (written at creation, and before the root's marker at each commit, so
it is never behind it; both follow the step's chunks, so either may be trusted). A root `zarr.json` that is missing
or does not parse is rebuilt from that copy by a writable open (`probe` says "root-damaged"); the arrays' chunks,
which hold every committed step, are untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.sync import sync

FORMAT_VERSION = 1
NOT_RUN, OK, FAILED = 0, 1, 2
TIMING_FIELDS = ("total", "denoise", "forward", "update", "store")
RECOVERY = "recovery"  # the group holding the copy of the root attributes
REFERENCE = "reference"  # truth, observation, exact-posterior mean/variance: what a report compares with
ARRAYS = ("particles", "mean", "std", "psi", "status", "reason", "misfit", "weight", "sigma", "timings",
          "resume/particles", "resume/step")
MARKER_KEYS = ("committed_step", "resume_slot", "ensemble_step", "recorded_step", "committed_at")
_CREATING = ".creating-"
_KEYS = {"name": "default", "separator": "/"}
_CODECS = [ZstdCodec(level=1), Crc32cCodec()]
_CHECKSUM_ONLY = [Crc32cCodec()]
_CHUNK_BYTES = 4 * 2**20
_RECORD_BYTES = 256 * 2**10  # psi rows of one member block
_WRITE_ALL = {"write_empty_chunks": True}  # a NaN row of psi must still leave a chunk behind


class StoreError(RuntimeError):
    """A run store cannot do what was asked."""


class StoreIntegrityError(StoreError):
    """A chunk a resume needs is missing or does not decode."""

    def __init__(self, message: str, array: str, step: int):
        super().__init__(message)
        self.array, self.step = array, step


class WriterError(StoreError):
    """The background writer failed; the store stays committed up to the step before the failure."""


def is_kept(step: int, full_every: int, num_steps: int) -> bool:
    """Whether `particles` keeps this step's full ensemble: every `full_every`-th step and the last (the one rule)."""
    return (step + 1) % full_every == 0 or step == num_steps - 1


# ---- small helpers shared by the store's modules


def versions() -> dict:
    def version(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "torch": version("torch"), "numpy": np.__version__,
            "zarr": zarr.__version__, "enkg_dist": version("enkg-dist")}


def to_numpy(a, copy: bool = True) -> np.ndarray:
    """A numpy array (a private copy unless copy=False) of an array or a (possibly GPU) tensor."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.array(a, copy=True) if copy else np.asarray(a)


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if "checksum do not match" in text:
        return "CRC32C checksum mismatch"
    return f"{type(e).__name__}: {text[:200]}"


def as_json(obj, what: str = "config"):
    """obj as it reads back from JSON attributes (tuples become lists), or a clear error."""
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError) as e:
        raise StoreError(f"run store: {what} is not JSON-serialisable ({e})") from None


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def join(prefix: str, key: str) -> str:
    return f"{prefix}/{key}" if prefix else key


def chunk_key(arr: zarr.Array, index: tuple) -> str:
    """The store key of one chunk of `arr` (relative to the store's root)."""
    return join(arr.store_path.path, arr.metadata.encode_chunk_key(tuple(int(i) for i in index)))


def chunk_exists(arr: zarr.Array, index: tuple) -> bool:
    return bool(sync(arr.store_path.store.exists(chunk_key(arr, index))))


def set_all(jobs) -> None:
    """Run Zarr async writes concurrently and wait for all of them."""

    async def gather():
        await asyncio.gather(*jobs)

    sync(gather())


# ---- creation


def local_path(path) -> Path | None:
    """The local directory of a plain path or file:// URL; None for other fsspec URLs."""
    text = str(path)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    return None if "://" in text else Path(text)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def leftovers(path) -> list[Path]:
    """Half-made stores a killed creation left beside `path` (their creating process is gone)."""
    p = local_path(path)
    if p is None or not p.parent.is_dir():
        return []
    out = []
    for q in p.parent.glob(p.name + _CREATING + "*"):
        try:
            pid = int(q.name[len(p.name + _CREATING):].split("-")[0])
        except ValueError:
            continue
        if not _alive(pid) or pid == os.getpid():
            out.append(q)
    return out


def create_layout(path, attrs: dict, build: Callable[[zarr.Group], None], storage_options: dict | None = None,
                  hook: Callable[[str], None] | None = None) -> None:
    """Create the store at `path`: root attributes `attrs`, arrays made by `build(root)`, the recovery copy, and
    only then the store's appearance (rename, or `format_version` last). `hook(point)` is called between the
    stages (tests kill the process there)."""
    hook = hook or (lambda point: None)
    final = dict(attrs)
    first = {k: v for k, v in final.items() if k != "format_version"}
    first["creating"] = True
    target = local_path(path)
    if target is not None:
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()  # an empty directory made for the store: the rename puts the store there
        if target.exists():
            raise StoreError(f"run store {path}: a store already exists there; resume it or choose another "
                             "directory")
        for q in leftovers(path):
            shutil.rmtree(q, ignore_errors=True)
        work = target.with_name(f"{target.name}{_CREATING}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        where = str(work)
    else:
        where = str(path)
    try:
        root = zarr.open_group(where, mode="w-", attributes=first, storage_options=storage_options)
    except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError):
        raise StoreError(f"run store {path}: a store already exists there; resume it or choose another "
                         "directory") from None
    try:
        hook("root")
        build(root)
        hook("arrays")
        root.create_group(RECOVERY, attributes={**final, "creating": False})
        hook("recovery")
        del final["format_version"]
        root.update_attributes({**final, "creating": False, "format_version": FORMAT_VERSION})
        hook("marker")
        if target is not None:
            os.rename(work, target)
            hook("renamed")
    except BaseException:
        if target is not None:  # nothing of it was visible yet
            shutil.rmtree(work, ignore_errors=True)
        raise


def make_arrays(root: zarr.Group, J, state_shape, state_dims, obs_size, N, K, F, dtype) -> None:
    def new(name, shape, chunks, dims, dt=dtype, fill=np.nan, codecs=_CODECS, group=root):
        group.create_array(name, shape=shape, chunks=chunks, dtype=dt, fill_value=fill, compressors=codecs,
                           dimension_names=dims, chunk_key_encoding=_KEYS, config=_WRITE_ALL)

    member_bytes = int(np.prod(state_shape)) * np.dtype(dtype).itemsize
    block = (1, min(J, max(1, _CHUNK_BYTES // member_bytes)), *state_shape)
    new("particles", (N, J, *state_shape), block, ("step", "member", *state_dims), codecs=_CHECKSUM_ONLY)
    new("mean", (N, *state_shape), (1, *state_shape), ("step", *state_dims))
    new("std", (N, *state_shape), (1, *state_shape), ("step", *state_dims))
    B = min(J, max(1, _RECORD_BYTES // (obs_size * np.dtype(dtype).itemsize)))
    new("psi", (N, K, J, obs_size), (1, 1, B, obs_size), ("step", "correction", "member", "obs"),
        codecs=_CHECKSUM_ONLY)
    new("status", (N, K, J), (1, 1, B), ("step", "correction", "member"), dt="int8", fill=NOT_RUN)
    new("reason", (N, K, J), (1, 1, B), ("step", "correction", "member"), dt=str, fill="")
    new("misfit", (N, K), (1, K), ("step", "correction"), dt="float64")
    new("weight", (N, K), (1, K), ("step", "correction"), dt="float64")
    new("sigma", (N,), (1,), ("step",), dt="float64")
    new("timings", (N, F), (1, F), ("step", "timing"), dt="float64")
    resume = root.create_group("resume")
    new("particles", (2, J, *state_shape), block, ("slot", "member", *state_dims), codecs=_CHECKSUM_ONLY,
        group=resume)
    new("step", (2,), (1,), ("slot",), dt="int64", fill=-1, group=resume)


def write_reference(root: zarr.Group, reference: Mapping[str, np.ndarray | None], attrs: dict | None = None) -> None:
    """The fields a report compares with (truth, observation, posterior_mean, posterior_var), each one chunk."""
    group = root.create_group(REFERENCE, attributes=as_json(attrs or {}, "reference attributes"))
    for name, value in reference.items():
        if value is None:
            continue
        a = np.asarray(to_numpy(value), dtype=np.float64)
        arr = group.create_array(name, shape=a.shape, chunks=a.shape or None, dtype="float64", fill_value=np.nan,
                                 compressors=_CODECS, chunk_key_encoding=_KEYS, config=_WRITE_ALL)
        arr[...] = a


# ---- reading the root metadata, and rebuilding it


def _group_attrs(path, storage_options: dict | None, sub: str = "") -> dict | None:
    """Attributes of the group `sub` of the store at `path`; None when it is missing or unreadable."""
    try:
        group = zarr.open_group(path, mode="r", storage_options=storage_options, path=sub or None)
        return dict(group.attrs)
    except Exception:  # noqa: BLE001 - missing, truncated, not JSON, not a group: all mean "not readable"
        return None


def probe(path, storage_options: dict | None = None) -> str:
    """What is at `path`: "absent", "store" (a complete store), "half-created" (a creation that never finished:
    nothing committed), "root-damaged" (root metadata missing or unreadable, its recovery copy intact: a writable
    open rebuilds it) or "damaged" (something that is neither, e.g. root metadata and its copy both lost)."""
    root = _group_attrs(path, storage_options)
    if root is not None and "format_version" in root:
        return "store"
    if root is not None and root.get("creating"):
        return "half-created"
    copy = _group_attrs(path, storage_options, RECOVERY)
    if copy is not None and "format_version" in copy:
        return "root-damaged"
    p = local_path(path)
    if p is not None:
        if not p.exists():
            return "half-created" if leftovers(path) else "absent"
        if p.is_dir() and not any(p.iterdir()):
            return "absent"
    elif root is None and copy is None:
        with contextlib.suppress(Exception):
            import fsspec

            fs, _, (where,) = fsspec.get_fs_token_paths(str(path), storage_options=storage_options)
            if not fs.exists(where):
                return "absent"
    return "damaged"


def discard_half_created(path, storage_options: dict | None = None) -> None:
    """Remove a half-created store (never anything committed: probe said "half-created")."""
    for q in leftovers(path):
        shutil.rmtree(q, ignore_errors=True)
    p = local_path(path)
    if p is not None:
        if p.exists():
            shutil.rmtree(p)
        return
    import fsspec

    fs, _, (where,) = fsspec.get_fs_token_paths(str(path), storage_options=storage_options)
    if fs.exists(where):
        fs.rm(where, recursive=True)


def root_attrs(path, storage_options: dict | None = None) -> dict:
    """The root attributes of the store at `path`, or of its recovery copy when the root is unreadable; {} when
    there is neither."""
    root = _group_attrs(path, storage_options)
    if root is not None and "format_version" in root:
        return root
    copy = _group_attrs(path, storage_options, RECOVERY)
    return copy if copy is not None and "format_version" in copy else (root or {})


def rebuild_root(path, storage_options: dict | None = None) -> dict:
    """Write the root group's metadata again from the recovery copy; returns the attributes written."""
    copy = _group_attrs(path, storage_options, RECOVERY)
    if copy is None or "format_version" not in copy:
        raise StoreError(f"run store {path}: root metadata (zarr.json) is missing or unreadable and so is its "
                         f"recovery copy ({RECOVERY}/zarr.json); the chunks are intact but the run cannot be resumed")
    from zarr.core.buffer import default_buffer_prototype

    meta = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": copy}).encode()
    recovery = zarr.open_group(path, mode="r+", path=RECOVERY, storage_options=storage_options)
    sync(recovery.store_path.store.set("zarr.json", default_buffer_prototype().buffer.from_bytes(meta)))
    return copy


def store_exists(path, storage_options: dict | None = None) -> bool:
    """Whether a run store (complete, or with a rebuildable root) is at `path` (a directory or fsspec URL)."""
    return probe(path, storage_options) in ("store", "root-damaged")


def committed_step_of(path, storage_options: dict | None = None) -> int:
    """The commit marker of the store at `path`, read without opening its arrays (-1 when nothing is committed)."""
    return int(root_attrs(path, storage_options).get("committed_step", -1))


def open_xarray(path, storage_options: dict | None = None, committed_only: bool = True):
    """The store as a lazy, dask-backed xarray Dataset over the committed steps (particles: NaN on unkept steps)."""
    import xarray as xr

    a = root_attrs(path, storage_options)
    if "format_version" not in a:
        raise StoreError(f"run store {path}: no store there")
    chunks = {"step": 1, "correction": -1, "member": -1}  # one dask task per step, not per member chunk
    try:
        ds = xr.open_zarr(path, consolidated=False, zarr_format=3, mask_and_scale=False, chunks=chunks,
                          storage_options=storage_options)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError, KeyError) as e:
        raise StoreError(f"run store {path}: cannot be read ({one_line(e)}); if its root metadata is damaged, "
                         "`enkg-dist resume` rebuilds it") from None
    n = a["committed_step"] + 1 if committed_only else a["num_steps"]
    ds = ds.isel(step=slice(0, n))
    kept = np.array([is_kept(s, a["full_every"], a["num_steps"]) for s in range(n)], dtype=bool)
    return ds.assign_coords(step=np.arange(n), timing=list(a["timing_fields"]), kept=("step", kept))


def read_reference(path, storage_options: dict | None = None) -> dict:
    """The reference fields stored at run time ({} for a store made before they were stored)."""
    try:
        group = zarr.open_group(path, mode="r", storage_options=storage_options, path=REFERENCE)
    except Exception:  # noqa: BLE001 - an older store: no reference group
        return {}
    out = {}
    for name in ("truth", "observation", "posterior_mean", "posterior_var"):
        if name in group:
            try:
                out[name] = np.asarray(group[name][...])
            except Exception as e:  # noqa: BLE001 - damaged: reported, the rest of the report goes on
                out.setdefault("damage", []).append(f"{REFERENCE}/{name}: {one_line(e)}")
    image = dict(group.attrs).get("observation_image_shape")
    if image and "observation" in out and int(np.prod(image)) == out["observation"].size:
        out["observation_image"] = out["observation"].reshape(image)
    return out


def state_dims_for(shape: Sequence[int]) -> tuple[str, ...]:
    if len(shape) == 2:
        return ("y", "x")
    return tuple(f"s{i}" for i in range(len(shape)))
