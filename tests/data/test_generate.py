"""Data generation: layout and attributes, independence of the batch size, interrupt + resume = one run."""

import numpy as np
import pytest

zarr = pytest.importorskip("zarr")

from enkg_dist.data import generate_dataset, open_dataset  # noqa: E402
from enkg_dist.problems.navier_stokes import grf_vorticity  # noqa: E402

N, SPLITS, SPINUP = 16, {"train": 5, "val": 2, "test": 1}, 0.2


def make(path, **kw):
    return generate_dataset(path, n=N, splits=SPLITS, spinup=SPINUP, progress=False, **kw)


def read(path) -> dict:
    return {s: open_dataset(path, s) for s in SPLITS}


def test_layout_attributes_and_values(tmp_path):
    info = make(tmp_path / "d", batch=2)
    assert info == {s: {"size": k, "done": k, "redrawn": 0} for s, k in SPLITS.items()}
    root = zarr.open_group(tmp_path / "d", mode="r")
    assert root.attrs["n"] == N and root.attrs["spinup"] == SPINUP and root.attrs["splits"] == SPLITS
    assert root.attrs["alpha"] == 2.5 and root.attrs["tau"] == 3.0 and root.attrs["scale"] == 10.0
    for s, k in SPLITS.items():
        arr = root[s]
        assert arr.shape == (k, 1, N, N) and arr.dtype == np.float32 and arr.chunks == (min(2, k), 1, N, N)
        assert tuple(arr.metadata.dimension_names) == ("sample", "channel", "y", "x")
        assert arr.attrs["done"] == k
    x = read(tmp_path / "d")
    assert all(np.isfinite(v).all() for v in x.values())
    assert 0.05 < float(np.concatenate([v.ravel() for v in x.values()]).std()) < 2  # x = w/10, w std ~ 5
    assert not np.array_equal(x["train"][0], x["val"][0])  # splits use different streams
    # spinup 0 stores the GRF draws themselves: the same field law as the problem's grf_vorticity
    raw = generate_dataset(tmp_path / "raw", n=N, splits={"train": 3}, spinup=0.0, progress=False)
    assert raw["train"]["done"] == 3
    w = 10 * open_dataset(tmp_path / "raw", "train").astype(np.float64)
    assert abs(w.std() - float(grf_vorticity(N, 0).std())) < 2.5


def test_batch_size_does_not_change_the_data(tmp_path):
    a, b = read_after(make, tmp_path / "a", batch=2), read_after(make, tmp_path / "b", batch=3)
    for s in SPLITS:
        np.testing.assert_array_equal(a[s], b[s])


def read_after(fn, path, **kw):
    fn(path, **kw)
    return read(path)


def test_interrupted_then_resumed_equals_one_run(tmp_path):
    part = make(tmp_path / "r", batch=2, max_batches=2)
    assert part["train"]["done"] == 4 and part["val"]["done"] == 0
    assert open_dataset(tmp_path / "r", "train").shape[0] == 4  # only committed samples are read
    part = make(tmp_path / "r", batch=2, max_batches=1)
    assert part["train"]["done"] == 5 and part["val"]["done"] == 0
    make(tmp_path / "r", batch=3)  # another batch size for the rest: same data
    make(tmp_path / "full", batch=2)
    resumed, full = read(tmp_path / "r"), read(tmp_path / "full")
    for s in SPLITS:
        np.testing.assert_array_equal(resumed[s], full[s])
    with pytest.raises(ValueError, match="other parameters"):
        make(tmp_path / "r", batch=2, seed=1)


def test_failed_samples_are_redrawn_deterministically(tmp_path, monkeypatch):
    import enkg_dist.data.generate as gen

    real = gen.solve

    def flaky(w0, T, **kw):  # "blows up" every draw whose corner value is positive: a function of the draw alone
        res = real(w0, T, **kw)
        bad = w0[:, 0, 0] > 0
        res.ok = res.ok & ~bad
        res.omega[bad] = float("nan")
        return res

    monkeypatch.setattr(gen, "solve", flaky)
    a = make(tmp_path / "a", batch=2)
    b = make(tmp_path / "b", batch=3)
    assert sum(v["redrawn"] for v in a.values()) > 0 and a == b
    xa, xb = read(tmp_path / "a"), read(tmp_path / "b")
    for s in SPLITS:
        assert np.isfinite(xa[s]).all()
        np.testing.assert_array_equal(xa[s], xb[s])
