"""Runs every benchmark once, each in its own process, printing its tables (`make bench`)."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
RUNS = [
    ["bench_kalman.py", "--dtype", "float32"],
    ["bench_ns_solver.py"],
    ["bench_mpi_ns.py"],
    ["bench_store.py", "--quick", "--step", "--workers", "32"],
    ["bench_ray_dispatch.py"],
    ["bench_enkg_step.py"],
    ["bench_denoiser.py", "--threads", "1"],
    ["bench_prior_heap.py"],
    ["linear_gaussian_table.py", "--quick"],
    ["prior_quality.py", "grf", "--steps", "300"],
    ["bench_launch.py"],
    ["bench_thread_budget.py"],
    ["bench_kalman_scale.py", "--J", "1024", "2048"],
    ["bench_emulated_cluster.py", "--slots", "32,128,512"],
    ["cost_model.py"],
]

if __name__ == "__main__":
    for args in RUNS:
        print(f"\n### python benchmarks/{' '.join(args)}", flush=True)
        subprocess.run([sys.executable, str(HERE / args[0]), *args[1:]], check=False)
