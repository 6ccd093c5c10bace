"""The text tables of `enkg-dist inspect`: a run (its committed steps, totals, status, metrics and damage) and a
study (its points)."""

from __future__ import annotations

import io

from enkg_dist.report import summary

_MAX_REASONS = 12  # distinct reasons listed; the rest are summed up in one line
_MAX_DAMAGE = 20  # bad chunks listed


def _fmt(v, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec)


def inspect_run(run_dir, width: int = 120, verify: bool = False) -> str:
    """A text table of the committed steps (sigma, members ok/failed, misfit and weight per correction, step time)
    followed by the run's totals, status, calibration metrics and any damage found."""
    from rich.console import Console
    from rich.table import Table

    s = summary(run_dir, verify=verify)
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
    phases = s.get("phase_seconds") or {}
    if phases and s["step_seconds"] > 0:
        lines.append("  of which " + ", ".join(f"{k} {v:.3g} s ({v / s['step_seconds']:.0%})"
                                               for k, v in phases.items()))
    m = s["metrics"] if s["committed_steps"] == s["num_steps"] else None
    if m:
        keys = ("rel_l2_mean", "rel_l2_particles", "ratio_to_bayes", "spread", "spread_ratio", "spread_skill",
                "crps", "posterior_crps")
        lines.append("metrics: " + "  ".join(f"{k}={m[k]:.4g}" for k in keys if isinstance(m.get(k), (int, float))))
    what = "every chunk checked" if s["verified"] else "per-step arrays and the newest ensemble checked"
    lines.append(f"integrity ({what}): " + (f"{len(s['damage'])} bad chunk(s)" if s["damage"] else "ok"))
    lines += [f"  {d}" for d in s["damage"][:_MAX_DAMAGE]]
    if len(s["damage"]) > _MAX_DAMAGE:
        lines.append(f"  ({len(s['damage']) - _MAX_DAMAGE} more)")
    for line in lines:
        console.print(line, soft_wrap=True)
    return buf.getvalue().rstrip() + "\n"


def _value(v) -> str:
    return "-" if v is None or v == "" else format(v, ".4g") if isinstance(v, float) else str(v)


def inspect_study(s: dict, width: int = 140) -> str:
    """The text of `enkg-dist inspect STUDY_DIR` from a study's summary (sweep.summary): one line per point (its
    grid settings, status, committed steps, error, spread-skill, CRPS, forward runs, time per step), then the
    points done / partial / failed / pending, the failures' errors, the table and the figures."""
    from rich.console import Console
    from rich.table import Table

    keys = list(s["grid"])
    shown = ["rel_l2_mean", "spread_skill", "crps", "forward_runs", "step_seconds_mean", "wall_seconds"]
    short = [k.split(".")[-1] for k in keys]
    heads = short if len(set(short)) == len(short) else keys  # the grid keys' last parts, when they differ
    table = Table(title=f"study {s['name']}: {s['study_dir']}", title_justify="left")
    for col in (*heads, "status", "steps", *shown):
        table.add_column(col, justify="left" if col in (*heads, "status") else "right")
    for r in s["rows"]:
        steps = f"{r['committed_steps']}/{r['num_steps']}" if r.get("num_steps") is not None else "-"
        table.add_row(*(_value(r.get(k)) for k in keys), r["status"], steps, *(_value(r.get(k)) for k in shown))
    buf = io.StringIO()
    console = Console(file=buf, width=width, color_system=None, force_terminal=False, highlight=False, emoji=False,
                      markup=False)
    console.print(table)
    c = s["counts"]
    lines = [f"points: {s['points']} (done {c['done']}, partial {c['partial']}, failed {c['failed']}, "
             f"pending {c['pending']})"]
    lines += [f"  failed {r['point']}: {r.get('error') or '?'}" for r in s["rows"] if r["status"] == "failed"]
    if c["done"] < s["points"] and s["study_file"]:
        lines.append(f"continue with: enkg-dist sweep {s['study_file']}")
    lines.append(f"table: {s['table'] or '(not written yet)'}")
    lines += [f"figure: {f}" for f in s["figures"]]
    for line in lines:
        console.print(line, soft_wrap=True)
    return buf.getvalue().rstrip() + "\n"
