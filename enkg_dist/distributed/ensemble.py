"""An ensemble whose rows stay in Ray's object store: x_hat0 as the prior actors left it, for simulator workers to
fetch by reference, so it never travels through the driver (which needs only the forward outputs).

`RemoteEnsemble` stands where the sampler would hold the (J, *state) tensor: it has its shape and dtype, and indexing
it by members gives a view (the evaluator picks the members still to run on a resume). Its rows live in shards of
consecutive members, one object per prior actor. Should a shard be lost (its node died and Ray could not rebuild
it), `refresh` computes the shards again: the prior's map is deterministic per member, so the values are the same.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import ray
import torch

Shards = list[tuple[ray.ObjectRef, int, int]]  # (object holding members [start, stop), start, stop), in order


class _Source:
    """The shards, shared by an ensemble and its views (a refresh reaches all of them)."""

    def __init__(self, shards: Shards, recompute: Callable[[], Shards] | None):
        self.shards, self.recompute = shards, recompute
        self.generation = 0  # refreshes so far


class RemoteEnsemble:
    """J members' rows held in the object store; `shape` and `dtype` are those of the tensor it stands for."""

    def __init__(self, shards: Shards, shape, dtype, recompute: Callable[[], Shards] | None = None,
                 rows: np.ndarray | None = None, source: _Source | None = None):
        self._source = source or _Source(shards, recompute)
        self._full = tuple(int(s) for s in shape)
        self.np_dtype = np.dtype(dtype)
        self.rows = np.arange(self._full[0]) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self._full[1:]))

    @property
    def dtype(self) -> torch.dtype:
        return torch.from_numpy(np.empty(0, dtype=self.np_dtype)).dtype

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx) -> RemoteEnsemble:
        """The members at positions `idx` (an index array or a slice), still by reference."""
        return RemoteEnsemble([], self._full, self.np_dtype, rows=self.rows[idx], source=self._source)

    def parts(self, positions) -> tuple[list[ray.ObjectRef], list[tuple[int, int]]]:
        """What a worker needs for the members at `positions`: the shard objects holding them, and per member
        (index into those objects, row in that shard), in order."""
        shards = self._source.shards
        members = self.rows[np.asarray(positions, dtype=np.int64)]
        which = np.searchsorted(np.array([s for _, s, _ in shards]), members, side="right") - 1
        used = list(dict.fromkeys(int(w) for w in which))
        slot = {w: n for n, w in enumerate(used)}
        return [shards[w][0] for w in used], [(slot[int(w)], int(m - shards[w][1])) for w, m in zip(which, members)]

    @property
    def generation(self) -> int:
        """How many times the shards were computed again: a lost task's rows are refreshed once, not per task."""
        return self._source.generation

    def refresh(self, generation: int | None = None) -> bool:
        """Compute the shards again (a shard was lost), unless that already happened since `generation`; False when
        this ensemble cannot."""
        src = self._source
        if src.recompute is None:
            return False
        if generation is None or generation == src.generation:
            src.shards, src.generation = src.recompute(), src.generation + 1
        return True

    def fetch(self) -> torch.Tensor:
        """The rows as a tensor on the driver (for a caller that needs the values)."""
        whole = np.concatenate(ray.get([ref for ref, _, _ in self._source.shards]))
        return torch.from_numpy(whole[self.rows])


def gather(arrays, picks) -> np.ndarray:
    """A worker's rows from the shard arrays it fetched: (index into arrays, row) per member, stacked in order."""
    return np.stack([arrays[i][r] for i, r in picks])
