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
    """Peak RSS of a J = 1024, 64x64 float64 run (32 MiB ensemble, localised) over the same run at J = 16: the
    estimate without its runtime part covers it to within the issue's 20 % (it is meant to be above; the slack is for
    allocator noise) and is not looser than 6x; the J = 16 run's own peak is between 1/2 and 4x the runtime part (4x: the CI run that
    measured 106 MiB of growth had a high baseline). The
    measured growth depends on the allocator and on how many steps the store's writer has queued at the peak: 444
    and 426 MiB in two runs here, 106 MiB in another (CI), against 480 MiB estimated. At J = 10^4 the estimate is
    9 % above the measured peak localised, 13 % unlocalised (budget's docstring)."""
    small = ["problem.n=64", "enkg.num_steps=4"]
    base = peak_bytes(tmp_path / "base", [*small, "enkg.ensemble_size=16"])
    big = [*small, "enkg.ensemble_size=1024"]
    grown = peak_bytes(tmp_path / "big", big) - base
    full = budget.driver_memory(cfgmod.load_config(LG, big))
    est = full["total"] - full["parts"]["runtime"]
    print(f"\npeak growth {grown / 2**20:.0f} MiB, estimate {est / 2**20:.0f} MiB; J = 16 peak {base / 2**20:.0f} MiB")
    assert grown <= 1.2 * est and est <= 6 * grown
    assert budget.RUNTIME_BYTES / 2 <= base <= 4 * budget.RUNTIME_BYTES


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
