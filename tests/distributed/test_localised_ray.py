"""Localisation and spread control keep the Ray run equal to the in-process run, bit for bit."""

import pytest
import torch

from enkg_dist import config as cfgmod
from enkg_dist import runner

pytestmark = pytest.mark.usefixtures("ray_session")

LG = "builtin:linear_gaussian_64"
SMALL = ["problem.n=16", "enkg.ensemble_size=10", "enkg.num_steps=10", "output_dir=/tmp/unused", "enkg.guard=2",
         "enkg.inflation=rtps", "enkg.inflation_factor=0.5"]


@pytest.mark.parametrize("loc", ["{kind: gaspari_cohn, radius: 2}", "{kind: nice}"])
def test_localised_ray_run_equals_in_process(tmp_path, loc):
    runs = []
    for name, extra in [("local", []), ("ray", ["execution.backend=ray", "execution.num_workers=2",
                                                "execution.batch_size=3"])]:
        cfg = cfgmod.load_config(LG, SMALL + [f"enkg.localisation={loc}"] + extra)
        out, m = runner.run(cfg, tmp_path / name, progress=False)
        runs.append(torch.load(out / "ensemble.pt")["particles"])
    assert torch.equal(runs[0], runs[1])
