"""Run reports: the inspect table and the PNG figures, on a finished, a stopped and an in-progress run."""

import json
import re
import shutil

import numpy as np
import pytest

from enkg_dist import config as cfgmod
from enkg_dist import plots, report, runner, table
from enkg_dist.evaluation import TooManyFailures
from enkg_dist.store import FAILED, NOT_RUN, RunStore

LG = "builtin:linear_gaussian_64"

SMALL = ["problem.n=16", "enkg.ensemble_size=8", "enkg.num_steps=10", "chaos={fail_rate: 0.2, modes: [nan], seed: 3}"]
ROW = re.compile(r"^│\s+\d+ │", re.M)  # a step row of the rich table


def _status(run_dir, upto=None):
    with RunStore.open(run_dir / "store.zarr", "r", verify=False) as st:
        a = st.array("status")
        return np.asarray(a[: (a.shape[0] if upto is None else upto)])


def _rel_l2(mean, truth):
    return float(np.linalg.norm(np.ravel(mean) - np.ravel(truth)) / np.linalg.norm(truth))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A real small run with injected failures (the cap lifted so that 8 members never stop it)."""
    cfg = cfgmod.load_config(LG, SMALL + ["execution.max_failed_fraction=1.0"])
    out, metrics = runner.run(cfg, tmp_path_factory.mktemp("report") / "run", progress=False)
    return out, metrics


def test_inspect_finished_run(finished):
    out, metrics = finished
    status = _status(out)
    s = report.summary(out)
    assert s["state"] == "finished" and s["committed_steps"] == 10 and s["num_steps"] == 10 and s["J"] == 8
    assert s["failures"] == int((status == FAILED).sum()) == metrics["failed_evaluations"] > 0
    assert s["forward_evaluations"] == int((status != NOT_RUN).sum()) == metrics["forward_evaluations"]
    assert s["failures_by_reason"] == {"non-finite forward output": s["failures"]}
    for r in s["steps"]:
        assert sum(r["failed"]) == int((status[r["step"]] == FAILED).sum())
    text = table.inspect_run(out)
    assert len(ROW.findall(text)) == 10
    assert "status: finished (10 of 10 steps committed)" in text
    assert f"failures: {s['failures']} of {s['forward_evaluations']} forward evaluations" in text
    assert f"{s['failures']:6d}  non-finite forward output" in text
    assert "wall time:" in text and "rel_l2_mean=" in text


def test_make_report_finished_run(finished, tmp_path):
    out, metrics = finished
    paths = report.make_report(out)
    assert [p.name for p in paths] == [f"{n}.png" for n in report.FIGURES]
    for p in paths:
        assert p.parent == out / "report" and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert p.stat().st_size > 10_000, p
    curves = json.loads((out / "report" / "curves.json").read_text())
    assert curves["step"] == list(range(10)) and curves["state"] == "finished"
    # the final particles' mean is the last step's stored mean: the curve ends at metrics.json's values
    assert curves["rel_l2_mean"][-1] == pytest.approx(metrics["rel_l2_mean"], abs=1e-6)
    assert curves["spread_rms"][-1] == pytest.approx(metrics["spread"], abs=1e-6)
    assert curves["posterior_mean_rel_l2"] == pytest.approx(metrics["posterior_mean_rel_l2"], abs=1e-9)

    # what the figures draw is these data
    figs = plots.run_figures(report.report_data(out))
    lines = {ln.get_gid(): ln for f in figs.values() for ax in f.axes for ln in ax.lines if ln.get_gid()}
    np.testing.assert_allclose(lines["rel_l2_mean"].get_ydata(), curves["rel_l2_mean"])
    assert lines["rel_l2_mean"].get_ydata()[-1] == pytest.approx(metrics["rel_l2_mean"], abs=1e-6)
    with RunStore.open(out / "store.zarr", "r", verify=False) as st:
        misfit, std = st.read("misfit"), st.read("std")
    np.testing.assert_allclose(lines["misfit-1"].get_ydata(), misfit[:, 1])
    np.testing.assert_allclose(lines["spread_mean"].get_ydata(), std.reshape(10, -1).mean(1))
    bars = [p for p in figs["failures"].axes[0].patches if p.get_gid() == "failures-0"]
    np.testing.assert_array_equal([b.get_height() for b in bars], (_status(out) == FAILED).sum((1, 2)))
    for f in figs.values():
        f.clear()

    other = report.make_report(out, tmp_path / "elsewhere")
    assert all(p.parent == tmp_path / "elsewhere" and p.exists() for p in other)


def test_run_in_progress(finished, tmp_path):
    """A reader of a live run sees data of later steps on disk, behind the commit marker: they must not count."""
    src, _ = finished
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(src / "config.yaml", live / "config.yaml")
    shutil.copytree(src / "store.zarr", live / "store.zarr")
    meta_file = live / "store.zarr" / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"]["committed_step"] = 5
    meta_file.write_text(json.dumps(meta))
    status = _status(live)

    s = report.summary(live)
    assert s["state"] == "in progress" and s["committed_steps"] == 6 and len(s["steps"]) == 6
    assert s["failures"] == int((status[:6] == FAILED).sum())
    assert s["forward_evaluations"] == int((status[:6] != NOT_RUN).sum())
    assert s["pending"]["recorded"] == int((status[6] != NOT_RUN).sum())
    text = table.inspect_run(live)
    assert "in progress" in text and "6 of 10 steps committed" in text and len(ROW.findall(text)) == 6
    assert f"failures: {s['failures']} of" in text

    paths = report.make_report(live)
    assert len(paths) == 5 and all(p.stat().st_size > 10_000 for p in paths)
    curves = json.loads((live / "report" / "curves.json").read_text())
    assert curves["step"] == list(range(6)) and curves["state"] == "in progress"
    truth = runner.build(cfgmod.validate(_config(live))).problem.x_true.numpy()
    with RunStore.open(live / "store.zarr", "r", verify=False) as st:
        mean5 = st.read("mean", 5)
    assert curves["rel_l2_mean"][-1] == pytest.approx(_rel_l2(mean5, truth), abs=1e-9)


def _config(run_dir):
    with RunStore.open(run_dir / "store.zarr", "r", verify=False) as st:
        return st.config


def test_store_written_step_by_step(tmp_path):
    """A store made by RunStore.create with distinct failure reasons, committed up to step 2 of 5."""
    cfg = cfgmod.load_config(LG, ["problem.n=8", "enkg.ensemble_size=4", "enkg.num_steps=5", "name=tiny"])
    J, K, shape, m = 4, 2, (1, 8, 8), 16
    path = tmp_path / "run" / "store.zarr"
    st = RunStore.create(path, config=cfg.model_dump(mode="json"), config_yaml=cfgmod.dump(cfg), J=J,
                         state_shape=shape, obs_size=m, num_steps=5, num_corrections=K)
    assert "no step committed yet" in table.inspect_run(path.parent)
    with pytest.raises(report.ReportError, match="no step committed"):
        report.make_report(path.parent)
    reasons = {(1, 0, 1): "timeout after 3 s: process group killed", (1, 1, 2): "timeout after 10 s: killed",
               (2, 0, 0): "simulator raised SimulatorCrash: boom", (3, 0, 3): "never committed"}
    rng = np.random.default_rng(0)
    for t in range(4):
        for k in range(K if t else 0):
            for j in range(J):
                why = reasons.get((t, k, j))
                st.record_members(t, k, [j], np.zeros((1, m)), [why is None], [why])
        if t < 3:
            st.commit_step(t, rng.normal(size=(J, *shape)), {"sigma": 10.0 / (t + 1), "misfit": [2.0, 1.5][: K if t
                           else 0], "weight": [0.1, 0.2][: K if t else 0], "timings": {"total": 0.5}})
    st.flush()

    s = report.summary(path)  # a store path works as well as its run directory
    assert s["name"] == "tiny" and s["committed_steps"] == 3 and s["state"] == "in progress"
    assert s["failures"] == 3 and s["forward_evaluations"] == 16
    assert s["failures_by_reason"] == {reasons[(1, 0, 1)]: 1, reasons[(1, 1, 2)]: 1, reasons[(2, 0, 0)]: 1}
    assert s["failures_by_category"] == {"timeout after # s": 2, "simulator raised SimulatorCrash": 1}
    assert s["failures_per_step_by_category"]["timeout after # s"] == [0, 2, 0]
    assert s["steps"][1]["ok"] == [3, 3] and s["steps"][1]["failed"] == [1, 1] and s["steps"][0]["ok"] == []
    assert s["step_seconds"] == pytest.approx(1.5) and s["pending"] == {"step": 3, "recorded": 8, "failed": 1}
    text = table.inspect_run(path.parent)
    assert len(ROW.findall(text)) == 3 and "in progress or interrupted at step 3 (3 of 5 steps committed" in text
    assert "never committed" not in text and "3/1 3/1" in text

    paths = report.make_report(path.parent)
    assert len(paths) == 5 and all(p.stat().st_size > 10_000 for p in paths)
    curves = json.loads((path.parent / "report" / "curves.json").read_text())
    assert curves["failures"] == {"timeout after # s": [0, 2, 0], "simulator raised SimulatorCrash": [0, 0, 1]}
    assert curves["misfit"][0] == [None, 2.0, 2.0]
    st.close()

    # a problem without a truth (or one not rebuildable here): no error curve, no truth panels
    d = report.report_data(path.parent, reference={})
    assert d["rel_l2_mean"] is None and d["note"] == "no truth stored" and d["calibration"]["steps"] == []
    figs = plots.run_figures(d)
    assert len(figs["convergence"].axes) == 1 and {ln.get_gid() for ln in figs["convergence"].axes[0].lines} >= {
        "misfit-0", "misfit-1"}
    for f in figs.values():
        f.clear()


def test_stopped_run(tmp_path):
    """The brief's run with the default failure cap: it may stop cleanly (stopped.json), which the report says."""
    try:
        out, _ = runner.run(cfgmod.load_config(LG, SMALL), tmp_path / "run", progress=False)
    except TooManyFailures:
        out = tmp_path / "run"
        stopped = json.loads((out / "stopped.json").read_text())
        s = report.summary(out)
        assert s["state"] == "stopped" and s["committed_steps"] == stopped["step"]
        assert f"stopped at step {stopped['step']}" in table.inspect_run(out)
        if s["committed_steps"]:
            assert len(report.make_report(out)) == 5
    else:
        assert report.summary(out)["state"] == "finished"


@pytest.mark.subprocess
def test_calibration_and_references_come_from_the_run_directory(finished):
    """Spread-skill, CRPS and the rank histogram at the last step are metrics.json's (same module, same ensemble);
    the truth is the one the runner stored; the report never imports the runner or runs a simulator."""
    import subprocess
    import sys

    out, metrics = finished
    d = report.report_data(out)
    c = d["calibration"]
    assert c["steps"] == [9] and c["rank_step"] == 9
    assert c["spread_skill"][-1] == pytest.approx(metrics["spread_skill"], rel=1e-12)
    assert c["crps"][-1] == pytest.approx(metrics["crps"], rel=1e-12)
    assert c["rank_histogram"] == metrics["rank_histogram"]
    assert d["posterior_crps"] == pytest.approx(metrics["posterior_crps"], rel=1e-12)
    assert d["posterior_mean_rel_l2"] == pytest.approx(metrics["posterior_mean_rel_l2"], rel=1e-12)
    from enkg_dist.store import read_reference

    ref = read_reference(out / "store.zarr")
    built = runner.build(cfgmod.validate(_config(out)))
    np.testing.assert_array_equal(ref["truth"], built.problem.x_true.numpy())
    np.testing.assert_array_equal(ref["observation_image"], built.observation_image.numpy())
    text = table.inspect_run(out)
    assert f"spread_skill={metrics['spread_skill']:.4g}" in text and f"crps={metrics['crps']:.4g}" in text
    code = ("import sys; from enkg_dist import report; report.make_report(sys.argv[1], sys.argv[2]); "
            "assert 'enkg_dist.runner' not in sys.modules, 'the report imported the runner'")
    r = subprocess.run([sys.executable, "-c", code, str(out), str(out / "report-isolated")], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def _flip(f):
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def test_a_damaged_store_is_reported_as_such_and_the_report_draws_what_is_intact(finished, tmp_path):
    src, metrics = finished
    run = tmp_path / "damaged"
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("report*"))
    store = run / "store.zarr"
    _flip(store / "particles" / "c" / "9" / "0" / "0" / "0" / "0")  # the final ensemble
    _flip(store / "mean" / "c" / "3" / "0" / "0" / "0")
    s = report.summary(run)  # the default check already sees the final ensemble's damage
    assert s["state"] == "damaged" and "DAMAGED" in s["status"]
    assert any("array 'mean' step 3" in d for d in s["damage"])
    assert any("array 'particles' step 9" in d and "CRC32C checksum mismatch" in d for d in s["damage"])
    full = report.summary(run, verify=True)
    bad = {d.split(":")[0] for d in full["damage"]}
    assert bad == {"array 'mean' step 3", "array 'particles' step 9"}, full["damage"]
    assert f"{store}/mean/c/3/0/0/0: does not decode (CRC32C checksum mismatch)" in "\n".join(full["damage"])
    text = table.inspect_run(run, verify=True)
    assert "integrity (every chunk checked): 2 bad chunk(s)" in text and "finished" in text

    paths = report.make_report(run)
    assert len(paths) == 5 and all(p.stat().st_size > 10_000 for p in paths)
    curves = json.loads((run / "report" / "curves.json").read_text())
    assert curves["rel_l2_mean"][3] is None and curves["spread_mean"][3] is None
    assert all(v is not None for i, v in enumerate(curves["rel_l2_mean"]) if i != 3)
    assert curves["calibration"]["steps"] == [] and len(curves["damage"]) == 2
