"""Analysis of a run store: a per-step table (`inspect_run`) and PNG figures (`make_report`).

Everything is read lazily through `enkg_dist.store.open_xarray` (dask arrays, one task per step) and reduced step by
step, so a report works on runs larger than memory, and on a run still being written: only steps up to the commit
marker count. The one exception is the failure reasons, which are read only for the members whose status says they
failed (one small chunk each, straight from the Zarr array).

    summary(run_dir) -> dict          structured totals and per-step rows
    inspect_run(run_dir) -> str       the same as a text table
    make_report(run_dir, out_dir=None) -> list[Path]   PNG figures in RUN_DIR/report/ (and curves.json)

`run_dir` is a run directory (holding store.zarr, or config.yaml whose store.path names the store) or a store path.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections import Counter
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import xarray as xr

from enkg_dist.store import FAILED, NOT_RUN, OK, RunStore, open_xarray

STORE_NAME = "store.zarr"  # as enkg_dist.runner.STORE_NAME (not imported: runner pulls in torch and the backends)
FIGURES = ("reconstruction", "convergence", "failures", "spread")
_MAX_REASONS = 12  # distinct reasons listed by inspect_run; the rest are summed up in one line
_MAX_CATEGORIES = 6  # reason categories stacked in the failures figure; the rest are "other"


class ReportError(ValueError):
    """A run directory or store cannot be reported on; the message is one line."""


# ---- locating and reading


def _locate(run_dir) -> tuple[Path, str]:
    """(run directory, store path) for a run directory or a store path."""
    p = Path(run_dir)
    if (p / "zarr.json").is_file():  # the store itself
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
    raise ReportError(f"{run_dir} is not a run directory (no {STORE_NAME}, and no store.path in config.yaml)")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _open(store_path: str) -> xr.Dataset:
    try:
        return open_xarray(store_path)
    except FileNotFoundError:
        raise ReportError(f"run store {store_path}: no store there") from None


def _finite_or_none(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _category(reason: str) -> str:
    """A failure reason without its details: the text before the first ': ', numbers as '#'."""
    head = reason.split(": ", 1)[0].strip() or "(no reason recorded)"
    head = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "#", head)
    return head if len(head) <= 48 else head[:47] + "…"


def summary(run_dir) -> dict:
    """Totals and per-step rows of a run (committed steps only); JSON-serialisable.

    Keys: run_dir, store, name, method, J, num_steps, num_corrections, committed_steps, state ("finished",
    "stopped" or "in progress"), status (one line), steps (per committed step: step, sigma, ok, failed, misfit,
    weight (lists over corrections), seconds), forward_evaluations, failures, failures_by_reason,
    failures_by_category, failures_per_step_by_category, step_seconds, wall_seconds, created, committed_at,
    pending (the uncommitted next step's recorded evaluations, or None), stopped (stopped.json, or None),
    metrics (metrics.json, or None).
    """
    out_dir, store_path = _locate(run_dir)
    ds = _open(store_path)
    a = ds.attrs
    n, N, K, J = ds.sizes["step"], int(a["num_steps"]), int(a["num_corrections"]), int(a["J"])
    cfg = a.get("config") or {}
    rows, failed_at, step_seconds = [], [], 0.0
    reasons: list[str] = []
    if n:
        status = ds["status"]
        timing = list(ds["timing"].values)
        total = ds["timings"].isel(timing=timing.index("total")).data if "total" in timing else da.zeros(n)
        ok, failed, misfit, weight, sigma, seconds, s_idx, k_idx, j_idx = dask.compute(
            (status == OK).sum("member").data, (status == FAILED).sum("member").data, ds["misfit"].data,
            ds["weight"].data, ds["sigma"].data, total, *da.nonzero(status.data == FAILED))
        K_rows = ok.shape[1]  # a store made with 0 corrections has one (unused) correction column
        for s in range(n):
            run = [k for k in range(K_rows) if ok[s, k] + failed[s, k] > 0]
            rows.append({"step": s, "sigma": _finite_or_none(sigma[s]),
                         "ok": [int(ok[s, k]) for k in run], "failed": [int(failed[s, k]) for k in run],
                         "misfit": [_finite_or_none(misfit[s, k]) for k in range(K_rows)
                                    if math.isfinite(misfit[s, k]) or k in run],
                         "weight": [_finite_or_none(weight[s, k]) for k in range(K_rows)
                                    if math.isfinite(weight[s, k]) or k in run],
                         "seconds": _finite_or_none(seconds[s])})
        step_seconds = float(np.nansum(seconds))
        if len(s_idx):  # only the failed members' reason chunks are read
            with RunStore.open(store_path, "r", verify=False) as st:
                got = st.array("reason").get_coordinate_selection((s_idx, k_idx, j_idx))
            reasons = [str(r) or "(no reason recorded)" for r in np.asarray(got).reshape(-1)]
            failed_at = [int(s) for s in s_idx]
    by_reason = Counter(reasons)
    by_category = Counter(_category(r) for r in reasons)
    per_step: dict[str, list[int]] = {}
    for s, r in zip(failed_at, reasons):
        per_step.setdefault(_category(r), [0] * n)[s] += 1
    stopped = _read_json(out_dir / "stopped.json")
    metrics = _read_json(out_dir / "metrics.json")
    pending = _pending(store_path, n) if n < N else None
    state, line = _state(n, N, stopped, pending, a)
    evaluations = sum(sum(r["ok"]) + sum(r["failed"]) for r in rows)
    return {
        "run_dir": str(out_dir), "store": store_path, "name": cfg.get("name"), "method": cfg.get("method"),
        "J": J, "num_steps": N, "num_corrections": K, "committed_steps": n, "state": state, "status": line,
        "steps": rows, "forward_evaluations": evaluations, "failures": len(reasons),
        "failures_by_reason": dict(by_reason.most_common()), "failures_by_category": dict(by_category.most_common()),
        "failures_per_step_by_category": per_step, "step_seconds": step_seconds,
        "wall_seconds": (metrics or {}).get("wall_seconds") if n == N else None,
        "created": a.get("created"), "committed_at": a.get("committed_at"), "pending": pending,
        "stopped": stopped, "metrics": metrics,
    }


def _pending(store_path: str, n: int) -> dict | None:
    """How many evaluations of the next (uncommitted) step are recorded so far; None when unreadable."""
    try:
        with RunStore.open(store_path, "r", verify=False) as st:
            status = np.asarray(st.array("status")[n])
    except Exception:  # noqa: BLE001 - a live writer may be mid-way; this is informative only
        return None
    return {"step": n, "recorded": int((status != NOT_RUN).sum()), "failed": int((status == FAILED).sum())}


def _state(n: int, N: int, stopped: dict | None, pending: dict | None, attrs: dict) -> tuple[str, str]:
    if n >= N:
        return "finished", f"finished ({n} of {N} steps committed)"
    recorded = f"; step {n} has {pending['recorded']} evaluations recorded" if pending and pending["recorded"] else ""
    if stopped is not None and int(stopped.get("step", -1)) >= n:
        why = " ".join(str(stopped.get("reason", "")).split())
        return "stopped", f"stopped at step {stopped.get('step')} ({n} of {N} steps committed{recorded}): {why}"
    line = f"in progress or interrupted at step {n} ({n} of {N} steps committed"
    if attrs.get("committed_at") and n:
        line += f", last commit {attrs['committed_at']}"
    return "in progress", line + recorded + ")"


# ---- the text table


def _fmt(v, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec)


def inspect_run(run_dir, width: int = 120) -> str:
    """A text table of the committed steps (sigma, members ok/failed, misfit and weight per correction, step time)
    followed by the run's totals and status."""
    from rich.console import Console
    from rich.table import Table

    s = summary(run_dir)
    table = Table(title=f"{s['name'] or 'run'} ({s['method'] or '?'}): {s['run_dir']}", title_justify="left")
    for col, justify in (("step", "right"), ("sigma", "right"), ("ok/failed", "left"), ("misfit", "left"),
                         ("weight", "left"), ("time [s]", "right")):
        table.add_column(col, justify=justify, no_wrap=col in ("step", "sigma", "time [s]"))
    for r in s["steps"]:
        okf = " ".join(f"{o}/{f}" for o, f in zip(r["ok"], r["failed"])) or "-"
        table.add_row(str(r["step"]), _fmt(r["sigma"]), okf, " ".join(_fmt(v) for v in r["misfit"]) or "-",
                      " ".join(_fmt(v, ".3g") for v in r["weight"]) or "-", _fmt(r["seconds"], ".3g"))
    buf = io.StringIO()
    console = Console(file=buf, width=width, color_system=None, force_terminal=False, highlight=False,
                      emoji=False, markup=False)
    if s["steps"]:
        console.print(table)
    else:
        console.print(f"{s['run_dir']}: no step committed yet")
    lines = [
        f"status: {s['status']}",
        f"steps committed: {s['committed_steps']} of {s['num_steps']}",
        f"members: {s['J']}, corrections per step: {s['num_corrections']}",
        f"forward evaluations recorded: {s['forward_evaluations']}",
        f"failures: {s['failures']} of {s['forward_evaluations']} forward evaluations",
    ]
    items = list(s["failures_by_reason"].items())
    for reason, count in items[:_MAX_REASONS]:
        lines.append(f"  {count:6d}  {reason}")
    if len(items) > _MAX_REASONS:
        rest = sum(c for _, c in items[_MAX_REASONS:])
        lines.append(f"  {rest:6d}  ({len(items) - _MAX_REASONS} more distinct reasons)")
    wall = f"wall time: {s['step_seconds']:.3g} s in committed steps"
    if s["wall_seconds"] is not None:
        wall += f", {s['wall_seconds']:.3g} s for the run (metrics.json)"
    lines.append(wall)
    m = s["metrics"] if s["state"] == "finished" else None
    if m:
        keys = ("rel_l2_mean", "rel_l2_particles", "ratio_to_bayes", "spread", "spread_ratio")
        lines.append("metrics: " + "  ".join(f"{k}={m[k]:.4g}" for k in keys if isinstance(m.get(k), (int, float))))
    for line in lines:
        console.print(line, soft_wrap=True)
    return buf.getvalue().rstrip() + "\n"


# ---- figures


def _reference(cfg: dict):
    """(truth, observation image, exact-posterior (rel. L2 of its mean, its RMS std) or None) rebuilt from the
    stored config; (None, None, None) with a note when the problem cannot be rebuilt here."""
    from enkg_dist import config as cfgmod
    from enkg_dist import runner

    try:
        built = runner.build(cfgmod.validate(cfg))
    except Exception as e:  # noqa: BLE001 - an external problem may not be rebuildable on this machine
        return None, None, None, f"problem not rebuilt ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
    pb = built.problem
    truth = None if pb.x_true is None else pb.x_true.detach().cpu().double().numpy()
    obs = None if built.observation_image is None else built.observation_image.detach().cpu().double().numpy()
    post = None
    if built.posterior is not None and truth is not None:
        try:
            import torch

            m = built.posterior.mean(pb.y.to(torch.float64)).numpy()
            post = (float(np.linalg.norm(m - truth) / np.linalg.norm(truth)),
                    float(built.posterior.variance().mean().sqrt()))
        except Exception:  # noqa: BLE001 - a reference line only
            post = None
    return truth, obs, post, None


def report_data(run_dir, reference: tuple | None = None) -> dict:
    """The per-step curves the figures show, computed lazily (one dask task per step): step, sigma, misfit
    (per correction), rel_l2_mean (None without a truth), spread_mean (mean of std), spread_rms (sqrt of the mean
    variance: the `spread` of metrics.json), failures (per step, by category)."""
    s = summary(run_dir)
    ds = _open(s["store"])
    n = min(ds.sizes["step"], s["committed_steps"])
    ds = ds.isel(step=slice(0, n))
    truth, _, post, note = reference if reference is not None else _reference(ds.attrs.get("config") or {})
    state_dims = ds["mean"].dims[1:]
    lazy = {"spread_mean": ds["std"].mean(state_dims).data,
            "spread_rms": np.sqrt((ds["std"] ** 2).mean(state_dims)).data,
            "misfit": ds["misfit"].data, "sigma": ds["sigma"].data}
    if truth is not None:
        t = xr.DataArray(truth.reshape(ds["mean"].shape[1:]), dims=state_dims)
        lazy["rel_l2_mean"] = (np.sqrt(((ds["mean"] - t) ** 2).sum(state_dims)) / np.linalg.norm(truth)).data
    got = dict(zip(lazy, dask.compute(*lazy.values()))) if n else {k: np.zeros((0,)) for k in lazy}
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
        "posterior_mean_rel_l2": None if post is None else post[0],
        "posterior_spread": None if post is None else post[1],
        "note": note, "summary": s,
    }


def _nan(v) -> np.ndarray:
    return np.array([np.nan if x is None else x for x in v], dtype=np.float64)


def _figures(d: dict) -> dict:
    """Matplotlib figures (convergence, failures, spread) of report_data `d`; lines carry labels and gids."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, steps = d["summary"], np.array(d["step"])
    where = f"{s['name'] or 'run'}: {s['committed_steps']} of {s['num_steps']} steps ({s['state']})"
    figs = {}

    panels = 2 if d["rel_l2_mean"] is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.2 * panels, 4.2), constrained_layout=True, squeeze=False)
    ax = axes[0, 0]
    for k, m in enumerate(d["misfit"]):
        y = _nan(m)
        if np.isfinite(y).any():
            ax.plot(steps, y, "o-", ms=3, label=f"correction {k}", gid=f"misfit-{k}")
    ax.axhline(1.0, color="0.5", ls=":", lw=1, label="noise level (1)")
    ax.set(xlabel="step", ylabel="misfit (per observation, Γ-weighted)", title="data misfit")
    if any(np.isfinite(_nan(m)).any() and np.nanmin(_nan(m)) > 0 for m in d["misfit"]):
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if panels == 2:
        ax = axes[0, 1]
        ax.plot(steps, _nan(d["rel_l2_mean"]), "o-", ms=3, color="C3", label="ensemble mean", gid="rel_l2_mean")
        if d["posterior_mean_rel_l2"] is not None:
            ax.axhline(d["posterior_mean_rel_l2"], color="k", ls="--", lw=1, label="exact posterior mean")
        ax.set(xlabel="step", ylabel="‖mean − truth‖ / ‖truth‖", title="relative L2 error of the ensemble mean")
        if np.nanmin(np.r_[_nan(d["rel_l2_mean"]), np.inf]) > 0:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(where)
    figs["convergence"] = fig

    fig, ax = plt.subplots(figsize=(7.5, 4.2), constrained_layout=True)
    cats = sorted(d["failures"], key=lambda c: -sum(d["failures"][c]))
    shown, rest = cats[:_MAX_CATEGORIES], cats[_MAX_CATEGORIES:]
    series = [(c, np.array(d["failures"][c], dtype=float)) for c in shown]
    if rest:
        series.append(("other", np.sum([d["failures"][c] for c in rest], axis=0).astype(float)))
    bottom = np.zeros(len(steps))
    for i, (c, v) in enumerate(series):
        ax.bar(steps, v, bottom=bottom, color=f"C{i}", label=f"{c} ({int(v.sum())})", gid=f"failures-{i}")
        bottom += v
    evals = np.array([sum(r["ok"]) + sum(r["failed"]) for r in s["steps"]], dtype=float)
    ax.plot(steps, evals, "k.", ms=4, label="evaluations run", gid="evaluations")
    ax.set(xlabel="step", ylabel="members", title=f"failed forward evaluations: {s['failures']} of "
           f"{s['forward_evaluations']}")
    if len(steps):
        ax.set_xlim(-0.6, steps[-1] + 0.6)
    ax.set_ylim(0, max(1.0, float(np.max(evals, initial=0)) * 1.35))  # room for the legend above the dots
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(where)
    figs["failures"] = fig

    fig, ax = plt.subplots(figsize=(7.5, 4.2), constrained_layout=True)
    ax.plot(steps, _nan(d["spread_mean"]), "o-", ms=3, label="mean of std", gid="spread_mean")
    ax.plot(steps, _nan(d["spread_rms"]), "s--", ms=3, label="RMS of std (metrics 'spread')", gid="spread_rms")
    if d["posterior_spread"] is not None:
        ax.axhline(d["posterior_spread"], color="k", ls="--", lw=1, label="exact posterior RMS std")
    ax.set(xlabel="step", ylabel="ensemble std", title="ensemble spread")
    if np.nanmin(np.r_[_nan(d["spread_mean"]), np.inf]) > 0 and len(steps):
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(where)
    figs["spread"] = fig
    return figs


def make_report(run_dir, out_dir=None) -> list[Path]:
    """Write reconstruction.png, convergence.png, failures.png and spread.png (and curves.json, the plotted data)
    to `out_dir` (default RUN_DIR/report/); returns the PNG paths. Uses the committed steps only."""
    import matplotlib.pyplot as plt

    from enkg_dist.plots import reconstruction_figure

    run_path, store_path = _locate(run_dir)
    ds = _open(store_path)
    if ds.sizes["step"] == 0:
        raise ReportError(f"{run_dir}: no step committed yet, nothing to report")
    reference = _reference(ds.attrs.get("config") or {})
    d = report_data(run_dir, reference)
    n = len(d["step"])
    out = Path(out_dir) if out_dir is not None else run_path / "report"
    out.mkdir(parents=True, exist_ok=True)
    truth, obs, _, _ = reference
    last = ds.isel(step=n - 1)
    mean, std = dask.compute(last["mean"].data, last["std"].data)
    err = d["rel_l2_mean"][-1] if d["rel_l2_mean"] else None
    s = d["summary"]
    title = f"{s['name'] or 'run'}: step {n - 1} ({n} of {s['num_steps']} committed)"
    if err is not None:
        title += f", rel. L2 of mean {err:.3f}"
    paths = [reconstruction_figure(out / "reconstruction.png", truth, obs, mean, std, title=title)]
    for name, fig in _figures(d).items():
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    curves = {k: v for k, v in d.items() if k != "summary"}
    curves["committed_steps"], curves["state"] = n, s["state"]
    (out / "curves.json").write_text(json.dumps(curves, indent=1))
    return paths
