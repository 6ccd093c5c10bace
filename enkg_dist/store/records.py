"""Member records: each member's forward output (psi), status and failure reason, written as members arrive.

`psi`, `status` and `reason` are chunked in member blocks of B members. The one recorder keeps the blocks of the
(step, correction) being recorded in memory and rewrites a touched block whole (each is one chunk: no
read-modify-write): psi first, then the failure reasons, the status marker last. A crash in between leaves those
members "not done", and they run again. A block that does not decode counts as not done.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import zarr
from zarr.core.sync import sync

from enkg_dist.failure import finite_rows, judged
from enkg_dist.store.layout import FAILED, NOT_RUN, OK, set_all, to_numpy


class MemberRecords:
    """Writes and reads the member records of a store's `psi`, `status` and `reason` arrays."""

    def __init__(self, psi: zarr.Array, status: zarr.Array, reason: zarr.Array, J: int,
                 check_writable: Callable[[int], None], raise_error: Callable[[], None]):
        self._psi, self._status, self._reason, self.J = psi, status, reason, J
        self._check_writable, self._raise_error = check_writable, raise_error
        self._on_disk: set[int] | None = None  # member blocks of the cached (step, k) with a status chunk
        self._lock = threading.Lock()
        self._blocks_of: tuple[int, int] | None = None  # the (step, k) whose member blocks are cached
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def record(self, step: int, k: int, members, psi, ok, reasons=None) -> None:
        """Write several members' outputs of correction k now, one member block at a time, judged by the one rule
        (failure.judged: a member reported ok with a non-finite output is recorded as failed, as the evaluator
        counts it)."""
        self._check_writable(step)
        idx = np.asarray(members, dtype=np.int64).reshape(-1)
        if len(idx) == 0:
            return
        psi = to_numpy(psi, copy=False).reshape(len(idx), -1)
        ok = to_numpy(ok, copy=False).astype(bool).reshape(-1)
        reasons = list(reasons) if reasons is not None else [None] * len(idx)
        if psi.shape[1] != self._psi.shape[-1] or len(ok) != len(idx) or len(reasons) != len(idx):
            raise ValueError(f"run store: {len(idx)} members but psi {psi.shape}, {len(ok)} ok flags and "
                             f"{len(reasons)} reasons (obs size {self._psi.shape[-1]})")
        if idx.min() < 0 or idx.max() >= self.J:
            raise ValueError(f"run store: members outside 0..{self.J - 1}")
        ok, reasons = judged(psi, ok, reasons)
        B = self._status.chunks[2]
        with self._lock:
            blocks = {int(b): np.flatnonzero(idx // B == b) for b in np.unique(idx // B)}
            rows = {b: self._cached_block(step, k, b) for b in blocks}
            for b, sel in blocks.items():
                rows[b][0][idx[sel] - b * B], rows[b][1][idx[sel] - b * B] = psi[sel], np.where(ok[sel], OK, FAILED)
            self._write_blocks(self._psi, step, k, {b: r[0] for b, r in rows.items()})
            failed = {b: [(int(i) - b * B, reasons[n]) for n, i in zip(sel, idx[sel]) if reasons[n]]
                      for b, sel in blocks.items()}
            if any(failed.values()):
                self._write_blocks(self._reason, step, k, {b: self._reason_block(step, k, b, f)
                                                           for b, f in failed.items() if f})
            self._write_blocks(self._status, step, k, {b: r[1] for b, r in rows.items()})

    def _cached_block(self, step: int, k: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(psi rows, status) of member block b of (step, k): kept in memory while (step, k) records, read once."""
        if self._blocks_of != (step, k):
            # one listing instead of a read per block: blocks without a status chunk hold no record (status is
            # written after psi, and a psi without its status marker is not a record)
            self._blocks_of, self._blocks, self._on_disk = (step, k), {}, chunks_on_disk(self._status, step, k)
        if b not in self._blocks:
            P, S = self._psi, self._status
            size = min(S.chunks[2], self.J - b * S.chunks[2])
            empty = (np.full((size, P.shape[-1]), P.fill_value, dtype=P.dtype), np.full(size, NOT_RUN, dtype=np.int8))
            try:
                listed_empty = self._on_disk is not None and b not in self._on_disk
                self._blocks[b] = empty if listed_empty else (P.blocks[step, k, b][0, 0], S.blocks[step, k, b][0, 0])
            except Exception:  # a damaged block was not counted as done on resume: all its members run again
                self._blocks[b] = empty
        return self._blocks[b]

    def _reason_block(self, step: int, k: int, b: int, failed: list[tuple[int, str]]) -> np.ndarray:
        R = self._reason
        try:
            block = R.blocks[step, k, b][0, 0]
        except Exception:
            block = np.full(min(R.chunks[2], self.J - b * R.chunks[2]), "", dtype=object)
        for r, why in failed:
            block[r] = str(why)
        return block

    @staticmethod
    def _write_blocks(arr: zarr.Array, step: int, k: int, blocks: dict[int, np.ndarray]) -> None:
        """Whole member blocks of one array, written concurrently."""
        B = arr.chunks[2]
        set_all([arr.async_array.setitem((step, k, slice(b * B, b * B + len(v))), v) for b, v in blocks.items()])

    def completed(self, step: int, k: int) -> dict[int, tuple[np.ndarray, bool, str | None]]:
        """Members of (step, k) whose psi and status marker were both written and decode: j -> (psi_j, ok, reason)."""
        self._raise_error()
        P, S, R = self._psi, self._status, self._reason
        B, out = S.chunks[2], {}
        for b in range(S.cdata_shape[2]):
            key = (step, k, b)
            try:
                status = S.blocks[key][0, 0]
                if not (status != NOT_RUN).any():
                    continue
                psi = P.blocks[key][0, 0]
                reason = R.blocks[key][0, 0] if (status == FAILED).any() else None
            except Exception:  # a damaged block: its members are run again
                continue
            for r in np.flatnonzero(status != NOT_RUN):
                failed = status[r] == FAILED
                if not failed and not finite_rows(psi[r : r + 1])[0]:
                    continue  # a marker without its output (NaN is the fill value; never written in this order)
                out[b * B + int(r)] = (psi[r], not failed, (str(reason[r]) or None) if failed else None)
        return out


def chunks_on_disk(arr: zarr.Array, step: int, k: int) -> set[int] | None:
    """Member-block indices of (step, k) that have a chunk in `arr` (one directory listing), or None where the
    store cannot list (then every block is read)."""
    sp = arr.store_path
    if not sp.store.supports_listing:
        return None
    prefix = arr.metadata.encode_chunk_key((step, k, 0)).rsplit("/", 1)[0]
    prefix = f"{sp.path}/{prefix}" if sp.path else prefix

    async def names():
        return [name async for name in sp.store.list_dir(prefix)]

    try:
        return {int(n) for n in sync(names()) if n.isdigit()}
    except (OSError, ValueError, NotImplementedError):
        return None
