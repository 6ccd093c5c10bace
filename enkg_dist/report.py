"""Analysis of a run store: a per-step summary (`summary`, shown by table.inspect_run) and PNG figures
(`make_report`).

Everything comes from what the run directory stored: the store's per-step arrays (read lazily through
`enkg_dist.store.open_xarray`: dask arrays, one task per step), the reference fields the runner stored at creation
(truth, observation, exact-posterior mean and variance) and metrics.json. Nothing is rebuilt and no simulator runs:
this module never imports the runner. Only steps up to the commit marker count, so a report works on a run still
being written. Damage is found before anything is computed (every chunk of the arrays read is decoded, its CRC32C
checked): the figures draw what is intact and the summary names each bad chunk (array, step, file).

    summary(run_dir, verify=False) -> dict   structured totals and per-step rows (table.inspect_run: as text)
    make_report(run_dir, out_dir=None) -> list[Path]   PNG figures in RUN_DIR/report/ (and curves.json)

`run_dir` is a run directory (holding store.zarr, or config.yaml whose store.path names the store) or a store path.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import xarray as xr

from enkg_dist.store import (FAILED, NOT_RUN, OK, RunStore, StoreError, open_xarray, probe, read_reference,
                             root_attrs, verify_store)

STORE_NAME = "store.zarr"  # as enkg_dist.runner.STORE_NAME (the report never imports the runner)
FIGURES = ("reconstruction", "convergence", "failures", "spread", "calibration")
SUMMARY_ARRAYS = ("status", "reason", "misfit", "weight", "sigma", "timings", "mean", "std")


class ReportError(ValueError):
    """A run directory or store cannot be reported on; the message is one line."""


# ---- locating and reading


def _locate(run_dir) -> tuple[Path, str]:
    """(run directory, store path) for a run directory or a store path."""
    p = Path(run_dir)
    if (p / "zarr.json").is_file() or (p / "recovery" / "zarr.json").is_file():  # the store itself
        return p.parent, str(p)
    if (p / STORE_NAME).exists():
        return p, str(p / STORE_NAME)
    cfg_file = p / "config.yaml"
    if cfg_file.is_file():
        import yaml

        try:
            path = ((yaml.safe_load(cfg_file.read_text()) or {}).get("store") or {}).get("path")
        except (yaml.YAMLError, AttributeError):
            path = None
        if path:
            return p, str(path)
    if probe(p / STORE_NAME) == "half-created":
        raise ReportError(f"run store {p / STORE_NAME}: its creation was interrupted before anything was committed; "
                          f"`enkg-dist resume {p}` starts the run afresh")
    raise ReportError(f"{run_dir} is not a run directory (no {STORE_NAME}, and no store.path in config.yaml)")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _open(store_path: str) -> xr.Dataset:
    try:
        return open_xarray(store_path)
    except (StoreError, FileNotFoundError) as e:
        raise ReportError(str(e).splitlines()[0]) from None


def _finite_or_none(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _category(reason: str) -> str:
    """A failure reason without its details: the text before the first ': ', numbers as '#'."""
    head = reason.split(": ", 1)[0].strip() or "(no reason recorded)"
    head = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "#", head)
    return head if len(head) <= 48 else head[:47] + "…"


def _damage(store_path: str, arrays, n: int) -> tuple[list[str], dict[str, set[int]]]:
    """(one line per bad chunk, bad steps by array) of `arrays` (None: every array) over the committed steps."""
    bad = verify_store(store_path, arrays=arrays, steps=n)
    by_array: dict[str, set[int]] = {}
    for b in bad:
        if b.step is not None:
            by_array.setdefault(b.array, set()).add(b.step)
    return [b.line() for b in bad], by_array


def _newest_ensemble_damage(store_path: str) -> list[str]:
    """The cheap check every inspect makes: the ensemble a resume would start from decodes."""
    try:
        with RunStore.open(store_path, "r", verify=False) as st:
            s = st.attrs.get("ensemble_step", st.committed_step)
            problem = st.check_step(s) if s is not None and s >= 0 else None
    except StoreError as e:
        return [str(e).splitlines()[0]]
    return [problem[0]] if problem else []


def _masked(ds: xr.Dataset, name: str, bad: set[int], n: int, reduce=None):
    """(dask data over the intact steps, their indices) of one array."""
    good = [s for s in range(n) if s not in bad]
    arr = ds[name].isel(step=good)
    return (reduce(arr) if reduce else arr).data, np.array(good, dtype=int)


def _spread_out(values: np.ndarray, good: np.ndarray, n: int) -> np.ndarray:
    out = np.full((n, *np.shape(values)[1:]), np.nan)
    if len(good):
        out[good] = values
    return out


def summary(run_dir, verify: bool = False) -> dict:
    """Totals and per-step rows of a run (committed steps only); JSON-serialisable.

    Keys: run_dir, store, name, method, J, num_steps, num_corrections, committed_steps, state ("finished",
    "stopped", "in progress" or "damaged"), status (one line), steps (per committed step: step, sigma, ok, failed,
    misfit, weight (lists over corrections), seconds), forward_evaluations, failures, failures_by_reason,
    failures_by_category, failures_per_step_by_category, step_seconds, phase_seconds (over the committed steps:
    denoise, forward, update, store; empty for older stores), wall_seconds, created, committed_at,
    pending, stopped (stopped.json, or None), metrics (metrics.json, or None), damage (one line per bad chunk;
    `verify`: every chunk of the store is checked, else the per-step arrays and the newest ensemble).
    """
    out_dir, store_path = _locate(run_dir)
    ds = _open(store_path)
    a = ds.attrs
    n, N, K, J = ds.sizes["step"], int(a["num_steps"]), int(a["num_corrections"]), int(a["J"])
    cfg = a.get("config") or {}
    damage, bad = _damage(store_path, None if verify else SUMMARY_ARRAYS, n)
    if not verify:
        damage += _newest_ensemble_damage(store_path)
    rows, failed_at, step_seconds, reasons, phase_seconds = [], [], 0.0, [], {}
    if n:
        timing = list(ds["timing"].values)
        parts = {
            "ok": _masked(ds, "status", bad.get("status", set()), n, lambda s: (s == OK).sum("member")),
            "failed": _masked(ds, "status", bad.get("status", set()), n, lambda s: (s == FAILED).sum("member")),
            "misfit": _masked(ds, "misfit", bad.get("misfit", set()), n),
            "weight": _masked(ds, "weight", bad.get("weight", set()), n),
            "sigma": _masked(ds, "sigma", bad.get("sigma", set()), n),
        }
        for field in timing:  # total, and the phases of stores that record them (phases.PhaseClock)
            key = "seconds" if field == "total" else f"seconds_{field}"
            parts[key] = _masked(ds, "timings", bad.get("timings", set()), n,
                                 lambda t, i=timing.index(field): t.isel(timing=i))
        status_good = parts["ok"][1]
        got = dask.compute({k: v[0] for k, v in parts.items()}, da.nonzero(
            (ds["status"].isel(step=list(status_good)).data == FAILED)))
        v = {k: _spread_out(np.asarray(got[0][k]), parts[k][1], n) for k in parts}
        if "seconds" not in v:
            v["seconds"] = np.full(n, np.nan)
        s_idx, k_idx, j_idx = (np.asarray(i) for i in got[1])
        s_idx = status_good[s_idx] if len(s_idx) else s_idx
        K_rows = v["ok"].shape[1]  # a store made with 0 corrections has one (unused) correction column
        for s in range(n):
            run = [k for k in range(K_rows) if (v["ok"][s, k] + v["failed"][s, k]) > 0]
            rows.append({"step": s, "sigma": _finite_or_none(v["sigma"][s]),
                         "ok": [int(v["ok"][s, k]) for k in run], "failed": [int(v["failed"][s, k]) for k in run],
                         "misfit": [_finite_or_none(v["misfit"][s, k]) for k in range(K_rows)
                                    if math.isfinite(v["misfit"][s, k]) or k in run],
                         "weight": [_finite_or_none(v["weight"][s, k]) for k in range(K_rows)
                                    if math.isfinite(v["weight"][s, k]) or k in run],
                         "seconds": _finite_or_none(v["seconds"][s])})
        step_seconds = float(np.nansum(v["seconds"]))
        phase_seconds = {k[len("seconds_"):]: float(np.nansum(v[k])) for k in v if k.startswith("seconds_")
                         and np.isfinite(v[k]).any()}
        reasons = _reasons(store_path, s_idx, k_idx, j_idx)
        failed_at = [int(s) for s in s_idx]
    by_reason = Counter(reasons)
    by_category = Counter(_category(r) for r in reasons)
    per_step: dict[str, list[int]] = {}
    for s, r in zip(failed_at, reasons):
        per_step.setdefault(_category(r), [0] * n)[s] += 1
    stopped = _read_json(out_dir / "stopped.json")
    metrics = _read_json(out_dir / "metrics.json")
    pending = _pending(store_path, n) if n < N else None
    state, line = _state(n, N, stopped, pending, a, damage)
    evaluations = sum(sum(r["ok"]) + sum(r["failed"]) for r in rows)
    return {
        "run_dir": str(out_dir), "store": store_path, "name": cfg.get("name"), "method": cfg.get("method"),
        "J": J, "num_steps": N, "num_corrections": K, "committed_steps": n, "state": state, "status": line,
        "steps": rows, "forward_evaluations": evaluations, "failures": len(reasons),
        "failures_by_reason": dict(by_reason.most_common()), "failures_by_category": dict(by_category.most_common()),
        "failures_per_step_by_category": per_step, "step_seconds": step_seconds, "phase_seconds": phase_seconds,
        "wall_seconds": (metrics or {}).get("wall_seconds") if n == N else None,
        "created": a.get("created"), "committed_at": a.get("committed_at"), "pending": pending,
        "stopped": stopped, "metrics": metrics, "damage": damage, "verified": verify,
        "bad_steps": {name: sorted(steps) for name, steps in bad.items()},
    }


def _reasons(store_path: str, s_idx, k_idx, j_idx) -> list[str]:
    """The failed members' reasons (only their chunks are read); a damaged reason chunk reads as such."""
    if not len(s_idx):
        return []
    with RunStore.open(store_path, "r", verify=False) as st:
        arr = st.array("reason")
        try:
            got = np.asarray(arr.get_coordinate_selection((s_idx, k_idx, j_idx))).reshape(-1)
        except Exception:  # noqa: BLE001 - a damaged chunk: read step by step, marking what is unreadable
            got = []
            for s, k, j in zip(s_idx, k_idx, j_idx):
                try:
                    got.append(arr[int(s), int(k), int(j)])
                except Exception:  # noqa: BLE001
                    got.append("(reason unreadable: damaged chunk)")
    return [str(r) or "(no reason recorded)" for r in got]


def _pending(store_path: str, n: int) -> dict | None:
    """How many evaluations of the next (uncommitted) step are recorded so far; None when unreadable."""
    try:
        with RunStore.open(store_path, "r", verify=False) as st:
            status = np.asarray(st.array("status")[n])
    except Exception:  # noqa: BLE001 - a live writer may be mid-way; this is informative only
        return None
    return {"step": n, "recorded": int((status != NOT_RUN).sum()), "failed": int((status == FAILED).sum())}


def _state(n: int, N: int, stopped: dict | None, pending: dict | None, attrs: dict,
           damage: list[str]) -> tuple[str, str]:
    hurt = f"; DAMAGED: {len(damage)} bad chunk(s), first: {damage[0]}" if damage else ""
    if n >= N:
        return ("damaged" if damage else "finished"), f"finished ({n} of {N} steps committed){hurt}"
    recorded = f"; step {n} has {pending['recorded']} evaluations recorded" if pending and pending["recorded"] else ""
    if stopped is not None and int(stopped.get("step", -1)) >= n:
        why = " ".join(str(stopped.get("reason", "")).split())
        return ("damaged" if damage else "stopped"), (f"stopped at step {stopped.get('step')} ({n} of {N} steps "
                                                      f"committed{recorded}): {why}{hurt}")
    line = f"in progress or interrupted at step {n} ({n} of {N} steps committed"
    if attrs.get("committed_at") and n:
        line += f", last commit {attrs['committed_at']}"
    return ("damaged" if damage else "in progress"), line + recorded + ")" + hurt


# ---- figures


def _reference(store_path: str) -> dict:
    """The reference fields stored at run time, and the exact posterior's own numbers computed by enkg_dist.metrics
    (posterior_mean_rel_l2, posterior_spread, posterior_crps) where there is one."""
    ref = read_reference(store_path)
    if "truth" in ref and "posterior_mean" in ref and "posterior_var" in ref:
        import torch

        from enkg_dist.metrics import posterior_metrics

        t, m, v = (torch.from_numpy(ref[k]) for k in ("truth", "posterior_mean", "posterior_var"))
        post = posterior_metrics({"spread": math.nan}, t, m, v)
        ref.update({k: post[k] for k in ("posterior_mean_rel_l2", "posterior_spread", "posterior_crps")})
    return ref


def _calibration(store_path: str, ds: xr.Dataset, truth, bad: dict[str, set[int]]) -> dict:
    """Spread-skill ratio and CRPS (enkg_dist.metrics) at each committed step whose full ensemble is stored, read one
    step at a time; the truth's rank histogram at the newest of them."""
    out = {"steps": [], "spread_skill": [], "crps": [], "rank_histogram": None, "rank_step": None, "note": None}
    if truth is None:
        out["note"] = "no truth stored: calibration needs the true field"
        return out
    import torch

    from enkg_dist.metrics import crps, rank_histogram, spread_skill

    kept = [int(s) for s in np.flatnonzero(ds["kept"].values) if int(s) not in bad.get("particles", set())]
    t = torch.from_numpy(np.asarray(truth, dtype=np.float64))
    with RunStore.open(store_path, "r", verify=False) as st:
        for s in kept:
            try:
                x = torch.from_numpy(np.asarray(st.read("particles", s), dtype=np.float64))
            except Exception:  # noqa: BLE001 - damage is listed by the summary
                continue
            out["steps"].append(s)
            out["spread_skill"].append(_finite_or_none(spread_skill(x, t)))
            out["crps"].append(_finite_or_none(crps(x, t)))
            last = x
    if out["steps"]:
        out["rank_step"] = out["steps"][-1]
        out["rank_histogram"] = rank_histogram(last, t)
    else:
        out["note"] = "no intact stored ensemble yet (full ensembles are kept every store.full_every steps)"
    return out


def report_data(run_dir, reference: dict | None = None, verify: bool = True) -> dict:
    """The per-step curves the figures show, computed lazily (one dask task per step) on the intact steps: step,
    sigma, misfit (per correction), rel_l2_mean (None without a truth), spread_mean (mean of std), spread_rms (sqrt
    of the mean variance: the `spread` of metrics.json), failures (per step, by category), calibration (spread-skill
    and CRPS at the stored ensembles, rank histogram). `reference`: the stored reference fields (read when None)."""
    s = summary(run_dir, verify=verify)
    ds = _open(s["store"])
    n = min(ds.sizes["step"], s["committed_steps"])
    ds = ds.isel(step=slice(0, n))
    ref = _reference(s["store"]) if reference is None else reference
    truth = ref.get("truth")
    bad = {name: set(steps) for name, steps in s["bad_steps"].items()}
    state_dims = ds["mean"].dims[1:]
    stat_bad = bad.get("mean", set()) | bad.get("std", set())
    lazy = {"spread_mean": _masked(ds, "std", stat_bad, n, lambda v: v.mean(state_dims)),
            "spread_rms": _masked(ds, "std", stat_bad, n, lambda v: np.sqrt((v ** 2).mean(state_dims))),
            "misfit": _masked(ds, "misfit", bad.get("misfit", set()), n),
            "sigma": _masked(ds, "sigma", bad.get("sigma", set()), n)}
    if truth is not None:
        t = xr.DataArray(np.asarray(truth).reshape(ds["mean"].shape[1:]), dims=state_dims)
        lazy["rel_l2_mean"] = _masked(ds, "mean", stat_bad, n, lambda v: np.sqrt(((v - t) ** 2).sum(state_dims))
                                      / np.linalg.norm(truth))
    got = dask.compute({k: v[0] for k, v in lazy.items()})[0] if n else {}
    got = {k: _spread_out(np.asarray(got[k]), lazy[k][1], n) if n else np.zeros((0,)) for k in lazy}
    K = s["num_corrections"]
    misfit = np.asarray(got["misfit"]).reshape(n, -1)[:, :max(K, 1)] if n else np.zeros((0, max(K, 1)))

    def clean(v):
        return [_finite_or_none(x) for x in np.asarray(v).reshape(-1)]

    return {
        "step": list(range(n)), "sigma": clean(got["sigma"]),
        "misfit": [clean(misfit[:, k]) for k in range(misfit.shape[1])],
        "rel_l2_mean": clean(got["rel_l2_mean"]) if "rel_l2_mean" in got else None,
        "spread_mean": clean(got["spread_mean"]), "spread_rms": clean(got["spread_rms"]),
        "failures": {c: v[:n] for c, v in s["failures_per_step_by_category"].items()},
        "posterior_mean_rel_l2": ref.get("posterior_mean_rel_l2"), "posterior_spread": ref.get("posterior_spread"),
        "posterior_crps": ref.get("posterior_crps"),
        "calibration": _calibration(s["store"], ds, truth, bad),
        "note": None if truth is not None else "no truth stored", "damage": s["damage"], "summary": s,
    }


def make_report(run_dir, out_dir=None, verify: bool = True) -> list[Path]:
    """Write reconstruction.png, convergence.png, failures.png, spread.png and calibration.png (and curves.json, the
    plotted data) to `out_dir` (default RUN_DIR/report/); returns the PNG paths. Uses the committed steps only;
    `verify` checks every chunk first (damaged steps are left out of the figures and listed in curves.json)."""
    import matplotlib.pyplot as plt

    from enkg_dist.plots import reconstruction_figure, run_figures

    run_path, store_path = _locate(run_dir)
    if int(root_attrs(store_path).get("committed_step", -1)) < 0:
        _open(store_path)  # a one-line error when there is no store at all
        raise ReportError(f"{run_dir}: no step committed yet, nothing to report")
    ref = _reference(store_path)
    d = report_data(run_dir, ref, verify=verify)
    n, s = len(d["step"]), d["summary"]
    out = Path(out_dir) if out_dir is not None else run_path / "report"
    out.mkdir(parents=True, exist_ok=True)
    good = [i for i in range(n) if d["spread_mean"][i] is not None]
    paths = []
    if good:
        last = _open(store_path).isel(step=good[-1])
        mean, std = dask.compute(last["mean"].data, last["std"].data)
        err = d["rel_l2_mean"][good[-1]] if d["rel_l2_mean"] else None
        title = f"{s['name'] or 'run'}: step {good[-1]} ({n} of {s['num_steps']} committed)"
        if err is not None:
            title += f", rel. L2 of mean {err:.3f}"
        ss = d["calibration"]["spread_skill"][-1] if d["calibration"]["steps"] and \
            d["calibration"]["steps"][-1] == good[-1] else None
        paths.append(reconstruction_figure(out / "reconstruction.png", ref.get("truth"),
                                           ref.get("observation_image"), mean, std, title=title, spread_skill=ss))
    for name, fig in run_figures(d).items():
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    curves = {k: v for k, v in d.items() if k != "summary"}
    curves["committed_steps"], curves["state"] = n, s["state"]
    (out / "curves.json").write_text(json.dumps(curves, indent=1))
    return paths
