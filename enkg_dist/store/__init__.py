"""Crash-safe Zarr v3 run store: config, per-step ensembles, per-member forward outputs and status, commit marker.

Layout of one store (a Zarr group; every array has `dimension_names`):

    particles (step, member, *state)        ensembles of the kept steps (every `full_every`-th and the last)
    mean, std (step, *state)                every committed step
    psi (step, correction, member, obs)     forward outputs, written per member block as they arrive
    status, reason (step, correction, member)   0 not run / 1 ok / 2 failed, and the failure reason
    misfit, weight (step, correction); sigma (step,); timings (step, timing)
    resume/particles (slot, member, *state), resume/step (slot,)   two alternating slots for the latest ensemble
    reference/truth, observation, posterior_mean, posterior_var    what a report compares with (when known)
    recovery/   a copy of the root attributes (config, shape, commit marker)

Chunking: a step's data never share a chunk with another step's, so writing step t cannot damage a committed step.
`particles` (and the resume slots) are chunked (1, Jc, *state) with Jc members making about 4 MiB: the writer puts
a step in a few large files, a reader gets one member by decoding one 4 MiB chunk, one step by reading J/Jc files.
(Measured here: a shard per step with one inner chunk per member writes 3-5x slower than plain 4 MiB chunks, and
zstd does not shrink float ensembles (6 %) but halves the write rate, so particles and psi carry only a checksum.)
`psi`, `status` and `reason` are chunked in member blocks of B members (B rows of psi make about 256 KiB). Small
per-step arrays have one chunk per step. Every chunk carries a CRC32C checksum, so a flipped byte fails to decode.

Step axis: its length `num_steps` is fixed at creation. Unwritten chunks cost nothing, and no array metadata is
rewritten while a run goes on.

Modules, one job each: `layout` (arrays, atomic creation, the root's recovery copy, readers that need no RunStore),
`writer` (the background writer thread and its write windows), `records` (member records), `runstore` (commit
protocol, integrity, rollback, resume), `verify` (every chunk's checksum, for inspect --verify and reports).
"""

from enkg_dist.store.layout import (FAILED, FORMAT_VERSION, NOT_RUN, OK, TIMING_FIELDS, StoreError,
                                    StoreIntegrityError, WriterError, committed_step_of, discard_half_created,
                                    is_kept, open_xarray, probe, read_reference, root_attrs, store_exists)
from enkg_dist.store.runstore import RunStore
from enkg_dist.store.verify import BadChunk, verify_store

__all__ = ["FAILED", "FORMAT_VERSION", "NOT_RUN", "OK", "TIMING_FIELDS", "BadChunk", "RunStore", "StoreError",
           "StoreIntegrityError", "WriterError", "committed_step_of", "discard_half_created", "is_kept",
           "open_xarray", "probe", "read_reference", "root_attrs", "store_exists", "verify_store"]
