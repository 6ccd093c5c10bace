"""Guidance on the resolved 64x64 Navier-Stokes problem (issue: observe every 4th point, noiseless): EnKG's ensemble
mean is closer to the truth than the unconditional prior's draws, on one field at small J (the accuracy itself is
measured by benchmarks/navier_stokes_table.py, not asserted here)."""

import pytest

from enkg_dist import config as cfgmod
from enkg_dist import runner

NS64 = ["problem={kind: navier_stokes, n: 64, k: 4, T: 0.25, Re: 200.0, spinup: 1.0, truth_seed: 0}",
        "prior={kind: gaussian, alpha: 2.5, tau: 3.0, std: 0.5}", "enkg.ensemble_size=16", "enkg.num_steps=10",
        "enkg.localisation={kind: gaspari_cohn, radius: 6}", "enkg.guard=6.0", "output_dir=/tmp/unused"]


@pytest.mark.slow
def test_guidance_lowers_the_error_against_the_unconditional_prior(tmp_path):
    _, guided = runner.run(cfgmod.load_config("builtin:default", NS64), tmp_path / "guided", progress=False)
    _, free = runner.run(cfgmod.load_config("builtin:default", NS64 + ["enkg.num_corrections=0"]),
                         tmp_path / "free", progress=False)
    assert free["forward_evaluations"] == 0 and guided["forward_evaluations"] > 0
    print(f"\nrel. L2 of the mean: guided {guided['rel_l2_mean']:.3f}, unconditional {free['rel_l2_mean']:.3f}")
    assert guided["rel_l2_mean"] < 0.85 * free["rel_l2_mean"]  # measured here: 0.703 against 0.990
