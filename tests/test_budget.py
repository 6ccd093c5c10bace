"""The driver's memory estimate against a real run's peak, and the refusal before allocating."""

import resource
import subprocess
import sys

import pytest

from enkg_dist import budget
from enkg_dist import config as cfgmod

LG = "builtin:linear_gaussian_64"

PEAK = """
import resource, sys
from enkg_dist import config as c, runner
cfg = c.load_config('builtin:linear_gaussian_64', sys.argv[2:])
runner.run(cfg, sys.argv[1], progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def peak_bytes(run_dir, overrides) -> int:
    r = subprocess.run([sys.executable, "-c", PEAK, str(run_dir), *overrides], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_estimate_covers_a_real_runs_peak(tmp_path):
    """Peak RSS of a J = 1024, 64x64 float64 run (32 MiB ensemble, localised) against --dry-run's estimate: the
    estimate is at most 20 % below the peak (the issue's tolerance) and not looser than 2x. Measured: 781 MiB alone,
    821 MiB inside the full suite, against 800 MiB estimated. (Not a growth over a J = 16 run: in the full suite a
    J = 16 run once peaked at 748 MiB, so differences of peaks measured nothing.)"""
    big = ["problem.n=64", "enkg.num_steps=4", "enkg.ensemble_size=1024"]
    peak = peak_bytes(tmp_path / "big", big)
    est = budget.driver_memory(cfgmod.load_config(LG, big))["total"]
    print(f"\npeak {peak / 2**20:.0f} MiB, estimate {est / 2**20:.0f} MiB")
    assert peak <= 1.2 * est and est <= 2 * peak


def test_refusal_names_the_keys_and_the_check_can_be_turned_off(monkeypatch):
    cfg = cfgmod.load_config(LG, ["enkg.ensemble_size=100000"])
    est = budget.driver_memory(cfg)
    assert est["ensemble_bytes"] == 100000 * 64 * 64 * 8
    with pytest.raises(cfgmod.ConfigError, match=r"enkg.ensemble_size: the driver would need about .* GiB .* and "
                                                 r"1 GiB is available here; lower enkg.ensemble_size or problem.n"):
        budget.check_memory(cfg, available=2**30)
    budget.check_memory(cfg, available=est["total"])  # fits exactly
    monkeypatch.setenv("ENKG_MEMORY_CHECK", "0")
    budget.check_memory(cfg, available=1)
    eki = cfgmod.load_config(LG, ["method=eki", "eki.ensemble_size=100000", "dtype=float32"])
    monkeypatch.delenv("ENKG_MEMORY_CHECK")
    with pytest.raises(cfgmod.ConfigError, match="eki.ensemble_size: .*problem.n \\(now 64\\) \\(ENKG_MEMORY"):
        budget.check_memory(eki, available=2**20)
    assert budget.available_memory() is None or budget.available_memory() > 0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0
