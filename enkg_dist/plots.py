"""Figures of a run: the reconstruction (runner and report) and the report's per-step figures.

The reconstruction puts what is compared on one scale: truth, ensemble mean and their difference in model units on
one diverging scale; the observation (other units for a nonlinear problem) on its own; |error| beside the ensemble
std on one scale from 0; and a spread-skill panel (RMS error against ensemble std over pixels binned by std: a
calibrated ensemble lies on the diagonal). Every drawn line carries a `gid`, so tests can check what is drawn.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_MAX_CATEGORIES = 6  # reason categories stacked in the failures figure; the rest are "other"


def _field(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 1:
        side = int(round(np.sqrt(a.size)))
        if side * side != a.size:
            raise ValueError(f"cannot show {a.size} values as a square image")
        return a.reshape(side, side)
    return a.reshape(a.shape[-2], a.shape[-1])


def _image(fig, ax, img, title, cmap, vmin, vmax, gid):
    im = ax.imshow(img.T, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax)
    im.set_gid(gid)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(im, ax=ax, shrink=0.8)


def spread_error_bins(std, err, bins: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(RMS std, RMS error) over pixels grouped into `bins` quantile bins of the ensemble std."""
    s, e = np.ravel(std), np.ravel(err)
    order = np.argsort(s, kind="stable")
    groups = [g for g in np.array_split(order, min(bins, s.size)) if g.size]
    return (np.array([np.sqrt(np.mean(s[g] ** 2)) for g in groups]),
            np.array([np.sqrt(np.mean(e[g] ** 2)) for g in groups]))


def reconstruction_figure(path: str | Path, truth, observation, mean, std, title: str = "",
                          spread_skill: float | None = None) -> Path:
    """Truth, mean, mean - truth (one scale) and the observation (its own) above |error|, std (one scale) and the
    spread-skill panel; without a truth: mean and observation above std. Written as a PNG."""
    m, s = _field(mean), _field(std)
    t = None if truth is None else _field(truth)
    top = [("truth", t), ("ensemble mean", m), ("error: mean − truth", None if t is None else m - t)]
    top = [(name, img) for name, img in top if img is not None]
    vlim = max(float(np.abs(img).max()) for _, img in top) or 1.0
    cols = max(len(top) + (observation is not None), 3)
    fig, axes = plt.subplots(2, cols, figsize=(3.3 * cols, 6.6), constrained_layout=True, squeeze=False)
    for ax in axes.ravel():
        ax.set_visible(False)
    for i, (name, img) in enumerate(top):
        axes[0, i].set_visible(True)
        _image(fig, axes[0, i], img, name, "RdBu_r", -vlim, vlim, f"top-{name.split(':')[0]}")
    if observation is not None:
        o = _field(observation)
        olim = float(np.abs(o).max()) or 1.0
        axes[0, len(top)].set_visible(True)
        _image(fig, axes[0, len(top)], o, "observation (own scale)", "RdBu_r", -olim, olim, "observation")
    bottom = [("|mean − truth|", None if t is None else np.abs(m - t)), ("ensemble std", s)]
    bottom = [(name, img) for name, img in bottom if img is not None]
    ulim = max(float(img.max()) for _, img in bottom) or 1.0
    for i, (name, img) in enumerate(bottom):
        axes[1, i].set_visible(True)
        _image(fig, axes[1, i], img, name, "magma", 0.0, ulim, f"bottom-{name}")
    if t is not None:
        ax = axes[1, len(bottom)]
        ax.set_visible(True)
        x, y = spread_error_bins(s, m - t)
        top_v = max(float(x.max()), float(y.max())) * 1.1 or 1.0
        ax.plot([0, top_v], [0, top_v], color="0.5", ls=":", lw=1, label="calibrated", gid="diagonal")
        ax.plot(x, y, "o-", ms=4, color="C3", label="pixels binned by std", gid="spread-skill-bins")
        ax.set(xlim=(0, top_v), ylim=(0, top_v), xlabel="RMS ensemble std", ylabel="RMS error of the mean")
        ax.set_title("spread-skill" + (f": ratio {spread_skill:.2f}" if spread_skill is not None else ""),
                     fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ---- the report's per-step figures, from report.report_data


def _nan(v) -> np.ndarray:
    return np.array([np.nan if x is None else x for x in v], dtype=np.float64)


def _log_if_positive(ax, *series) -> None:
    values = np.concatenate([_nan(v) for v in series]) if series else np.zeros(0)
    if values.size and np.isfinite(values).any() and np.nanmin(values) > 0:
        ax.set_yscale("log")


def run_figures(d: dict) -> dict:
    """Matplotlib figures (convergence, failures, spread, calibration) of report data `d`."""
    s, steps = d["summary"], np.array(d["step"])
    where = f"{s['name'] or 'run'}: {s['committed_steps']} of {s['num_steps']} steps ({s['state']})"
    figs = {"convergence": _convergence(d, steps), "failures": _failures(d, steps, s),
            "spread": _spread(d, steps), "calibration": _calibration(d)}
    for fig in figs.values():
        fig.suptitle(where)
    return figs


def _convergence(d, steps):
    panels = 2 if d["rel_l2_mean"] is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.2 * panels, 4.2), constrained_layout=True, squeeze=False)
    ax = axes[0, 0]
    for k, m in enumerate(d["misfit"]):
        if np.isfinite(_nan(m)).any():
            ax.plot(steps, _nan(m), "o-", ms=3, label=f"correction {k}", gid=f"misfit-{k}")
    ax.axhline(1.0, color="0.5", ls=":", lw=1, label="noise level (1)")
    ax.set(xlabel="step", ylabel="misfit (per observation, Γ-weighted)", title="data misfit")
    _log_if_positive(ax, *d["misfit"])
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if panels == 2:
        ax = axes[0, 1]
        ax.plot(steps, _nan(d["rel_l2_mean"]), "o-", ms=3, color="C3", label="ensemble mean", gid="rel_l2_mean")
        if d["posterior_mean_rel_l2"] is not None:
            ax.axhline(d["posterior_mean_rel_l2"], color="k", ls="--", lw=1, label="exact posterior mean")
        ax.set(xlabel="step", ylabel="‖mean − truth‖ / ‖truth‖", title="relative L2 error of the ensemble mean")
        _log_if_positive(ax, d["rel_l2_mean"])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def _failures(d, steps, s):
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
    return fig


def _spread(d, steps):
    fig, ax = plt.subplots(figsize=(7.5, 4.2), constrained_layout=True)
    ax.plot(steps, _nan(d["spread_mean"]), "o-", ms=3, label="mean of std", gid="spread_mean")
    ax.plot(steps, _nan(d["spread_rms"]), "s--", ms=3, label="RMS of std (metrics 'spread')", gid="spread_rms")
    if d["posterior_spread"] is not None:
        ax.axhline(d["posterior_spread"], color="k", ls="--", lw=1, label="exact posterior RMS std")
    ax.set(xlabel="step", ylabel="ensemble std", title="ensemble spread")
    _log_if_positive(ax, d["spread_mean"])
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _calibration(d):
    """Spread-skill ratio and CRPS at the steps whose full ensemble is stored, and the truth's rank histogram."""
    c = d["calibration"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    if not c["steps"]:
        for ax in axes:
            ax.text(0.5, 0.5, c["note"] or "no calibration data", ha="center", va="center", wrap=True,
                    transform=ax.transAxes)
            ax.set_axis_off()
        return fig
    ax = axes[0]
    ax.plot(c["steps"], _nan(c["spread_skill"]), "o-", ms=4, color="C2", label="ensemble", gid="spread_skill")
    ax.axhline(1.0, color="0.5", ls=":", lw=1, label="calibrated (1)")
    ax.set(xlabel="step (full ensemble stored)", ylabel="spread / skill", title="spread-skill ratio")
    _log_if_positive(ax, c["spread_skill"])
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(c["steps"], _nan(c["crps"]), "o-", ms=4, color="C4", label="ensemble CRPS", gid="crps")
    if d.get("posterior_crps") is not None:
        ax.axhline(d["posterior_crps"], color="k", ls="--", lw=1, label="exact posterior's CRPS")
    ax.set(xlabel="step (full ensemble stored)", ylabel="CRPS (model units)", title="CRPS (lower is better)")
    _log_if_positive(ax, c["crps"])
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[2]
    hist = np.asarray(c["rank_histogram"] or [], dtype=float)
    if hist.size:
        ax.bar(np.arange(hist.size), hist, width=1.0, color="C0", gid="rank_histogram")
        ax.axhline(hist.sum() / hist.size, color="k", ls="--", lw=1, label="flat (calibrated)")
        ax.legend(fontsize=8)
    ax.set(xlabel="rank of the truth among the members", ylabel="pixels",
           title=f"rank histogram, step {c['rank_step']}")
    return fig


# ---- a study (enkg-dist sweep): its table's rows against the keys that vary


def _study_groups(rows: list[dict], keys: list[str]) -> dict[str, list[dict]]:
    """Rows grouped by the varying keys other than the x axis and the seeds (a seed's points are replicates)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        label = ", ".join(f"{k}={r.get(k)}" for k in keys if not k.split(".")[-1].endswith("seed"))
        groups.setdefault(label, []).append(r)
    return groups


def _study_panel(ax, rows, x, y, keys, i_gid: str) -> None:
    """Each group's points and the line through their means at each x."""
    seeds = [k.split(".")[-1] for k in keys if k.split(".")[-1].endswith("seed")]
    for i, (label, group) in enumerate(_study_groups(rows, keys).items()):
        label = (label or "all points") + (f" (mean over {', '.join(seeds)})" if seeds else "")
        pts = [(float(r[x]), float(r[y])) for r in group if isinstance(r.get(x), (int, float))
               and isinstance(r.get(y), (int, float))]
        if not pts:
            continue
        xs = sorted({p[0] for p in pts})
        means = [np.mean([p[1] for p in pts if p[0] == v]) for v in xs]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", ms=4, alpha=0.5, color=f"C{i}")
        ax.plot(xs, means, "-", color=f"C{i}", label=label, gid=f"{i_gid}-{y}-{i}")
    ys = [r[y] for r in rows if isinstance(r.get(y), (int, float)) and r[y] > 0]
    if ys and max(ys) > 4 * min(ys):
        ax.set_yscale("log")
    xs = sorted({float(r[x]) for r in rows if isinstance(r.get(x), (int, float))})
    if xs and xs[0] > 0 and xs[-1] > 4 * xs[0]:
        ax.set_xscale("log", base=2)
    if 0 < len(xs) <= 8:  # the grid's own values as the ticks
        ax.set_xticks(xs, [f"{v:g}" for v in xs])
        ax.minorticks_off()
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def study_figures(rows: list[dict], grid_keys: list[str], out_dir: str | Path) -> list[Path]:
    """PNGs of a study's finished points, only for the axes that vary: relative L2 error of the mean and
    spread-skill against J (when an ensemble_size is in the grid) and against the forward runs, and the time per
    step against execution.num_workers (when in the grid). Returns the paths written."""
    done = [r for r in rows if r.get("status") == "done"]
    varying = [k for k in grid_keys if len({repr(r.get(k)) for r in rows}) > 1]
    axes = []
    j_key = next((k for k in varying if k.endswith("ensemble_size")), None)
    if j_key is not None:
        axes.append(("J", "ensemble size J", "error_vs_J.png", [k for k in varying if k != j_key]))
    if len({r.get("forward_runs") for r in done}) > 1:
        axes.append(("forward_runs", "forward runs (simulator evaluations)", "error_vs_forward_runs.png",
                     [k for k in varying if k != j_key]))
    paths = []
    for x, xlabel, name, others in axes:
        fig, (a0, a1) = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
        exact = [r["posterior_mean_rel_l2"] for r in done if isinstance(r.get("posterior_mean_rel_l2"), float)]
        if exact:
            a0.axhline(float(np.mean(exact)), color="k", ls="--", lw=1, label="exact posterior mean (mean of all)")
        _study_panel(a0, done, x, "rel_l2_mean", others, x)
        a0.set(xlabel=xlabel, ylabel="‖mean − truth‖ / ‖truth‖", title="relative L2 error of the ensemble mean")
        _study_panel(a1, done, x, "spread_skill", others, x)
        a1.axhline(1.0, color="0.5", ls=":", lw=1)
        a1.set(xlabel=xlabel, ylabel="spread / skill", title="spread-skill ratio (1: calibrated)")
        paths.append(_save(fig, Path(out_dir) / name))
    if "execution.num_workers" in varying:
        fig, ax = plt.subplots(figsize=(6.5, 4.2), constrained_layout=True)
        _study_panel(ax, done, "execution.num_workers", "step_seconds_mean",
                     [k for k in varying if k != "execution.num_workers"], "W")
        ax.set(xlabel="simulator workers W", ylabel="seconds per step (mean)", title="time per step")
        paths.append(_save(fig, Path(out_dir) / "step_time_vs_workers.png"))
    return paths


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
