"""RunStore: create or open a run's store, commit steps (commit marker last), check integrity, roll back, resume.

Commit protocol: `commit_step` queues the step; the background writer writes all of its chunks, then the commit
marker, first in the recovery copy, then in the root attributes (one atomic file: `committed_step`, `ensemble_step`,
`resume_slot`, `recorded_step`) last. Readers and resumes trust only steps <= `committed_step`. The ensemble
of a kept step goes to `particles`; with `full_every > 1`, that of every `checkpoint_every`-th other step goes to
the resume slot the marker does not point at; `resume/step[slot]` is set to -1 before and to the step after that
write, so a slot is trusted for step s only when its stamp says s. Other steps write no ensemble (mean, std and the
member records only): opening the store for a resume moves the marker back to `ensemble_step`, and the runner
replays the steps since from the recorded forward outputs (`records_until`), with no simulator run and the same
result bit for bit. LocalStore writes each file atomically but never fsyncs: this survives a killed process
(SIGKILL, OOM, preemption), not the loss of the machine holding the disk before the page cache is flushed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import zarr

from enkg_dist.store import layout as L
from enkg_dist.store.records import MemberRecords
from enkg_dist.store.resume import ResumePoints
from enkg_dist.store.writer import BackgroundWriter

CREATE_HOOK: Callable[[str], None] | None = None  # tests: called at each stage of a creation (to kill it there)


class RunStore(ResumePoints):
    """A run's Zarr store: create or open, record member outputs, commit steps in the background, resume."""

    def __init__(self, path: str, mode: str, attrs: dict, arrays: dict[str, zarr.Array], root: zarr.Group | None,
                 max_pending: int = 2, defer_writes: bool = False, checkpoint_every: int = 1, fresh: bool = False,
                 storage_options: dict | None = None):
        if checkpoint_every < 1:
            raise ValueError("run store: checkpoint_every must be >= 1")
        self.path, self.mode, self._attrs, self._a, self._root = path, mode, attrs, arrays, root
        self._storage_options = storage_options
        self._writer = BackgroundWriter(f"run-store-writer {path}", max_pending, defer_writes, self._writer_error)
        self._records = MemberRecords(arrays["psi"], arrays["status"], arrays["reason"], self.J,
                                      self._check_writable, self._writer.raise_error)
        self._intact: int | None = None
        self._recovery: zarr.Group | None = None
        self.damage: str | None = None  # the integrity problem found on open, if any
        self._marker = self._read_marker()
        self._next_step = self._marker["committed_step"] + 1
        self.checkpoint_every = checkpoint_every
        # steps up to here may hold member records of an earlier process: a resume replays them from the records
        # (a store just created holds none; one killed before its first commit may hold step 0's)
        self.records_until = -1 if fresh else min(self._marker["recorded_step"] + 1, self.num_steps - 1)

    # ---- creating and opening

    @classmethod
    def create(cls, path, *, config: dict, config_yaml: str, J: int, state_shape: Sequence[int], obs_size: int,
               num_steps: int, num_corrections: int, dtype: str = "float64", full_every: int = 1,
               meta: dict | None = None, timing_fields: Sequence[str] = L.TIMING_FIELDS,
               state_dims: Sequence[str] | None = None, max_pending: int = 2, defer_writes: bool = False,
               checkpoint_every: int = 1, storage_options: dict | None = None,
               reference: Mapping[str, np.ndarray | None] | None = None,
               reference_attrs: dict | None = None) -> RunStore:
        """A new store at `path` (directory or fsspec URL); refuses to overwrite an existing store. It appears
        whole or not at all (see layout.create_layout). `reference`: truth, observation, posterior_mean,
        posterior_var (each optional) for reports."""
        state_shape = tuple(int(n) for n in state_shape)
        state_dims = tuple(state_dims) if state_dims is not None else L.state_dims_for(state_shape)
        if J < 1 or num_steps < 1 or num_corrections < 0 or full_every < 1 or len(state_dims) != len(state_shape):
            raise ValueError("run store: need J >= 1, num_steps >= 1, num_corrections >= 0, full_every >= 1 and "
                             "one name per state dimension")
        attrs = {"format_version": L.FORMAT_VERSION, "config": L.as_json(config), "config_yaml": config_yaml,
                 "versions": L.versions(), "meta": L.as_json(meta or {}, "meta"), "created": L.now(),
                 "J": int(J), "state_shape": list(state_shape), "obs_size": int(obs_size),
                 "num_steps": int(num_steps), "num_corrections": int(num_corrections), "full_every": int(full_every),
                 "timing_fields": list(timing_fields), "committed_step": -1, "resume_slot": None, "ensemble_step": -1,
                 "recorded_step": -1}
        hook = CREATE_HOOK or (lambda point: None)

        def build(root):
            L.make_arrays(root, J, state_shape, state_dims, obs_size, num_steps, max(num_corrections, 1),
                          len(timing_fields), dtype)
            hook("arrays-made")
            if reference:
                L.write_reference(root, reference, reference_attrs)

        L.create_layout(path, attrs, build, storage_options, hook)
        return cls._open(path, "a", max_pending, defer_writes, checkpoint_every, storage_options, fresh=True)

    @classmethod
    def open(cls, path, mode: str = "r", *, verify: bool = True, on_damage: str = "raise", max_pending: int = 2,
             defer_writes: bool = False, checkpoint_every: int = 1, storage_options: dict | None = None) -> RunStore:
        """Open a store; with `verify`, check that the last committed step's resume data are present and decode.

        on_damage="raise" raises StoreIntegrityError naming the array and step; "fallback" warns, and in mode "a"
        moves the commit marker back to `last_intact_step()` so that the run resumes from there. A root zarr.json
        that is missing or unreadable is rebuilt from the recovery copy in mode "a" (read from it in mode "r").
        """
        if mode not in ("r", "a") or on_damage not in ("raise", "fallback"):
            raise ValueError("mode must be 'r' or 'a', on_damage 'raise' or 'fallback'")
        store = cls._open(path, mode, max_pending, defer_writes, checkpoint_every, storage_options)
        if verify:
            store._verify(on_damage)
        return store

    @classmethod
    def _open(cls, path, mode, max_pending, defer_writes, checkpoint_every, storage_options, fresh=False):
        state = L.probe(path, storage_options)
        if state == "absent":
            raise L.StoreError(f"run store {path}: no store there")
        if state == "half-created":
            raise L.StoreError(f"run store {path}: its creation was interrupted (nothing was committed); "
                               "`enkg-dist resume` or `run --run-dir` starts the run afresh")
        if state == "damaged":
            raise L.StoreError(f"run store {path}: root metadata (zarr.json) is missing or unreadable and so is its "
                               f"recovery copy ({L.RECOVERY}/zarr.json); the chunks may be intact, but the run "
                               "cannot be resumed from this store")
        root = None
        if state == "root-damaged":
            if mode == "a":
                attrs = L.rebuild_root(path, storage_options)
                warnings.warn(f"run store {path}: root metadata (zarr.json) was missing or unreadable; rebuilt "
                              f"from its recovery copy (committed step {attrs.get('committed_step')})", stacklevel=3)
            else:
                attrs = L.root_attrs(path, storage_options)
        if state == "store" or mode == "a":
            root = zarr.open_group(path, mode="r" if mode == "r" else "r+", storage_options=storage_options)
            attrs = root.attrs.asdict()
            if mode == "a" and L.RECOVERY not in root and attrs.get("format_version") == L.FORMAT_VERSION:
                root.create_group(L.RECOVERY, attributes=attrs)  # a store made before the recovery copy existed
        version = attrs.get("format_version")
        if version != L.FORMAT_VERSION:
            raise L.StoreError(f"run store {path}: format_version {version!r}, this code reads {L.FORMAT_VERSION}")
        zmode = "r" if mode == "r" else "r+"
        try:
            if root is not None:
                arrays = {name: root[name] for name in L.ARRAYS}
            else:
                arrays = {name: zarr.open_array(path, path=name, mode=zmode, storage_options=storage_options)
                          for name in L.ARRAYS}
            # an all-NaN row (no correction ran, a failed block) still leaves its chunk: missing means damage
            arrays = {name: a.with_config(L._WRITE_ALL) for name, a in arrays.items()}
        except (KeyError, FileNotFoundError, zarr.errors.ArrayNotFoundError, zarr.errors.NodeTypeValidationError,
                ValueError) as e:
            missing = str(e).split(":")[0] if isinstance(e, KeyError) else L.one_line(e)
            raise L.StoreError(f"run store {path}: array {missing} is missing or unreadable") from None
        return cls(str(path), mode, attrs, arrays, root, max_pending, defer_writes, checkpoint_every, fresh,
                   storage_options)

    # ---- properties

    @property
    def attrs(self) -> dict:
        return dict(self._attrs)

    @property
    def config(self) -> dict:
        return self._attrs["config"]

    @property
    def committed_step(self) -> int:
        """The last step whose commit marker was written (-1: none)."""
        return self._marker["committed_step"]

    @property
    def J(self) -> int:
        return self._attrs["J"]

    @property
    def num_steps(self) -> int:
        return self._attrs["num_steps"]

    @property
    def num_corrections(self) -> int:
        return self._attrs["num_corrections"]

    @property
    def state_shape(self) -> tuple:
        return tuple(self._attrs["state_shape"])

    @property
    def full_every(self) -> int:
        return self._attrs["full_every"]

    @property
    def timing_fields(self) -> list[str]:
        return self._attrs["timing_fields"]

    def is_kept(self, step: int) -> bool:
        """Whether `particles` keeps this step's full ensemble (retention policy)."""
        return L.is_kept(step, self.full_every, self.num_steps)

    def is_checkpoint(self, step: int) -> bool:
        """Whether committing this step writes its full ensemble (kept, or a resume slot every checkpoint_every)."""
        return self.is_kept(step) or (step + 1) % self.checkpoint_every == 0

    def array(self, name: str) -> zarr.Array:
        """The raw Zarr array (all steps, committed or not: prefer `read`)."""
        return self._a[name]

    # ---- member records

    def record_members(self, step: int, k: int, members, psi, ok, reasons=None) -> None:
        """Write several members' outputs of correction k now (see store.records)."""
        self._records.record(step, k, members, psi, ok, reasons)

    def completed_members(self, step: int, k: int) -> dict[int, tuple[np.ndarray, bool, str | None]]:
        """Members of (step, k) whose psi and status marker were both written and decode: j -> (psi_j, ok, reason)."""
        return self._records.completed(step, k)

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
        x = L.to_numpy(particles, copy)
        if x.shape != (self.J, *self.state_shape):
            raise ValueError(f"run store: particles have shape {x.shape}, expected {(self.J, *self.state_shape)}")
        row = self._info_row(info or {})
        self._writer.submit(step, lambda: self._write_marker(step, *self._write_arrays(step, x, row)))
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

    def _write_arrays(self, step: int, x: np.ndarray, row: dict) -> tuple[int | None, int]:
        """Writer thread: every array of the step, written concurrently; returns (resume slot, step) of the
        newest ensemble."""
        mean, std = mean_std(x)
        writes = {"mean": mean, "std": std, **row}
        if self.is_kept(step):
            self._write_all(step, {**writes, "particles": x})
            return None, step
        if not self.is_checkpoint(step):
            self._write_all(step, writes)
            return self._marker["resume_slot"], self._marker["ensemble_step"]
        slot = self._free_slot()
        self._a["resume/step"][slot] = -1  # the slot is untrusted until its data are complete
        self._write_all(step, writes, slot, x)
        self._a["resume/step"][slot] = step
        return slot, step

    def _write_all(self, step: int, writes: dict, slot: int | None = None, x: np.ndarray | None = None) -> None:
        jobs = [self._a[name].async_array.setitem(step, value) for name, value in writes.items()]
        if slot is not None:
            jobs.append(self._a["resume/particles"].async_array.setitem(slot, x))
        L.set_all(jobs)

    def _free_slot(self) -> int:
        """The resume slot the marker does not point at (the older one when it points at neither)."""
        current = self._marker["resume_slot"]
        if current is not None:
            return 1 - current
        return int(np.argmin(self._a["resume/step"][:]))

    def _write_marker(self, step: int, slot: int | None, ensemble_step: int) -> None:
        """The commit marker in the recovery copy, then in the root attributes (one atomic file each): the copy is never
        behind the root, so rebuilding a lost root loses no committed step (both follow the step's chunks)."""
        recorded = max(int(step), self._marker["recorded_step"], self._marker["committed_step"])
        marker = {"committed_step": int(step), "resume_slot": slot, "ensemble_step": int(ensemble_step),
                  "recorded_step": recorded, "committed_at": L.now()}
        local = L.local_path(self.path)
        if local is not None and not (local / "zarr.json").exists() and not (local / L.RECOVERY / "zarr.json").exists():
            raise L.StoreError(f"run store {self.path} vanished during the run (its metadata files are gone)")
        if self._recovery is None:
            self._recovery = self._root[L.RECOVERY]
        self._recovery.update_attributes(marker)
        self._root.update_attributes(marker)
        self._marker = marker
        self._attrs.update(marker)

    def _read_marker(self) -> dict:
        a = self._attrs
        t = int(a["committed_step"])
        return {"committed_step": t, "resume_slot": a.get("resume_slot"), "ensemble_step": a.get("ensemble_step", t),
                "recorded_step": a.get("recorded_step", t)}

    # ---- the background writer

    def _writer_error(self, step: int, e: BaseException) -> L.WriterError:
        return L.WriterError(f"run store {self.path}: writing step {step} failed ({L.one_line(e)}); committed up "
                             f"to step {self.committed_step}")

    def write_window(self):
        """While inside, a deferred store writes its queued steps (wrap the forward evaluations in it)."""
        return self._writer.window()

    def _check_writable(self, step: int) -> None:
        self._writer.raise_error()
        if self.mode != "a" or self._writer.closed:
            raise L.StoreError(f"run store {self.path}: not open for writing")
        if not 0 <= step < self.num_steps:
            raise ValueError(f"run store: step {step} outside 0..{self.num_steps - 1}")
        if step < self._next_step:
            raise ValueError(f"run store: step {step} is already committed (or queued for commit)")

    def flush(self) -> None:
        """Wait until every queued write (and commit marker) is on the store; raise a writer error if any."""
        self._writer.flush()

    def close(self) -> None:
        """Flush and stop the writer thread."""
        self._writer.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, name: str, step: int | None = None) -> np.ndarray:
        """Committed data of an array: one step, or steps 0..committed_step when step is None."""
        t = self.committed_step
        if step is None:
            return self._a[name][: t + 1]
        if not 0 <= step <= t:
            raise ValueError(f"run store: step {step} is not committed (committed_step = {t})")
        return self._a[name][step]

def mean_std(x: np.ndarray, block: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Ensemble mean and unbiased spread over axis 0, summed in blocks of `block` members in x's dtype and
    accumulated in float64 (4x faster than float64 throughout; relative error ~1e-7 for float32 ensembles)."""
    J = len(x)
    total = np.zeros(x.shape[1:])
    for i in range(0, J, block):
        total += np.add.reduce(x[i:i + block], 0)
    mean = total / J
    if J == 1:
        return mean, np.zeros_like(mean)
    centre, squares = mean.astype(x.dtype), np.zeros_like(mean)
    for i in range(0, J, block):
        d = x[i:i + block] - centre
        squares += np.add.reduce(d * d, 0)
    squares -= J * (mean - centre) ** 2  # sum (x - mean)^2 from sum (x - centre)^2
    return mean, np.sqrt(np.maximum(squares, 0.0) / (J - 1))
