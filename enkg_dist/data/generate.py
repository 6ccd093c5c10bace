"""The Navier–Stokes data set (enkg.md §4): Gaussian-random-field vorticities evolved `spinup` time units, as x = w/10.

Sample i of split s is drawn from its own stream `rng.member_normal(seed, rng.DATA, [i], (n, n), split_key(s),
attempt)`, so it depends on neither the batch size nor on when generation was interrupted. Its field is evolved with
the serial batched solver (per-member steps, the authors' disc dealiasing, Re 200, f = -4 cos 4y: the
NavierStokesForward equation); a sample whose spin-up fails (blow-up, step budget) is redrawn with attempt + 1, and
the redraws are counted.

Layout: a Zarr v3 group at `path`, one array per split, (S, 1, n, n) with dimension_names ("sample", "channel", "y",
"x"), chunked by `batch` samples; the generator's parameters are the group's attributes. Each split array's
attributes hold `done` (samples committed) and `redrawn`, updated after each batch's chunk is written: a killed run,
called again with the same arguments, continues from `done` and ends with identical data.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from enkg_dist import rng
from enkg_dist.fields import GaussianField
from enkg_dist.problems.navier_stokes import NavierStokes2D, solve
from enkg_dist.problems.navier_stokes.problem import SCALE

DIMS = ("sample", "channel", "y", "x")
DEFAULT_SPLITS = {"train": 1024, "val": 16, "test": 16}
MAX_ATTEMPTS = 100  # redraws of one sample before giving up
MAX_STEPS = 1_000_000  # spin-up step budget of one sample
PARAMS = ("n", "alpha", "tau", "std", "spinup", "seed", "dtype", "Re", "forcing_amplitude", "forcing_wavenumber",
          "dealias", "scale", "step_mode")


def split_key(split: str) -> int:
    """A stable integer for a split name (its CRC32): the stream key that keeps splits apart."""
    return zlib.crc32(split.encode("utf-8"))


def sample_key(seed: int, split: str, index: int, attempt: int = 0) -> tuple:
    """The (seed, purpose, member, *keys) of sample `index` of `split` on its `attempt`-th draw."""
    return (int(seed), rng.DATA, int(index), split_key(split), int(attempt))


def draw(prior: GaussianField, seed: int, split: str, indices, attempts, n: int) -> torch.Tensor:
    """Initial vorticities (B, n, n), float64: sample indices[b] on its attempts[b]-th draw."""
    z = torch.cat([rng.member_normal(seed, rng.DATA, [i], (n, n), split_key(split), a)
                   for i, a in zip(indices, attempts)])
    return prior.sample(z)


def generate_dataset(path, n: int = 64, splits: Mapping[str, int] | None = None, alpha: float = 2.5,
                     tau: float = 3.0, std: float = 5.0, spinup: float = 5.0, seed: int = 0, batch: int = 32,
                     progress: bool = True, dtype: str = "float32", max_batches: int | None = None,
                     Re: float = 200.0, threads: int | None = None) -> dict:
    """Generate (or resume) the data set at `path`; returns {split: {"size", "done", "redrawn"}}.

    An existing group must have been made with the same parameters and split sizes (ValueError otherwise).
    max_batches: stop after that many batches in this call (for tests and for splitting the work); calling again
    continues. batch: samples solved together and the chunk size of new arrays. threads: torch intra-op threads
    for this call (restored after; small grids run fastest on 1: at 16^2, 2 threads on a busy 2-core machine were 30x
    slower).
    """
    if threads is not None:
        before = torch.get_num_threads()
        torch.set_num_threads(int(threads))
        try:
            return generate_dataset(path, n, splits, alpha, tau, std, spinup, seed, batch, progress, dtype,
                                    max_batches, Re, None)
        finally:
            torch.set_num_threads(before)
    import zarr

    splits = dict(DEFAULT_SPLITS if splits is None else splits)
    if n < 8 or batch < 1 or any(int(s) < 0 for s in splits.values()):
        raise ValueError(f"need n >= 8, batch >= 1 and split sizes >= 0; got n={n}, batch={batch}, {splits}")
    np_dtype = np.dtype(dtype)
    eq = NavierStokes2D(n, Re=Re, dealias="disc")
    params = {"n": int(n), "alpha": float(alpha), "tau": float(tau), "std": float(std), "spinup": float(spinup),
              "seed": int(seed), "dtype": np_dtype.name, "Re": float(Re), "forcing_amplitude": eq.forcing_amplitude,
              "forcing_wavenumber": eq.forcing_wavenumber, "dealias": eq.dealias, "scale": SCALE,
              "step_mode": "per_member"}
    attrs = {**params, "splits": {k: int(v) for k, v in splits.items()}, "variable": "x = vorticity / scale",
             "grf": "spectrum (|k|^2 + tau^2)^(-alpha) per mode, mean removed, pointwise std `std`",
             "generator": "enkg_dist.data.generate.generate_dataset"}
    path = Path(path)
    if (path / "zarr.json").exists():
        root = zarr.open_group(path, mode="r+")
        old = dict(root.attrs)
        diff = {k: (old.get(k), v) for k, v in {**params, "splits": attrs["splits"]}.items() if old.get(k) != v}
        if diff:
            raise ValueError(f"{path} holds a data set made with other parameters (existing, asked): {diff}")
    else:
        root = zarr.open_group(path, mode="w-", attributes=attrs)
    arrays = {}
    for name, size in splits.items():
        if name in root:
            arrays[name] = root[name]
        else:
            arrays[name] = root.create_array(name, shape=(int(size), 1, n, n),
                                             chunks=(max(1, min(batch, size)), 1, n, n),
                                             dtype=np_dtype, dimension_names=DIMS, fill_value=np.nan,
                                             attributes={"done": 0, "redrawn": 0})

    prior = GaussianField.matern_like(n, alpha, tau, std, zero_mean_mode=True)
    total = sum(splits.values())
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=sum(int(a.attrs["done"]) for a in arrays.values()), unit="sample",
                   desc=f"NS data {n}^2")
    batches = 0
    try:
        for name, arr in arrays.items():
            size = arr.shape[0]
            done, redrawn = int(arr.attrs["done"]), int(arr.attrs["redrawn"])
            while done < size:
                if max_batches is not None and batches >= max_batches:
                    return summary(arrays)
                idx = list(range(done, min(done + batch, size)))
                fields, extra = evolve(eq, prior, seed, name, idx, n, spinup)
                arr[done : done + len(idx)] = (fields / SCALE).numpy().astype(np_dtype)[:, None]
                done, redrawn = done + len(idx), redrawn + extra
                arr.attrs.update({"done": done, "redrawn": redrawn})  # the commit marker, after the data
                batches += 1
                if bar is not None:
                    bar.update(len(idx))
                    bar.set_postfix(split=name, redrawn=redrawn)
    finally:
        if bar is not None:
            bar.close()
    return summary(arrays)


def evolve(eq: NavierStokes2D, prior: GaussianField, seed: int, split: str, indices: list[int], n: int,
           spinup: float) -> tuple[torch.Tensor, int]:
    """The spun-up fields (B, n, n) of samples `indices`, redrawing failures; and how many redraws were needed."""
    attempts = [0] * len(indices)
    out = torch.empty(len(indices), n, n, dtype=torch.float64)
    todo = list(range(len(indices)))
    redrawn = 0
    while todo:
        w0 = draw(prior, seed, split, [indices[b] for b in todo], [attempts[b] for b in todo], n)
        if spinup > 0:
            res = solve(w0, spinup, mode="per_member", equation=eq, max_steps=MAX_STEPS)
            w, ok = res.omega, res.ok.tolist()
        else:
            w, ok = w0, torch.isfinite(w0).all(dim=(-2, -1)).tolist()
        failed = []
        for b, w_b, good in zip(todo, w, ok):
            if good:
                out[b] = w_b
            else:
                attempts[b] += 1
                redrawn += 1
                if attempts[b] >= MAX_ATTEMPTS:
                    raise RuntimeError(f"sample {indices[b]} of split {split!r} failed {MAX_ATTEMPTS} draws")
                failed.append(b)
        todo = failed
    return out, redrawn


def summary(arrays: Mapping) -> dict:
    return {name: {"size": int(a.shape[0]), "done": int(a.attrs["done"]), "redrawn": int(a.attrs["redrawn"])}
            for name, a in arrays.items()}


def dataset_attributes(path) -> dict:
    """The generator's parameters and split sizes stored with a data set (ValueError when `path` is none)."""
    import zarr

    try:
        return dict(zarr.open_group(path, mode="r").attrs)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        raise ValueError(f"{path}: not a Zarr data set") from None


def open_dataset(path, split: str = "train", committed: bool = True) -> np.ndarray:
    """A split as a numpy array (S, 1, n, n); only its committed samples (`done`) unless committed=False."""
    import zarr

    arr = zarr.open_group(path, mode="r")[split]
    stop = int(arr.attrs["done"]) if committed else arr.shape[0]
    return arr[:stop]


def training_splits(path) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """What training a prior reads of a data set: its train split, its val split (None when it has none) and its
    attributes (the generator's parameters)."""
    attrs = dataset_attributes(path)
    val = open_dataset(path, "val") if "val" in attrs.get("splits", {}) else None
    return open_dataset(path, "train"), val, attrs
