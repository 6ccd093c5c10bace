"""A tiny example simulator for ExternalProgramForward: a few steps of a periodic heat equation with a quadratic
reaction, then every k-th point.

    python -m enkg_dist.problems.example_program INPUT.npy OUTPUT.npy [--k K] [--steps S]
    mpirun -n R python -m enkg_dist.problems.example_program INPUT.npy OUTPUT.npy ...

Numpy only. Under an MPI launcher (and with mpi4py installed) the rows are split across ranks with a one-row halo
exchange per step, gathered on rank 0, which writes the output: the same numbers as one rank, bit for bit.
`--fail MODE` simulates a broken simulator for tests (see FAIL_MODES).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

FAIL_MODES = ("exit", "hang", "garbage", "nan", "missing")
FAIL_MESSAGE = "example_program: simulated solver blow-up"  # what --fail exit prints to stderr
DT, REACTION = 0.1, 0.2  # dt <= 1/4 keeps the explicit 5-point scheme stable on a unit grid
_MPI_ENV = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


def step(ext: np.ndarray, dt: float = DT, reaction: float = REACTION) -> np.ndarray:
    """One explicit step of u_t = lap(u) + reaction u^2 on rows ext[1:-1]; ext[0], ext[-1] are halo rows."""
    u = ext[1:-1]
    lap = ext[:-2] + ext[2:] + np.roll(u, 1, axis=1) + np.roll(u, -1, axis=1) - 4.0 * u
    return u + dt * (lap + reaction * u * u)


def simulate(u: np.ndarray, k: int = 2, steps: int = 5) -> np.ndarray:
    """The whole simulator on one process: field (N, M) or (1, N, M) -> flattened u_T[::k, ::k] (float64)."""
    u = as_field(u)
    for _ in range(steps):
        u = step(np.concatenate([u[-1:], u, u[:1]]))
    return u[::k, ::k].ravel()


def as_field(u: np.ndarray) -> np.ndarray:
    """(1, N, M) or (N, M) -> (N, M) float64."""
    u = np.asarray(u, dtype=np.float64)
    if u.ndim == 3 and u.shape[0] == 1:
        u = u[0]
    if u.ndim != 2:
        raise ValueError(f"expected a field of shape (N, M) or (1, N, M), got {u.shape}")
    return u


def _world():
    """COMM_WORLD when started by an MPI launcher with more than one rank and mpi4py is installed, else None."""
    if not any(v in os.environ for v in _MPI_ENV):  # no launcher: skip MPI's (slow) singleton start-up
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI.COMM_WORLD if MPI.COMM_WORLD.Get_size() > 1 else None


def simulate_mpi(comm, u: np.ndarray | None, k: int, steps: int) -> np.ndarray | None:
    """simulate() with rows split across the ranks of comm; u is read on rank 0 only; the result is on rank 0 only."""
    rank, size = comm.Get_rank(), comm.Get_size()
    u = comm.bcast(None if u is None else as_field(u), root=0)
    if u.shape[0] < size:
        raise ValueError(f"{u.shape[0]} grid rows cannot be split across {size} ranks")
    slab = np.array_split(u, size, axis=0)[rank]
    up, down = (rank - 1) % size, (rank + 1) % size
    for _ in range(steps):
        below = comm.sendrecv(slab[0], dest=up, sendtag=1, source=down, recvtag=1)
        above = comm.sendrecv(slab[-1], dest=down, sendtag=2, source=up, recvtag=2)
        slab = step(np.concatenate([above[None], slab, below[None]]))
    slabs = comm.gather(slab, root=0)
    return np.concatenate(slabs)[::k, ::k].ravel() if rank == 0 else None


def write_output(path: str, psi: np.ndarray) -> None:
    """.npz paths get an archive with key 'psi', anything else a plain .npy written to exactly that path."""
    if path.endswith(".npz"):
        np.savez(path, psi=psi)
    else:
        with open(path, "wb") as f:
            np.save(f, psi)


def fail(mode: str, output: str, size: int, root: bool = True) -> None:
    """Behave like a broken simulator (only the root rank writes)."""
    if mode == "exit":
        print(FAIL_MESSAGE, file=sys.stderr, flush=True)
        sys.exit(3)
    if mode == "hang":
        while True:
            time.sleep(3600)
    if mode == "garbage" and root:
        with open(output, "wb") as f:
            f.write(b"this is not an npy file\n")
    elif mode == "nan" and root:
        write_output(output, np.full(size, np.nan))
    sys.exit(0)  # "missing" writes nothing


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m enkg_dist.problems.example_program",
                                description="A tiny example simulator (heat equation + reaction, subsampled).")
    p.add_argument("input", help="the field, .npy of shape (N, M) or (1, N, M)")
    p.add_argument("output", help="where to write the observations (.npy, or .npz with key 'psi')")
    p.add_argument("--k", type=int, default=2, help="keep every k-th point in each direction")
    p.add_argument("--steps", type=int, default=5, help="explicit time steps")
    p.add_argument("--fail", choices=FAIL_MODES, help="simulate a failure (for tests)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    comm = _world()
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    u = np.load(args.input, allow_pickle=False) if rank == 0 else None
    if args.fail:
        n = as_field(u)[:: args.k, :: args.k].size if rank == 0 else 0
        fail(args.fail, args.output, n, root=rank == 0)
    psi = simulate(u, args.k, args.steps) if comm is None else simulate_mpi(comm, u, args.k, args.steps)
    if rank == 0:
        write_output(args.output, psi)
        print(f"example_program: {as_field(u).shape} field, {args.steps} steps, k={args.k}, {size} rank(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
