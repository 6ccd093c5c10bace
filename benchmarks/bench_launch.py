"""Launch overhead of the cluster paths against the same small job run locally (issue 7's benchmark).

The real launches live in the cluster tests, which start a single-node Slurm (sbatch -> ray symmetric-run -> driver)
and an sshd-backed `ray up` cluster, time them, and time the same job run locally in the same test. This script runs
those tests and prints the timing lines they report. Needs root and the packages of scripts/system_deps.sh.
    python benchmarks/bench_launch.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/cluster/test_slurm.py::test_sbatch_runs_the_template_end_to_end",
         "tests/cluster/test_slurm.py::test_sigterm_mid_run_requeues_and_resumes_to_the_uninterrupted_ensemble",
         "tests/cluster/test_ray_up.py::test_ray_up_submit_down"]
MARKERS = ("launch overhead", "the job started", "SIGTERM at step", "ray up path", "up ", "locally")


def main() -> int:
    r = subprocess.run([sys.executable, "-m", "pytest", "-s", "-q", "-p", "no:cacheprovider", *TESTS], cwd=ROOT,
                       capture_output=True, text=True)
    lines = [ln for ln in r.stdout.splitlines() if any(m in ln for m in MARKERS) and not ln.startswith(("tests/",
                                                                                                        "FAILED"))]
    print("\n".join(lines) or "(no timing lines: see the pytest output below)")
    if r.returncode:
        print(r.stdout[-3000:], r.stderr[-2000:], sep="\n")
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
