import json
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.subprocess  # every test here starts one (counted as slow)

SMALL = ["--set", "problem.n=16", "--set", "enkg.ensemble_size=16", "--set", "enkg.num_steps=20"]
LG = "builtin:linear_gaussian_64"


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "enkg_dist.cli", *args], capture_output=True, text=True, cwd=cwd)


def cli_loads_torch(*args):
    """(exit code, whether torch was imported, stderr) of `enkg-dist ARGS` run through main() in a fresh process."""
    code = ("import sys\nfrom enkg_dist.cli import main\nsys.argv = ['enkg-dist', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    print(e.code, 'torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert r.stdout.split(), r.stderr  # main() returned or raised SystemExit
    exit_code, loaded = r.stdout.split()[-2:]
    return int(exit_code), loaded == "True", r.stderr


def test_run_writes_a_complete_run_directory(tmp_path):
    out = tmp_path / "run"
    r = cli("run", LG, *SMALL, "--run-dir", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "run directory" in r.stdout
    for name in ("config.yaml", "metrics.json", "history.json", "ensemble.pt", "reconstruction.png"):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    assert m["J"] == 16 and m["forward_evaluations"] == 16 * 2 * 17 and 0 < m["rel_l2_mean"] < 1.5
    assert (out / "reconstruction.png").stat().st_size > 10_000
    assert "ensemble_size: 16" in (out / "config.yaml").read_text()


def test_eki_method_runs(tmp_path):
    r = cli("run", LG, "--set", "method=eki", "--set", "problem.n=16", "--set", "eki.ensemble_size=40",
            "--set", "eki.iterations=3", "--run-dir", str(tmp_path / "e"), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["forward_evaluations"] == 120


def test_dry_run_and_errors(tmp_path):
    r = cli("run", "--dry-run")
    assert r.returncode == 0 and "budget" in r.stdout and "forward_evaluations" in r.stdout
    r = cli("run", "--dry-run", "--set", "enkg.bogus=1")
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: config error: enkg.bogus: unknown key")
    assert len(r.stderr.strip().splitlines()) == 1
    r = cli("run", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "not found" in r.stderr


@pytest.mark.parametrize("job", ["jobs/linear_gaussian_32.yaml", "jobs/navier_stokes_32.yaml",
                                 "jobs/navier_stokes_64.yaml"])
def test_shipped_jobs_validate(job):
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    r = cli("run", str(root / job), "--dry-run")
    assert r.returncode == 0, r.stderr


def test_inspect_and_report_commands(tmp_path):
    out = tmp_path / "run"
    assert cli("run", LG, *SMALL, "--run-dir", str(out), "--no-progress").returncode == 0
    r = cli("inspect", str(out))
    assert r.returncode == 0 and "finished" in r.stdout, r.stderr
    assert cli_loads_torch("inspect", str(out))[:2] == (0, False)  # inspecting a run loads no torch
    r = cli("report", str(out))
    assert r.returncode == 0, r.stderr
    pngs = [line for line in r.stdout.splitlines() if line.endswith(".png")]
    assert len(pngs) == 5 and all(pathlib.Path(p).stat().st_size > 10_000 for p in pngs)
    r = cli("inspect", str(tmp_path / "nothing"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_generate_data_command(tmp_path):
    args = ["generate-data", str(tmp_path / "d.zarr"), "--n", "16", "--train", "4", "--val", "2", "--test", "2",
            "--spinup", "0.2", "--batch", "2", "--threads", "1", "--no-progress"]
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["train"]["done"] == 4
    r = cli(*args[:-3], "--alpha", "3.0", "--no-progress")  # different parameters over an existing set
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_a_bad_job_is_refused_before_torch_loads():
    """The job is validated before the numerical stack is imported: a wrong key costs no torch import."""
    exit_code, loaded, stderr = cli_loads_torch("run", "--set", "enkg.bogus=1")
    assert (exit_code, loaded) == (2, False), stderr
    assert "enkg.bogus: unknown key" in stderr
