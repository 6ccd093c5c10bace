"""Studies (`enkg-dist sweep STUDY.yaml`): a base job and a grid of settings, each grid point an ordinary run
directory under the study directory, run by the runner as `enkg-dist run` runs it; one table and its figures.

A study file (StudySpec): `name` (default: the file's name), `job` (a job YAML relative to the study file, or
builtin:NAME; omitted: the default job), `set` (overrides of every point: a mapping of dotted keys, or a list of
KEY=VALUE), `grid` (dotted config keys, each with a list of values: their cartesian product), `study_dir` (default
studies/NAME, relative to the working directory) and `parallel` (points at once; 1: one after another, here).

The study directory holds study.json (every point and its overrides), one run directory per point (named from its
grid settings and a hash of the job with its overrides; point.json beside the run's files), results.csv (one row
per point: grid settings, status, the scalars of metrics.json and, from the store, the forward runs, the committed
steps and the time per step) and the figures of the keys that vary (plots.study_figures).

Run again, a sweep continues where it stopped: a point with metrics.json is done and skipped, a point with a run
directory is resumed by `runner.resume` (as `enkg-dist resume`), a failed point (failed.json) is skipped unless
retried. This module orchestrates only: the runs are the runner's.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import itertools
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from enkg_dist import config as cfgmod
from enkg_dist import interrupt, rundir, schema
from enkg_dist.phases import PHASES  # step_seconds_<phase>: mean over the steps
from enkg_dist.schema import ConfigError

STUDY_FILE, POINT_FILE, FAILED_FILE, TABLE_FILE = "study.json", "point.json", "failed.json", "results.csv"
STATUSES = ("done", "partial", "failed", "pending")
# metrics.json keys in the order the table shows them (any other scalar follows, sorted)
METRIC_ORDER = ("J", "rel_l2_mean", "rel_l2_particles", "rel_l2_particles_std", "spread", "spread_skill", "crps",
                "posterior_mean_rel_l2", "posterior_spread", "posterior_crps", "spread_ratio", "ratio_to_bayes",
                "forward_evaluations", "failed_evaluations", "skipped_evaluations", "resumed_from_step",
                "wall_seconds", "method", "backend")
# from the run store (report.summary): totals over every process that worked on the run, resumptions included
STORE_COLUMNS = ("forward_runs", "committed_steps", "num_steps", "step_seconds_total", "step_seconds_mean",
                 *(f"step_seconds_{p}" for p in PHASES))


class StudySpec(BaseModel):
    """A study file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(None, description="the study's name (default: the study file's name)")
    job: str | None = Field(None, description="base job: a YAML path relative to the study file, or builtin:NAME")
    set: dict[str, Any] | list[str] = Field(default_factory=dict, description="overrides of every point")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="config key -> values (cartesian product)")
    study_dir: str | None = Field(None, description="default studies/NAME (relative to the working directory)")
    parallel: int = Field(1, ge=1, description="points run at once (1: one after another, in this process)")

    @field_validator("grid")
    @classmethod
    def _values(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not key.strip() or "=" in key:
                raise ValueError(f"{key!r}: a grid key is a dotted config key, e.g. enkg.ensemble_size")
            if not values:
                raise ValueError(f"{key}: an empty list of values")
            seen = [_text(v) for v in values]
            dup = next((v for i, v in enumerate(seen) if v in seen[:i]), None)
            if dup is not None:
                raise ValueError(f"{key}: the value {dup} is listed twice")
        return grid

    @field_validator("name")
    @classmethod
    def _name(cls, name: str | None) -> str | None:
        if name is not None and not re.fullmatch(r"[A-Za-z0-9._+=-]+", name):
            raise ValueError(f"{name!r}: use letters, digits and . _ + = - only")
        return name


@dataclass
class Point:
    """One grid point: its settings (grid key -> value), every override of the base job, its resolved config and
    its run directory's name."""

    index: int
    settings: dict[str, Any]
    overrides: list[str]
    cfg: cfgmod.RunConfig
    name: str


@dataclass
class Study:
    name: str
    file: Path | None
    dir: Path
    job: str | None
    parallel: int
    grid: dict[str, list[Any]]
    points: list[Point]


def _text(value: Any) -> str:
    """A value as one override's VALUE (JSON is YAML): parse_value gives the value back."""
    return json.dumps(value, default=str)


def _slug(settings: dict[str, Any]) -> str:
    text = "-".join(f"{k}={v if isinstance(v, (str, int, float)) else _text(v)}" for k, v in settings.items())
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", text)[:100] or "base"


def point_hash(job: str | None, overrides: list[str]) -> str:
    """8 hex digits of the job as written with the point's overrides applied, without the keys that only name the
    run: a key that a later version adds with its default changes no point's name (call after load_config)."""
    text = (cfgmod.default_job_text() if job is None else cfgmod.builtin_job_text(job.split(":", 1)[1])
            if job.startswith("builtin:") else Path(job).read_text())
    data = {k: v for k, v in schema.apply_overrides(yaml.safe_load(text), overrides).items()
            if k not in ("name", "output_dir")}
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:8]


def load_study(path: str | Path, study_dir: str | Path | None = None) -> Study:
    """Read and validate a study file and every point's config (one-line errors naming the bad key)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study error: study file {str(path)!r} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError, RecursionError) as e:
        first = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"study error: {path}: not a readable YAML file ({first})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"study error: {path}: a study is a mapping (job, set, grid, ...), got "
                          f"{type(data).__name__}")
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as e:
        raise ConfigError(schema.one_line_error(e, StudySpec, "study error")) from None
    name = spec.name or re.sub(r"[^A-Za-z0-9._+=-]", "_", path.stem)
    job = spec.job
    if job is not None and not job.startswith("builtin:") and not Path(job).is_absolute():
        job = str(path.parent / job)
    base = (list(spec.set) if isinstance(spec.set, list) else [f"{k}={_text(v)}" for k, v in spec.set.items()])
    keys = list(spec.grid)
    points = []
    for i, values in enumerate(itertools.product(*(spec.grid[k] for k in keys))):
        settings = dict(zip(keys, values))
        overrides = base + [f"{k}={_text(v)}" for k, v in settings.items()]
        cfg = cfgmod.load_config(job, overrides)
        pname = f"{_slug(settings)}-{point_hash(job, overrides)}"
        points.append(Point(i, settings, overrides, cfg.model_copy(update={"name": f"{name}.{pname}"}), pname))
    where = Path(study_dir) if study_dir is not None else Path(spec.study_dir or Path("studies") / name)
    return Study(name, path, where, job, spec.parallel, dict(spec.grid), points)


# ---- the state of a study directory


def is_study_dir(path: str | Path) -> bool:
    return (Path(path) / STUDY_FILE).is_file()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def point_status(run_dir: Path) -> str:
    """done (metrics.json), failed (failed.json, or the run stopped itself: stopped.json), partial (a run directory
    with its config), pending (nothing yet)."""
    if (run_dir / "metrics.json").is_file():
        return "done"
    if (run_dir / FAILED_FILE).is_file() or (run_dir / "stopped.json").is_file():
        return "failed"
    return "partial" if (run_dir / "config.yaml").is_file() else "pending"


def _write_study(study: Study) -> None:
    study.dir.mkdir(parents=True, exist_ok=True)
    doc = {"name": study.name, "study_file": str(study.file) if study.file else None, "job": study.job,
           "grid": study.grid, "points": [{"name": p.name, "settings": p.settings, "overrides": p.overrides}
                                          for p in study.points]}
    rundir.write_atomic(study.dir / STUDY_FILE, json.dumps(doc, indent=1, default=str))


def _store_columns(run_dir: Path) -> dict:
    """Totals from the run store (over every process that worked on it); empty when there is none to read."""
    if not (run_dir / "config.yaml").is_file():
        return {}
    from enkg_dist import report

    try:
        s = report.summary(run_dir)
    except Exception:  # noqa: BLE001 - a store being created or damaged: the row says what metrics.json says
        return {}
    seconds = [r["seconds"] for r in s["steps"] if r["seconds"] is not None]
    return {"forward_runs": s["forward_evaluations"], "committed_steps": s["committed_steps"],
            "num_steps": s["num_steps"], "step_seconds_total": sum(seconds) if seconds else None,
            "step_seconds_mean": sum(seconds) / len(seconds) if seconds else None,
            **{f"step_seconds_{p}": v / len(seconds) for p, v in s["phase_seconds"].items() if seconds}}


def collect(study_dir: str | Path) -> list[dict]:
    """One row per point of the study directory, in grid order: point, status, the grid settings, the scalars of
    metrics.json, the store's totals (STORE_COLUMNS) and, for a failed point, its error."""
    study_dir = Path(study_dir)
    doc = _read_json(study_dir / STUDY_FILE)
    if doc is None:
        raise ConfigError(f"study error: {study_dir} is not a study directory (no readable {STUDY_FILE})")
    rows = []
    for p in doc["points"]:
        d = study_dir / p["name"]
        row: dict[str, Any] = {"point": p["name"], "status": point_status(d), **p["settings"]}
        metrics = _read_json(d / "metrics.json") or {}
        row.update({k: v for k, v in metrics.items() if v is None or isinstance(v, (bool, int, float, str))})
        row.update(_store_columns(d))
        if row["status"] == "failed":
            why = _read_json(d / FAILED_FILE) or _read_json(d / "stopped.json") or {}
            row["error"] = " ".join(str(why.get("error") or why.get("reason") or "").split())
        rows.append(row)
    return rows


def columns(rows: list[dict], grid_keys: list[str]) -> list[str]:
    seen = {k for r in rows for k in r}
    head = ["point", "status", *grid_keys]
    metrics = [k for k in METRIC_ORDER if k in seen]
    rest = sorted(seen - set(head) - set(metrics) - set(STORE_COLUMNS) - {"error"})
    return head + metrics + rest + [k for k in STORE_COLUMNS if k in seen] + (["error"] if "error" in seen else [])


def _cell(v: Any) -> str:
    if v is None:
        return ""
    return v if isinstance(v, str) else repr(v) if isinstance(v, float) else _text(v) if isinstance(
        v, (list, dict)) else str(v)


def write_table(study_dir: str | Path, rows: list[dict] | None = None) -> Path:
    """results.csv: one row per point (written atomically)."""
    study_dir = Path(study_dir)
    rows = collect(study_dir) if rows is None else rows
    grid_keys = list((_read_json(study_dir / STUDY_FILE) or {}).get("grid", {}))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    cols = columns(rows, grid_keys)
    writer.writerow(cols)
    for r in rows:
        writer.writerow([_cell(r.get(c)) for c in cols])
    rundir.write_atomic(study_dir / TABLE_FILE, buf.getvalue())
    return study_dir / TABLE_FILE


def write_outputs(study_dir: str | Path) -> list[Path]:
    """The table and the figures of the keys that vary, from what the study directory holds now."""
    from enkg_dist.plots import study_figures

    study_dir = Path(study_dir)
    rows = collect(study_dir)
    grid = (_read_json(study_dir / STUDY_FILE) or {}).get("grid", {})
    return [write_table(study_dir, rows), *study_figures(rows, list(grid), study_dir)]


# ---- running


def _one_line(e: BaseException) -> str:
    if isinstance(e, (OSError, MemoryError)):
        return rundir.fault_line(e)
    return schema.printable(str(e).splitlines()[0] if str(e).strip() else type(e).__name__)


def run_point(study: Study, p: Point, progress: bool = False, address: str | None = None,
              retry_failed: bool = False) -> str:
    """Run, resume or skip one point; its status afterwards (done, failed, or busy: another driver holds it).
    interrupt.Interrupted propagates (the run stopped at a step boundary, every complete step committed)."""
    from enkg_dist import runner

    d = study.dir / p.name
    status = point_status(d)
    if status == "done" or (status == "failed" and not retry_failed):
        return f"{status} earlier: skipped" + (" (--retry-failed runs it again)" if status == "failed" else "")
    d.mkdir(parents=True, exist_ok=True)
    if not (d / POINT_FILE).is_file():
        rundir.write_atomic(d / POINT_FILE, json.dumps({"study": study.name, "index": p.index, "settings": p.settings,
                                                        "overrides": p.overrides}, indent=1, default=str))
    (d / FAILED_FILE).unlink(missing_ok=True)
    (d / "stopped.json").unlink(missing_ok=True)  # retried: the run continues from its last committed step
    try:
        if (d / "config.yaml").is_file():  # a run directory: continue it as `enkg-dist resume` does
            runner.resume(d, progress=progress, address=address)
        else:
            runner.run(p.cfg, d, progress=progress, address=address)
    except rundir.RunDirLocked:
        return "busy"
    except (ConfigError, ValueError, RuntimeError, OSError, MemoryError) as e:
        rundir.write_atomic(d / FAILED_FILE, json.dumps({"error": _one_line(e), "type": type(e).__name__}))
        return "failed"
    return "done"


def _line(study: Study, p: Point, status: str) -> str:
    settings = " ".join(f"{k}={v}" for k, v in p.settings.items()) or "(base job)"
    return f"[{p.index + 1}/{len(study.points)}] {settings}: {status} ({study.dir / p.name})"


def run_study(study: Study, progress: bool = False, address: str | None = None, retry_failed: bool = False,
              parallel: int | None = None, only: str | None = None,
              echo: Callable[[str], None] = lambda s: None) -> list[dict]:
    """Run every point not done yet (one after another in this process, or `parallel` at once as `enkg-dist sweep
    --only POINT` processes), then write the table and the figures; the rows of the table. `only`: that point alone,
    no table (what a parallel sweep's processes do). On an interrupt the table is written and Interrupted
    propagates; a point that is running stops at a step boundary and a later sweep resumes it."""
    if only is not None:
        p = next((q for q in study.points if q.name == only), None)
        if p is None:
            raise ConfigError(f"study error: --only {only!r}: no such point in {study.file}")
        echo(_line(study, p, run_point(study, p, progress, address, retry_failed)))
        return []
    _write_study(study)
    n = parallel or study.parallel
    try:
        if n > 1:
            _run_processes(study, n, address, retry_failed, echo)
        else:
            for p in study.points:
                interrupt.check()
                echo(_line(study, p, run_point(study, p, progress, address, retry_failed)))
    finally:
        write_outputs(study.dir)
    return collect(study.dir)


def _run_processes(study: Study, n: int, address: str | None, retry_failed: bool,
                   echo: Callable[[str], None]) -> None:
    """`n` points at once, each in its own `enkg-dist sweep --only` process (its own session: a terminal's Ctrl-C
    reaches this process only, which stops them with one SIGTERM each); their output goes to RUN_DIR/sweep.log."""
    todo = [p for p in study.points if (s := point_status(study.dir / p.name)) not in ("done", "failed")
            or (s == "failed" and retry_failed)]
    for p in study.points:
        if p not in todo:
            echo(_line(study, p, point_status(study.dir / p.name)))
    running: dict[str, tuple[Point, subprocess.Popen, Any]] = {}
    try:
        while todo or running:
            interrupt.check()
            while todo and len(running) < n:
                p = todo.pop(0)
                (study.dir / p.name).mkdir(parents=True, exist_ok=True)
                log = open(study.dir / p.name / "sweep.log", "ab")
                cmd = [sys.executable, "-m", "enkg_dist.cli", "sweep", str(study.file), "--only", p.name,
                       "--study-dir", str(study.dir), "--no-progress", *(["--retry-failed"] if retry_failed else []),
                       *(["--address", address] if address else [])]
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                running[p.name] = (p, proc, log)
            for p, proc, log in list(running.values()):
                if proc.poll() is not None:
                    log.close()
                    del running[p.name]
                    status = point_status(study.dir / p.name)
                    echo(_line(study, p, status + (f" (exit {proc.returncode}; see sweep.log)"
                                                   if status != "done" else "")))
            time.sleep(0.2)
    finally:
        for _, proc, _ in running.values():
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGTERM)  # each stops at its next step boundary
        for p, proc, log in running.values():
            proc.wait()
            log.close()
            echo(_line(study, p, f"{point_status(study.dir / p.name)} (stopped; exit {proc.returncode})"))


# ---- a study directory, for `enkg-dist inspect`


def summary(study_dir: str | Path) -> dict:
    """Counts of points by status and the rows of the table."""
    study_dir = Path(study_dir)
    rows = collect(study_dir)
    doc = _read_json(study_dir / STUDY_FILE) or {}
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    return {"study_dir": str(study_dir), "name": doc.get("name"), "study_file": doc.get("study_file"),
            "grid": doc.get("grid", {}), "points": len(rows), "counts": counts, "rows": rows,
            "table": str(study_dir / TABLE_FILE) if (study_dir / TABLE_FILE).is_file() else None,
            "figures": sorted(str(p) for p in study_dir.glob("*.png"))}
