"""Reading one array a job names by path: a .npy file, or a Zarr array (a Zarr store directory that is an array,
or an array inside a group, e.g. obs.zarr/y). The run's other modules never import Zarr; they call this."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def read_array(path: str) -> np.ndarray:
    """The whole array at `path` (.npy: numpy, no pickles; anything else: a Zarr array) as a numpy array."""
    if str(path).endswith(".npy"):
        return np.load(path, allow_pickle=False)
    import zarr

    if "://" not in str(path) and not Path(path).exists():
        raise FileNotFoundError(f"no such file or Zarr array: {path!r}")
    return np.asarray(zarr.open_array(store=str(path), mode="r")[...])
