"""`enkg-dist sweep`: a 2 x 2 study on the linear-Gaussian problem writes one row per point whose values are the
point's metrics.json; a sweep stopped part-way (in-process by the runner's interrupt mechanism, or SIGKILLed as a
process) continues where it stopped, leaving the finished points' files untouched, and ends with the same table; a
bad study key is a one-line error."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from enkg_dist import interrupt, runner, sweep, table
from enkg_dist.schema import ConfigError

STUDY = """
job: builtin:linear_gaussian_64
set: {{problem.n: 16, enkg.num_steps: 4{extra}}}
grid:
  enkg.ensemble_size: [4, 8]
  problem.truth_seed: [0, 1]
study_dir: {study_dir}
"""
# per process (or per wall clock): they differ between a point run once and one stopped and resumed
VOLATILE = {"wall_seconds", "step_seconds_total", "step_seconds_mean", "forward_evaluations", "skipped_evaluations",
            "resumed_from_step", *(f"step_seconds_{p}" for p in sweep.PHASES)}


def study_file(directory: Path, extra: str = "") -> Path:
    path = directory / "study.yaml"
    path.write_text(STUDY.format(study_dir=directory / "study", extra=extra))
    return path


def read_table(study_dir: Path) -> list[dict]:
    with open(study_dir / sweep.TABLE_FILE, newline="") as f:
        return list(csv.DictReader(f))


def stable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def files_and_times(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()
            and p.name not in (".lock", ".lease")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The study run once, uninterrupted, in-process: (study, its table)."""
    d = tmp_path_factory.mktemp("reference")
    study = sweep.load_study(study_file(d))
    sweep.run_study(study)
    return study, read_table(study.dir)


def test_the_table_has_one_row_per_point_with_its_metrics(reference):
    study, rows = reference
    assert [(r["enkg.ensemble_size"], r["problem.truth_seed"]) for r in rows] == [
        ("4", "0"), ("4", "1"), ("8", "0"), ("8", "1")]
    assert [r["point"] for r in rows] == [p.name for p in study.points]
    for row, p in zip(rows, study.points):
        assert row["status"] == "done"
        metrics = json.loads((study.dir / p.name / "metrics.json").read_text())
        scalars = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
        assert {"rel_l2_mean", "spread_skill", "crps", "forward_evaluations", "wall_seconds"} <= set(scalars)
        for k, v in scalars.items():
            assert row[k] == "" if v is None else row[k] == v if isinstance(v, str) else type(v)(row[k]) == v, k
        assert int(row["J"]) == p.cfg.enkg.ensemble_size
        assert int(row["forward_runs"]) == runner.forward_budget(p.cfg)["forward_evaluations"]
        assert int(row["committed_steps"]) == int(row["num_steps"]) == 4
        assert float(row["step_seconds_mean"]) > 0
        assert json.loads((study.dir / p.name / sweep.POINT_FILE).read_text())["settings"] == p.settings
    assert (study.dir / "error_vs_J.png").is_file() and (study.dir / "error_vs_forward_runs.png").is_file()
    assert not (study.dir / "step_time_vs_workers.png").exists()  # execution.num_workers is not in the grid
    text = table.inspect_study(sweep.summary(study.dir))
    assert "points: 4 (done 4, partial 0, failed 0, pending 0)" in text and "results.csv" in text


def test_point_names_are_deterministic_and_name_the_settings(reference, tmp_path):
    study, _ = reference
    again = sweep.load_study(study_file(tmp_path))
    assert [p.name for p in again.points] == [p.name for p in study.points]
    assert study.points[0].name.startswith("enkg.ensemble_size=4-problem.truth_seed=0-")


def test_an_interrupted_sweep_continues_where_it_stopped(reference, tmp_path, monkeypatch):
    """SIGTERM (the runner's clean stop) in the second point, after its first step is committed; the sweep run
    again skips the first point (its files untouched), resumes the second from its committed step, runs the rest
    and ends with the reference table."""
    _, ref_rows = reference
    study = sweep.load_study(study_file(tmp_path))
    first = study.dir / study.points[0].name
    real_check, calls = interrupt.check, []

    def check():  # the runner's safe points; a real SIGTERM at the 6th after the first point finished
        if (first / "metrics.json").is_file():
            calls.append(1)
            if len(calls) == 6:
                os.kill(os.getpid(), signal.SIGTERM)
        real_check()

    monkeypatch.setattr(interrupt, "check", check)
    with pytest.raises(interrupt.Interrupted), interrupt.stop_on_signals():
        sweep.run_study(study)
    monkeypatch.setattr(interrupt, "check", real_check)
    rows = read_table(study.dir)
    assert [r["status"] for r in rows] == ["done", "partial", "pending", "pending"]
    assert rows[1]["committed_steps"] == "1"
    before = files_and_times(first)
    with interrupt.stop_on_signals():
        sweep.run_study(study)
    assert files_and_times(first) == before
    second = json.loads((study.dir / study.points[1].name / "metrics.json").read_text())
    assert second["resumed_from_step"] == 0
    rows = read_table(study.dir)
    assert stable(rows) == stable(ref_rows)


def test_a_failed_point_is_recorded_and_skipped_until_retried(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(f"job: builtin:linear_gaussian_64\nset: {{problem.n: 16, enkg.num_steps: 4, "
                    f"enkg.ensemble_size: 4, chaos.modes: [raise]}}\ngrid: {{chaos.fail_rate: [0.0, 1.0]}}\n"
                    f"study_dir: {tmp_path / 'study'}\n")
    study = sweep.load_study(path)
    rows = sweep.run_study(study)
    assert [r["status"] for r in rows] == ["done", "failed"]
    assert "failed" in rows[1]["error"] and "\n" not in rows[1]["error"]
    failed = study.dir / study.points[1].name
    before = files_and_times(failed)
    assert [r["status"] for r in sweep.run_study(study)] == ["done", "failed"]
    assert files_and_times(failed) == before
    assert "failed 1" in table.inspect_study(sweep.summary(study.dir))


def test_only_the_figures_of_the_keys_that_vary_are_drawn(tmp_path):
    from enkg_dist.plots import study_figures

    rows = [{"point": f"p{w}{s}", "status": "done", "execution.num_workers": w, "problem.truth_seed": s, "J": 8,
             "forward_runs": 48, "rel_l2_mean": 0.5, "spread_skill": 0.9, "step_seconds_mean": 1.0 / w}
            for w in (1, 2, 4) for s in (0, 1)]
    paths = study_figures(rows, ["execution.num_workers", "problem.truth_seed"], tmp_path)
    assert [p.name for p in paths] == ["step_time_vs_workers.png"] and paths[0].stat().st_size > 10_000


@pytest.mark.parametrize("text, start", [
    ("grid: {enkg.bogus: [1, 2]}", "config error: enkg.bogus: unknown key (allowed: ensemble_size"),
    ("grids: {enkg.ensemble_size: [4]}", "study error: grids: unknown key (allowed: name, job, set, grid"),
    ("grid: {enkg.ensemble_size: 4}", "study error: grid.enkg.ensemble_size: Input should be a valid list"),
    ("grid: {enkg.ensemble_size: [4, 4]}", "study error: grid: enkg.ensemble_size: the value 4 is listed twice"),
    ("grid: {enkg.ensemble_size: [1, 4]}", "config error: enkg.ensemble_size: Input should be greater than"),
    ("parallel: 0", "study error: parallel: Input should be greater than or equal to 1"),
    ("[1, 2]", "study error: "),
], ids=["unknown-grid-key", "unknown-study-key", "not-a-list", "twice", "bad-value", "parallel", "not-a-mapping"])
def test_a_bad_study_is_a_one_line_error(tmp_path, text, start):
    path = tmp_path / "study.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as e:
        sweep.load_study(path)
    assert str(e.value).startswith(start) and "\n" not in str(e.value), str(e.value)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "enkg_dist.cli", *args], capture_output=True, text=True)


@pytest.mark.subprocess
def test_a_killed_sweep_process_continues_where_it_stopped(reference, tmp_path):
    """SIGKILL of `enkg-dist sweep` once the first point has finished and the second started; run again, it
    skips the first (its files untouched) and ends with the reference table. Members take 10 ms (chaos.delay
    with no failures, which changes no result) so that the kill lands inside the sweep."""
    _, ref_rows = reference
    path = study_file(tmp_path, extra=", chaos.fail_rate: 0.0, chaos.delay: 0.01")
    study = sweep.load_study(path)
    first, second = (study.dir / p.name for p in study.points[:2])
    p = subprocess.Popen([sys.executable, "-m", "enkg_dist.cli", "sweep", str(path), "--no-progress"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (second / "config.yaml").is_file() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL, "the sweep ended before it was killed"
    before = files_and_times(first)
    assert "metrics.json" in before and not (second / "metrics.json").exists()
    r = cli("sweep", str(path), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "done earlier: skipped" in r.stdout.splitlines()[0]
    assert files_and_times(first) == before
    strip = [{k: v for k, v in row.items() if k != "point" and not k.startswith("chaos")} for row in ref_rows]
    rows = [{k: v for k, v in row.items() if k != "point"} for row in read_table(study.dir)]
    assert stable(rows) == stable(strip)
    r = cli("inspect", str(study.dir))
    assert r.returncode == 0 and "done 4, partial 0, failed 0, pending 0" in r.stdout


@pytest.mark.subprocess
def test_parallel_sweep_and_cli_errors(reference, tmp_path):
    """--parallel 2 (each point its own process) gives the reference table; a bad key is one line, exit 2."""
    _, ref_rows = reference
    path = study_file(tmp_path)
    r = cli("sweep", str(path), "--parallel", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert stable(read_table(tmp_path / "study")) == stable(ref_rows)
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid: {enkg.bogus: [1, 2]}\n")
    r = cli("sweep", str(bad))
    assert r.returncode == 2 and r.stderr.startswith("error: config error: enkg.bogus: unknown key")
    assert len(r.stderr.strip().splitlines()) == 1
