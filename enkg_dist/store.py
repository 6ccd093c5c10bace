"""Crash-safe Zarr v3 run store: config, per-step ensembles, per-member forward outputs and status, commit marker.

Layout of one store (a Zarr group; every array has `dimension_names`):

    particles (step, member, *state)        ensembles of the kept steps (every `full_every`-th and the last)
    mean, std (step, *state)                every committed step
    psi (step, correction, member, obs)     forward outputs, written per member as they arrive
    status, reason (step, correction, member)   0 not run / 1 ok / 2 failed, and the failure reason
    misfit, weight (step, correction); sigma (step,); timings (step, timing)
    resume/particles (slot, member, *state), resume/step (slot,)   two alternating slots for the latest ensemble

Chunking: a step's data never share a chunk with another step's, so writing step t cannot damage a committed step.
`particles` (and the resume slots) are chunked (1, Jc, *state) with Jc members making about 4 MiB: the writer puts
a step in a few large files, a reader gets one member by decoding one 4 MiB chunk, one step by reading J/Jc files.
(Measured here: a shard per step with one inner chunk per member writes 3-5x slower than plain 4 MiB chunks, and
zstd does not shrink float ensembles (6 %) but halves the write rate, so particles carry only a checksum.)
`psi`, `status` and `reason` have one chunk per member, so concurrent writers (driver threads, worker processes)
never share a chunk. Small per-step arrays have one chunk per step. Every chunk carries a CRC32C checksum, so a
flipped byte fails to decode.

Step axis: its length `num_steps` is fixed at creation. Unwritten chunks cost nothing, and no array metadata is
rewritten while a run goes on (appending would rewrite each array's zarr.json every step: one more mutable file a
crash can leave ahead of the commit marker, and a race for concurrent writers).

Commit protocol: `commit_step` queues the step; a background writer writes all of its chunks, then the commit
marker `committed_step` (root attributes, one atomic file) last. Readers and resumes trust only steps <= the marker.
With `full_every > 1`, the ensemble of a step that is not kept goes to the resume slot the marker does not point
at; `resume/step[slot]` is set to -1 before and to the step after that write, so a slot is trusted for step s
only when its stamp says s. LocalStore writes each file atomically but never fsyncs: this survives a killed
process (SIGKILL, OOM, preemption), not the loss of the machine holding the disk before the page cache is flushed.
"""

from __future__ import annotations

import asyncio
import atexit
import importlib.metadata
import itertools
import json
import math
import platform
import queue
import threading
import warnings
import weakref
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.sync import sync

FORMAT_VERSION = 1
NOT_RUN, OK, FAILED = 0, 1, 2
TIMING_FIELDS = ("total", "denoise", "forward", "update", "store")
# Keys that do not change the result: naming, where output goes, and how the work is spread over machines.
DEFAULT_IGNORE = (
    "name", "output_dir", "device",
    "execution.backend", "execution.address", "execution.num_workers", "execution.worker_cpus",
    "execution.worker_gpus", "execution.worker_resources", "execution.batch_size", "execution.prior_actors",
    "execution.prior_gpus", "execution.num_cpus", "execution.dashboard", "store.max_pending",
)
_KEYS = {"name": "default", "separator": "/"}
_CODECS = [ZstdCodec(level=1), Crc32cCodec()]
_CHECKSUM_ONLY = [Crc32cCodec()]
_CHUNK_BYTES = 4 * 2**20
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


def _versions() -> dict:
    def version(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "torch": version("torch"), "numpy": np.__version__,
            "zarr": zarr.__version__, "enkg_dist": version("enkg-dist")}


def _to_numpy(a, copy: bool = True) -> np.ndarray:
    """A numpy array (a private copy unless copy=False) of an array or a (possibly GPU) tensor."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.array(a, copy=True) if copy else np.asarray(a)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if "checksum do not match" in text:
        return "CRC32C checksum mismatch"
    return f"{type(e).__name__}: {text[:200]}"


def _flatten(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _json(obj):
    """obj as it reads back from JSON attributes (tuples become lists), or a clear error."""
    try:
        return json.loads(json.dumps(obj))
    except TypeError as e:
        raise StoreError(f"run store: config is not JSON-serialisable ({e})") from None


class RunStore:
    """A run's Zarr store: create or open, record member outputs, commit steps in the background, resume."""

    def __init__(self, root: zarr.Group, path: str, mode: str, max_pending: int = 2):
        self._root, self.path, self.mode = root, path, mode
        self._a = {name: root[name] for name in ("particles", "mean", "std", "psi", "status", "reason", "misfit",
                                                  "weight", "sigma", "timings", "resume/particles", "resume/step")}
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, max_pending))
        self._thread: threading.Thread | None = None
        self._error: WriterError | None = None
        self._closed = False
        self._intact: int | None = None
        self.damage: str | None = None  # the integrity problem found on open, if any
        self._marker = self._read_marker()
        self._next_step = self._marker["committed_step"] + 1

    # ---- creating and opening

    @classmethod
    def create(cls, path, *, config: dict, config_yaml: str, J: int, state_shape: Sequence[int], obs_size: int,
               num_steps: int, num_corrections: int, dtype: str = "float64", full_every: int = 1,
               meta: dict | None = None, timing_fields: Sequence[str] = TIMING_FIELDS,
               state_dims: Sequence[str] | None = None, max_pending: int = 2,
               storage_options: dict | None = None) -> RunStore:
        """A new store at `path` (directory or fsspec URL); refuses to overwrite an existing store."""
        state_shape = tuple(int(n) for n in state_shape)
        if state_dims is None:
            state_dims = ("y", "x") if len(state_shape) == 2 else tuple(f"s{i}" for i in range(len(state_shape)))
        if J < 1 or num_steps < 1 or num_corrections < 0 or full_every < 1 or len(state_dims) != len(state_shape):
            raise ValueError("run store: need J >= 1, num_steps >= 1, num_corrections >= 0, full_every >= 1 and "
                             "one name per state dimension")
        attrs = {"format_version": FORMAT_VERSION, "config": _json(config), "config_yaml": config_yaml,
                 "versions": _versions(), "meta": _json(meta or {}), "created": _now(),
                 "J": int(J), "state_shape": list(state_shape), "obs_size": int(obs_size),
                 "num_steps": int(num_steps), "num_corrections": int(num_corrections), "full_every": int(full_every),
                 "timing_fields": list(timing_fields), "committed_step": -1, "resume_slot": None}
        try:
            root = zarr.open_group(path, mode="w-", attributes=attrs, storage_options=storage_options)
        except FileExistsError:
            raise StoreError(f"run store {path}: a store already exists there; resume it or choose another "
                             "directory") from None
        _create_arrays(root, J, state_shape, tuple(state_dims), obs_size, num_steps, max(num_corrections, 1),
                       len(timing_fields), dtype)
        return cls(root, str(path), "a", max_pending)

    @classmethod
    def open(cls, path, mode: str = "r", *, verify: bool = True, on_damage: str = "raise", max_pending: int = 2,
             storage_options: dict | None = None) -> RunStore:
        """Open a store; with `verify`, check that the last committed step's resume data are present and decode.

        on_damage="raise" raises StoreIntegrityError naming the array and step; "fallback" warns, and in mode "a"
        moves the commit marker back to `last_intact_step()` so that the run resumes from there.
        """
        if mode not in ("r", "a") or on_damage not in ("raise", "fallback"):
            raise ValueError("mode must be 'r' or 'a', on_damage 'raise' or 'fallback'")
        try:
            root = zarr.open_group(path, mode="r" if mode == "r" else "r+", storage_options=storage_options)
        except FileNotFoundError:
            raise StoreError(f"run store {path}: no store there") from None
        version = root.attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreError(f"run store {path}: format_version {version!r}, this code reads {FORMAT_VERSION}")
        try:
            store = cls(root, str(path), mode, max_pending)
        except KeyError as e:
            raise StoreError(f"run store {path}: array {e} is missing") from None
        if verify:
            store._verify(on_damage)
        return store

    def _verify(self, on_damage: str) -> None:
        t = self.committed_step
        problem = self.check_step(t) if t >= 0 else None
        if problem is None:
            self._intact = t
            return
        self.damage = problem[0]
        if on_damage == "raise":
            raise StoreIntegrityError(*problem)
        s = self.last_intact_step()
        warnings.warn(f"{problem[0]}; falling back to step {s}", stacklevel=3)
        if self.mode == "a":
            self._rollback(s)

    def _rollback(self, step: int) -> None:
        """Move the commit marker back to `step` and forget resume slots of later (abandoned) steps."""
        stamps = self._a["resume/step"]
        for slot in (0, 1):
            try:
                if stamps[slot] > step:
                    stamps[slot] = -1
            except Exception:  # a damaged stamp: the slot is untrusted anyway
                stamps[slot] = -1
        self._write_marker(step, self._slot_of(step))
        self._next_step = step + 1

    # ---- properties

    @property
    def attrs(self) -> dict:
        return self._root.attrs.asdict()

    @property
    def config(self) -> dict:
        return self._root.attrs["config"]

    @property
    def committed_step(self) -> int:
        """The last step whose commit marker was written (-1: none)."""
        return self._marker["committed_step"]

    @property
    def J(self) -> int:
        return self._root.attrs["J"]

    @property
    def num_steps(self) -> int:
        return self._root.attrs["num_steps"]

    @property
    def num_corrections(self) -> int:
        return self._root.attrs["num_corrections"]

    @property
    def state_shape(self) -> tuple:
        return tuple(self._root.attrs["state_shape"])

    @property
    def full_every(self) -> int:
        return self._root.attrs["full_every"]

    @property
    def timing_fields(self) -> list[str]:
        return self._root.attrs["timing_fields"]

    def is_kept(self, step: int) -> bool:
        """Whether `particles` keeps this step's full ensemble (retention policy)."""
        return (step + 1) % self.full_every == 0 or step == self.num_steps - 1

    def kept_steps(self) -> list[int]:
        return [s for s in range(self.num_steps) if self.is_kept(s)]

    def array(self, name: str) -> zarr.Array:
        """The raw Zarr array (all steps, committed or not: prefer `read`)."""
        return self._a[name]

    def refresh(self) -> int:
        """Re-read the commit marker (a reader following a live run); returns committed_step."""
        self._root = zarr.open_group(self._root.store_path, mode="r" if self.mode == "r" else "r+")
        self._marker = self._read_marker()
        return self.committed_step

    # ---- per-member recording

    def record_member(self, step: int, k: int, j: int, psi_j, ok: bool, reason: str | None = None) -> None:
        """Write member j's forward output of correction k now: psi first, the status marker last."""
        self._check_writable(step)
        self._a["psi"][step, k, j] = _to_numpy(psi_j)
        if reason:
            self._a["reason"][step, k, j] = str(reason)
        self._a["status"][step, k, j] = OK if ok else FAILED

    def record_members(self, step: int, k: int, members, psi, ok, reasons=None) -> None:
        """Write several members' outputs now, in bulk (one zarr call per array): all psi first, the status last."""
        self._check_writable(step)
        idx = np.asarray(members, dtype=np.int64).reshape(-1)
        psi, ok = _to_numpy(psi), _to_numpy(ok).astype(bool).reshape(-1)
        if len(idx) == 0:
            return
        self._a["psi"].set_orthogonal_selection((step, k, idx), psi)
        bad = [(int(j), str(r)) for j, r in zip(idx, reasons or [None] * len(idx)) if r]
        if bad:
            self._a["reason"].set_orthogonal_selection((step, k, np.array([j for j, _ in bad])),
                                                       np.array([r for _, r in bad], dtype=object))
        self._a["status"].set_orthogonal_selection((step, k, idx), np.where(ok, OK, FAILED).astype(np.int8))

    def record_correction(self, step: int, k: int, psi, ok, reasons: Mapping[int, str] | None = None) -> None:
        """Queue all J outputs of correction k for the background writer (psi of all members before any status)."""
        self._check_writable(step)
        psi, ok = _to_numpy(psi), _to_numpy(ok).astype(bool).reshape(-1)
        if psi.shape != (self.J, self._a["psi"].shape[-1]) or ok.shape != (self.J,):
            raise ValueError(f"run store: psi {psi.shape} / ok {ok.shape} do not match "
                             f"({self.J}, {self._a['psi'].shape[-1]}) / ({self.J},)")
        self._submit(step, lambda: self._write_correction(step, k, psi, ok, dict(reasons or {})))

    def _write_correction(self, step, k, psi, ok, reasons) -> None:
        self._a["psi"][step, k] = psi
        for j, why in reasons.items():
            self._a["reason"][step, k, j] = str(why)
        self._a["status"][step, k] = np.where(ok, OK, FAILED).astype(np.int8)

    def completed_members(self, step: int, k: int) -> dict[int, tuple[np.ndarray, bool, str | None]]:
        """Members of (step, k) whose psi and status marker were both written and decode: j -> (psi_j, ok, reason)."""
        self._raise_writer_error()
        done = self._listed(self._a["status"], step, k) & self._listed(self._a["psi"], step, k)
        if not done:
            return {}
        status = self._rows(self._a["status"], step, k, done)
        psi = self._rows(self._a["psi"], step, k, {j for j in done if status.get(j, NOT_RUN) != NOT_RUN})
        out = {}
        for j in sorted(psi):
            failed = status[j] == FAILED
            reason = (str(self._a["reason"][step, k, j]) or None) if failed else None
            out[j] = (psi[j], not failed, reason)
        return out

    def _listed(self, arr: zarr.Array, step: int, k: int) -> set[int]:
        """Members with a chunk key under (step, k), found through the store API (missing chunks read as fill)."""
        prefix = _join(arr.store_path.path, f"c/{step}/{k}/")

        async def keys():
            return [key async for key in arr.store_path.store.list_prefix(prefix)]

        members = (key[len(prefix):].split("/")[0] for key in sync(keys()))
        return {int(m) for m in members if m.isdigit()}  # skips a killed write's leftover `*.partial` file

    @staticmethod
    def _rows(arr: zarr.Array, step: int, k: int, members: set[int]) -> dict:
        """Rows (step, k, j) for j in members; a row that fails to decode is left out."""
        idx = sorted(members)
        try:
            block = arr.get_orthogonal_selection((step, k, idx))
            return dict(zip(idx, block))
        except Exception:
            out = {}
            for j in idx:
                try:
                    out[j] = arr[step, k, j]
                except Exception:
                    pass
            return out

    # ---- committing

    def commit_step(self, step: int, particles, info: Mapping | None = None, copy: bool = True) -> None:
        """Queue step `step` (the ensemble after it, plus sigma/misfit/weight/timings in `info`) for writing.

        Returns once queued (blocks while `max_pending` steps already wait); the background writer writes the
        step's arrays and then the commit marker. A writer error is raised by the next call. `copy=False` skips
        the private copy of a CPU array the caller will not modify in place (a fresh tensor each step).
        """
        self._check_writable(step)
        if step != self._next_step:
            raise ValueError(f"run store: commit_step({step}) but the next step to commit is {self._next_step}")
        x = _to_numpy(particles, copy)
        if x.shape != (self.J, *self.state_shape):
            raise ValueError(f"run store: particles have shape {x.shape}, expected {(self.J, *self.state_shape)}")
        row = self._info_row(info or {})
        self._submit(step, lambda: self._write_commit(step, x, row))
        self._next_step = step + 1

    def _info_row(self, info: Mapping) -> dict:
        unknown = set(info) - {"sigma", "misfit", "weight", "timings"}
        bad_timings = set(info.get("timings", {})) - set(self.timing_fields)
        if unknown or bad_timings:
            raise ValueError(f"run store: unknown info keys {sorted(unknown | bad_timings)}")
        K = self._a["misfit"].shape[1]
        row = {"sigma": float(info.get("sigma", math.nan))}
        for name in ("misfit", "weight"):
            values = np.asarray(info.get(name, []), dtype=np.float64).reshape(-1)
            if values.size > K:
                raise ValueError(f"run store: {values.size} values of {name}, at most {K} corrections")
            row[name] = np.concatenate([values, np.full(K - values.size, np.nan)])
        times = info.get("timings", {})
        row["timings"] = np.array([float(times.get(f, math.nan)) for f in self.timing_fields])
        return row

    def _write_commit(self, step: int, x: np.ndarray, row: dict) -> None:
        """Writer thread: every array of the step, then the commit marker last."""
        slot = self._write_arrays(step, x, row)
        self._write_marker(step, slot)

    def _write_arrays(self, step: int, x: np.ndarray, row: dict) -> int | None:
        """Every array of the step, written concurrently; returns the resume slot used (None: kept in particles)."""
        std = x.std(0, ddof=1, dtype=np.float64) if len(x) > 1 else np.zeros(x.shape[1:])
        writes = {"mean": x.mean(0, dtype=np.float64), "std": std, **row}
        if self.is_kept(step):
            self._write_all(step, {**writes, "particles": x})
            return None
        slot = self._free_slot()
        self._a["resume/step"][slot] = -1  # the slot is untrusted until its data are complete
        self._write_all(step, writes, slot, x)
        self._a["resume/step"][slot] = step
        return slot

    def _write_all(self, step: int, writes: dict, slot: int | None = None, x: np.ndarray | None = None) -> None:
        jobs = [self._a[name].async_array.setitem(step, value) for name, value in writes.items()]
        if slot is not None:
            jobs.append(self._a["resume/particles"].async_array.setitem(slot, x))

        async def gather():
            await asyncio.gather(*jobs)

        sync(gather())

    def _free_slot(self) -> int:
        """The resume slot the marker does not point at (the older one when it points at neither)."""
        current = self._marker["resume_slot"]
        if current is not None:
            return 1 - current
        stamps = self._a["resume/step"][:]
        return int(np.argmin(stamps))

    def _write_marker(self, step: int, slot: int | None) -> None:
        marker = {"committed_step": int(step), "resume_slot": slot, "committed_at": _now()}
        self._root.update_attributes(marker)
        self._marker = marker

    def _read_marker(self) -> dict:
        a = self._root.attrs
        return {"committed_step": int(a["committed_step"]), "resume_slot": a.get("resume_slot")}

    # ---- the background writer

    def _submit(self, step: int, job) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"run-store-writer {self.path}", daemon=True)
            self._thread.start()
            _OPEN_STORES.add(self)
        self._queue.put((step, job))
        self._raise_writer_error()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                step, job = item
                if self._error is None:  # after a failure, drain without writing: no later step may commit
                    try:
                        job()
                    except BaseException as e:
                        self._error = WriterError(f"run store {self.path}: writing step {step} failed "
                                                  f"({_one_line(e)}); committed up to step {self.committed_step}")
                        self._error.__cause__ = e
            finally:
                self._queue.task_done()

    def _raise_writer_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _check_writable(self, step: int) -> None:
        self._raise_writer_error()
        if self.mode != "a" or self._closed:
            raise StoreError(f"run store {self.path}: not open for writing")
        if not 0 <= step < self.num_steps:
            raise ValueError(f"run store: step {step} outside 0..{self.num_steps - 1}")
        if step < self._next_step:
            raise ValueError(f"run store: step {step} is already committed (or queued for commit)")

    def flush(self) -> None:
        """Wait until every queued write (and commit marker) is on the store; raise a writer error if any."""
        if self._thread is not None:
            self._queue.join()
        self._raise_writer_error()

    def close(self) -> None:
        """Flush and stop the writer thread."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join()
                _OPEN_STORES.discard(self)

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- integrity and resume

    def _source(self, step: int) -> tuple[str, int] | None:
        """Where step's full ensemble lives: ("particles", step) or ("resume/particles", slot), or None."""
        if self.is_kept(step):
            return "particles", step
        for slot in (0, 1):
            try:
                if self._a["resume/step"][slot] == step:
                    return "resume/particles", slot
            except Exception:  # a damaged stamp: that slot is untrusted
                pass
        return None

    def _slot_of(self, step: int) -> int | None:
        src = self._source(step) if step >= 0 else None
        return src[1] if src and src[0] == "resume/particles" else None

    def check_step(self, step: int) -> tuple[str, str, int] | None:
        """None when what a resume from `step` needs is present and decodes, else (message, array, step)."""
        src = self._source(step)
        if src is None:
            return (f"run store {self.path}: array 'resume/particles' step {step}: no slot holds this step's "
                    "ensemble", "resume/particles", step)
        for name, index in (src, ("mean", step), ("std", step)):
            arr = self._a[name]
            where = f"run store {self.path}: array '{name}' step {step}"
            for rest in itertools.product(*(range(n) for n in arr.cdata_shape[1:])):
                key = _join(arr.store_path.path, arr.metadata.encode_chunk_key((index, *rest)))
                if not sync(arr.store_path.store.exists(key)):  # a missing chunk would read as fill_value
                    return f"{where}: chunk '{key}' is missing", name, step
                try:
                    arr.blocks[(index, *rest)]
                except Exception as e:
                    return f"{where}: chunk '{key}' does not decode ({_one_line(e)})", name, step
        return None

    def last_intact_step(self) -> int:
        """The newest committed step whose resume data are intact (-1 when none is)."""
        if self._intact is None:
            t = self.committed_step
            candidates = [s for s in range(t, -1, -1) if self._source(s) is not None]
            self._intact = next((s for s in candidates if self.check_step(s) is None), -1)
        return self._intact

    def resume_state(self) -> tuple[int, np.ndarray | None]:
        """(step, particles after it) for the last intact committed step, or (-1, None)."""
        s = self.last_intact_step()
        if s < 0:
            return -1, None
        name, index = self._source(s)
        return s, self._a[name][index]

    def read(self, name: str, step: int | None = None) -> np.ndarray:
        """Committed data of an array: one step, or steps 0..committed_step when step is None."""
        t = self.committed_step
        if step is None:
            return self._a[name][: t + 1]
        if not 0 <= step <= t:
            raise ValueError(f"run store: step {step} is not committed (committed_step = {t})")
        return self._a[name][step]

    def config_diff(self, new_config: Mapping, ignore: Sequence[str] = DEFAULT_IGNORE) -> list[str]:
        """Dotted keys whose values differ between `new_config` and the stored config, apart from `ignore`."""
        old, new = _flatten(self.config), _flatten(_json(dict(new_config)))
        skip = tuple(ignore)

        def ignored(key):
            return any(key == i or key.startswith(i + ".") for i in skip)

        return sorted(k for k in old.keys() | new.keys() if not ignored(k) and old.get(k, _MISSING) !=
                      new.get(k, _MISSING))


_MISSING = object()
_OPEN_STORES: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    """Let queued steps reach the store when the program ends without close() (the writer is a daemon)."""
    for store in list(_OPEN_STORES):
        try:
            store.close()
        except Exception as e:  # noqa: BLE001 - reported, never raised at exit
            warnings.warn(str(e), stacklevel=1)


def store_exists(path, storage_options: dict | None = None) -> bool:
    """Whether a run store (a Zarr group with the store's attributes) is at `path` (a directory or fsspec URL)."""
    try:
        root = zarr.open_group(path, mode="r", storage_options=storage_options)
    except (FileNotFoundError, KeyError, ValueError, OSError, zarr.errors.GroupNotFoundError):
        return False
    return "format_version" in root.attrs


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}/{key}" if prefix else key


def _create_arrays(root, J, state_shape, state_dims, obs_size, N, K, F, dtype) -> None:
    def new(name, shape, chunks, dims, dt=dtype, fill=np.nan, codecs=_CODECS, group=root):
        group.create_array(name, shape=shape, chunks=chunks, dtype=dt, fill_value=fill, compressors=codecs,
                           dimension_names=dims, chunk_key_encoding=_KEYS, config=_WRITE_ALL)

    member_bytes = int(np.prod(state_shape)) * np.dtype(dtype).itemsize
    block = (1, min(J, max(1, _CHUNK_BYTES // member_bytes)), *state_shape)
    new("particles", (N, J, *state_shape), block, ("step", "member", *state_dims), codecs=_CHECKSUM_ONLY)
    new("mean", (N, *state_shape), (1, *state_shape), ("step", *state_dims))
    new("std", (N, *state_shape), (1, *state_shape), ("step", *state_dims))
    new("psi", (N, K, J, obs_size), (1, 1, 1, obs_size), ("step", "correction", "member", "obs"))
    new("status", (N, K, J), (1, 1, 1), ("step", "correction", "member"), dt="int8", fill=NOT_RUN)
    new("reason", (N, K, J), (1, 1, 1), ("step", "correction", "member"), dt=str, fill="")
    new("misfit", (N, K), (1, K), ("step", "correction"), dt="float64")
    new("weight", (N, K), (1, K), ("step", "correction"), dt="float64")
    new("sigma", (N,), (1,), ("step",), dt="float64")
    new("timings", (N, F), (1, F), ("step", "timing"), dt="float64")
    resume = root.create_group("resume")
    new("particles", (2, J, *state_shape), block, ("slot", "member", *state_dims), codecs=_CHECKSUM_ONLY,
        group=resume)
    new("step", (2,), (1,), ("slot",), dt="int64", fill=-1, group=resume)


def open_xarray(path, storage_options: dict | None = None, committed_only: bool = True):
    """The store as a lazy, dask-backed xarray Dataset over the committed steps (particles: NaN on unkept steps)."""
    import xarray as xr

    root = zarr.open_group(path, mode="r", storage_options=storage_options)
    a = root.attrs
    chunks = {"step": 1, "correction": -1, "member": -1}  # one dask task per step, not per member chunk
    ds = xr.open_zarr(path, consolidated=False, zarr_format=3, mask_and_scale=False, chunks=chunks,
                      storage_options=storage_options)
    n = a["committed_step"] + 1 if committed_only else a["num_steps"]
    ds = ds.isel(step=slice(0, n))
    full_every, N = a["full_every"], a["num_steps"]
    kept = np.array([(s + 1) % full_every == 0 or s == N - 1 for s in range(n)])
    return ds.assign_coords(step=np.arange(n), timing=list(a["timing_fields"]), kept=("step", kept))
