import time

import numpy as np
import torch
import zarr

from enkg_dist import config as cfgmod
from enkg_dist import report, runner
from enkg_dist.phases import PhaseClock
from enkg_dist.sampler import DenoiserMaps, TimedMaps


def test_the_phases_and_the_update_add_up_to_the_total():
    clock = PhaseClock()
    clock.start_step()
    slow = clock.wrap("forward", lambda s: time.sleep(s) or s)
    assert slow(0.01) == 0.01
    with clock.phase("store"):
        pass
    row = clock.timings(1.0)
    assert set(row) == {"total", "denoise", "forward", "update", "store"}
    assert row["forward"] >= 0.01 and row["denoise"] == 0.0
    assert row["update"] == 1.0 - row["forward"] - row["store"]
    clock.start_step()
    assert clock.timings(0.5) == {"total": 0.5, "denoise": 0.0, "forward": 0.0, "store": 0.0, "update": 0.5}


def test_timed_maps_count_the_prior_and_return_its_results_unchanged():
    clock = PhaseClock()
    inner = DenoiserMaps(lambda x, sigma: x / (1 + sigma**2))
    maps = TimedMaps(inner, lambda: clock.phase("denoise"))
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    assert torch.equal(maps.x_hat_map(x, 2.0, 3, 0.01, 7.0), inner.x_hat_map(x, 2.0, 3, 0.01, 7.0))
    assert torch.equal(maps.predict(x, 2.0, 1.0, "heun"), inner.predict(x, 2.0, 1.0, "heun"))
    assert clock.seconds["denoise"] > 0 and clock.seconds["forward"] == 0


def test_a_run_records_where_each_step_went(tmp_path):
    cfg = cfgmod.load_config("builtin:linear_gaussian_64", ["problem.n=16", "enkg.ensemble_size=12",
                                                            "enkg.num_steps=4", f"output_dir={tmp_path}"])
    out, _ = runner.run(cfg, tmp_path / "run", progress=False)
    z = zarr.open_group(str(out / "store.zarr"), mode="r")
    fields = list(z.attrs["timing_fields"])
    t = np.asarray(z["timings"][:])
    assert t.shape == (4, 5) and np.isfinite(t).all() and (t >= 0).all()
    total, parts = (t[:, fields.index("total")],
                    t[:, [fields.index(p) for p in ("denoise", "forward", "update", "store")]])
    np.testing.assert_allclose(parts.sum(1), total, rtol=1e-12)
    assert (t[1:, fields.index("forward")] > 0).all() and (t[:, fields.index("denoise")] > 0).all()
    s = report.summary(out)
    assert set(s["phase_seconds"]) == {"denoise", "forward", "update", "store"}
    np.testing.assert_allclose(sum(s["phase_seconds"].values()), s["step_seconds"], rtol=1e-9)
