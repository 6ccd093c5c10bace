"""Command line: `enkg-dist run [JOB.yaml] [--set key=value ...] [--dry-run]`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from enkg_dist import config as cfgmod
from enkg_dist import interrupt

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Ensemble Kalman Diffusion Guidance, distributed.")


def _version(value: bool) -> None:
    if value:
        from enkg_dist import package_version

        typer.echo(f"enkg-dist {package_version()}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """enkg-dist: EnKG inversions of black-box simulators, in-process or on Ray."""


def _fail(msg: str) -> None:
    typer.echo(f"error: {cfgmod.printable(msg)}", err=True)
    raise typer.Exit(2)


# what a user's job, directory or machine can cause: one line each, never a traceback
_FAULTS = (cfgmod.ConfigError, ValueError, RuntimeError, OSError, MemoryError)


def _fault(e: BaseException) -> None:
    if isinstance(e, (OSError, MemoryError)):
        from enkg_dist.rundir import fault_line

        _fail(fault_line(e))
    _fail(str(e).splitlines()[0] if str(e).strip() else type(e).__name__)


def _interrupted(e: interrupt.Interrupted) -> None:
    typer.echo(e.message(), err=True)
    raise typer.Exit(interrupt.EXIT_INTERRUPTED)


@app.command()
def run(
    job: Optional[Path] = typer.Argument(None, help="job YAML; the embedded default job when omitted"),
    set_: list[str] = typer.Option([], "--set", help="override a key: --set enkg.ensemble_size=512"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate and print the resolved config, the budget of "
                                 "forward runs and the driver's memory estimate"),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="write here instead of output_dir/NAME-TIME"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    address: Optional[str] = typer.Option(None, "--address", help="run on Ray: 'auto', HOST:PORT"),
):
    """Run an EnKG (or EKI) inversion."""
    try:
        cfg = cfgmod.load_config(job, set_)
    except cfgmod.ConfigError as e:
        _fail(str(e))
    from enkg_dist import api, assembly, runner  # torch and Ray: after the job is known to be valid

    if dry_run:
        typer.echo(cfgmod.dump(cfg), nl=False)
        typer.echo(f"# budget: {json.dumps(runner.forward_budget(cfg))}")
        from enkg_dist import budget

        typer.echo(f"# memory: {json.dumps(budget.describe(cfg))}")
        try:
            typer.echo(f"# devices: {json.dumps(assembly.devices_plan(cfg, address))}")
            budget.check_memory(cfg)
        except cfgmod.ConfigError as e:
            _fail(str(e))
        return
    try:
        with interrupt.stop_on_signals():
            result = api.run(cfg, run_dir=run_dir, progress=progress, address=address)
        out, metrics = result.run_dir, result.metrics
    except interrupt.Interrupted as e:
        _interrupted(e)
    except _FAULTS as e:
        _fault(e)
    keys = ["rel_l2_particles", "rel_l2_mean", "spread_skill", "crps", "posterior_mean_rel_l2", "ratio_to_bayes",
            "spread_ratio", "forward_evaluations", "wall_seconds"]
    typer.echo(f"run directory: {out}")
    typer.echo("  ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics))


@app.command("resume")
def resume_cmd(
    run_dir: Path = typer.Argument(..., help="a run directory (holds config.yaml and store.zarr)"),
    set_: list[str] = typer.Option([], "--set", help="change a key that may change between resumptions: "
                                   "execution.*, store.checkpoint_every, ... (others are refused, naming them)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    address: Optional[str] = typer.Option(None, "--address", help="run on Ray: 'auto', HOST:PORT"),
):
    """Continue a run from its last committed step (bit-identical to an uninterrupted run)."""
    from enkg_dist import api

    try:
        with interrupt.stop_on_signals():
            result = api.resume(run_dir, progress=progress, address=address, overrides=set_)
        out, metrics = result.run_dir, result.metrics
    except interrupt.Interrupted as e:
        _interrupted(e)
    except _FAULTS as e:
        _fault(e)
    step = metrics["resumed_from_step"]
    typer.echo(f"run directory: {out} " + (f"(resumed from step {step})" if step is not None else
                                           "(started afresh: nothing had been committed)"))


@app.command("sweep")
def sweep_cmd(
    study_file: Path = typer.Argument(..., help="study YAML: job, set, grid (key: [values]), study_dir, parallel"),
    study_dir: Optional[Path] = typer.Option(None, "--study-dir", help="instead of the study's study_dir"),
    parallel: Optional[int] = typer.Option(None, "--parallel", min=1, help="points at once, each in its own "
                                           "process (default: the study's parallel, 1: one after another here)"),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="run the failed points again (resumed)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the points, their run directories and budgets"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    address: Optional[str] = typer.Option(None, "--address", help="run every point on this Ray cluster"),
    only: Optional[str] = typer.Option(None, "--only", hidden=True, help="one point (a parallel sweep's process)"),
):
    """Run a study: a base job and a grid of settings, each point a resumable run directory; a table and figures."""
    from enkg_dist import sweep

    try:
        study = sweep.load_study(study_file, study_dir)
    except cfgmod.ConfigError as e:
        _fail(str(e))
    from enkg_dist import runner  # torch and Ray: after the study is known to be valid

    if dry_run:
        for p in study.points:
            typer.echo(f"{study.dir / p.name}  {sweep.point_status(study.dir / p.name)}  "
                       f"{' '.join(f'{k}={v}' for k, v in p.settings.items())}  "
                       f"{json.dumps(runner.forward_budget(p.cfg))}")
        return
    try:
        with interrupt.stop_on_signals():
            rows = sweep.run_study(study, progress=progress, address=address, retry_failed=retry_failed,
                                   parallel=parallel, only=only, echo=typer.echo)
    except interrupt.Interrupted as e:
        where = f" in {e.run_dir} at step {e.step}" if e.run_dir is not None else ""
        typer.echo(f"interrupted by {e.signame}{where}; continue with: enkg-dist sweep {study_file}", err=True)
        raise typer.Exit(interrupt.EXIT_INTERRUPTED)
    except _FAULTS as e:
        _fault(e)
    if only is not None:
        status = sweep.point_status(study.dir / only)
        raise typer.Exit(0 if status == "done" else 2)
    counts = {s: sum(r["status"] == s for r in rows) for s in sweep.STATUSES}
    typer.echo(f"study directory: {study.dir}  ({', '.join(f'{k} {v}' for k, v in counts.items() if v)})")
    typer.echo(f"table: {study.dir / sweep.TABLE_FILE}")
    if counts["failed"] or counts["partial"] or counts["pending"]:
        raise typer.Exit(1)


@app.command("inspect")
def inspect_cmd(run_dir: Path = typer.Argument(..., help="a run directory, a run store or a study directory"),
                as_json: bool = typer.Option(False, "--json", help="the summary as JSON"),
                verify: bool = typer.Option(False, "--verify", help="decode every chunk of the store (checksums) "
                                            "and name each bad one: array, step, file")):
    """Steps, members, failures, misfit, timings and integrity of a run (finished or in progress), as a table; for
    a study directory (enkg-dist sweep), its points: done, partial, failed, pending, with their metrics."""
    from enkg_dist import report, sweep, table

    try:
        if sweep.is_study_dir(run_dir):
            s = sweep.summary(run_dir)
            typer.echo(json.dumps(s, indent=1, default=str) if as_json else table.inspect_study(s), nl=as_json)
            return
        typer.echo(json.dumps(report.summary(run_dir, verify=verify), indent=1) if as_json else
                   table.inspect_run(run_dir, verify=verify), nl=as_json)
    except _FAULTS as e:
        _fault(e)


@app.command("report")
def report_cmd(run_dir: Path = typer.Argument(..., help="a run directory or a run store"),
               out: Optional[Path] = typer.Option(None, "--out", help="where the PNGs go (default RUN_DIR/report)"),
               verify: bool = typer.Option(True, "--verify/--no-verify", help="check every chunk first (damaged "
                                           "steps are left out and listed)")):
    """Figures of a run: reconstruction, misfit and error against step, failures per step, spread, calibration."""
    from enkg_dist import report

    try:
        paths = report.make_report(run_dir, out, verify=verify)
        for path in paths:
            typer.echo(str(path))
        damage = json.loads((paths[-1].parent / "curves.json").read_text())["damage"]
        if damage:
            typer.echo(f"warning: {len(damage)} bad chunk(s), left out of the figures; first: {damage[0]} (all: "
                       f"enkg-dist inspect --verify {run_dir})", err=True)
    except _FAULTS as e:
        _fault(e)


@app.command("generate-data")
def generate_data_cmd(
    path: str = typer.Argument(..., help="Zarr data set to write (resumed when it exists with the same parameters)"),
    n: int = typer.Option(64, help="grid N"),
    train: int = typer.Option(1024), val: int = typer.Option(16), test: int = typer.Option(16),
    alpha: float = typer.Option(2.5), tau: float = typer.Option(3.0), std: float = typer.Option(5.0),
    spinup: float = typer.Option(5.0, help="time units each GRF draw is evolved"),
    re: float = typer.Option(200.0, "--Re", help="Reynolds number of the solver (problem.Re of the jobs)"),
    seed: int = typer.Option(0), batch: int = typer.Option(32, help="samples per chunk and per solve"),
    dtype: str = typer.Option("float32"), threads: Optional[int] = typer.Option(None, help="torch threads"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Navier-Stokes training data from our own simulator: GRF initial fields evolved `spinup` time units."""
    from enkg_dist.data import generate_dataset

    try:
        out = generate_dataset(path, n=n, splits={"train": train, "val": val, "test": test}, alpha=alpha, tau=tau,
                               std=std, spinup=spinup, seed=seed, batch=batch, progress=progress, dtype=dtype,
                               threads=threads, Re=re)
    except (ValueError, RuntimeError) as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    typer.echo(json.dumps(out))


@app.command("train-prior")
def train_prior_cmd(
    data: Path = typer.Argument(..., help="Zarr data set from `enkg-dist generate-data` (train and val splits)"),
    out: Path = typer.Option(..., "--out", help="output directory: checkpoint.pt, prior.pt (EMA), log.jsonl"),
    config: Optional[Path] = typer.Option(None, "--config", help="train config YAML (TrainConfig keys, model: ...)"),
    set_: list[str] = typer.Option([], "--set", help="override a key: --set lr=1e-3 --set model.model_channels=16"),
    resume: bool = typer.Option(False, "--resume", help="continue from OUT/checkpoint.pt (its config is the base)"),
    steps: Optional[int] = typer.Option(None, "--steps", help="total optimizer steps"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Train the EDM UNet prior (multi-process: torchrun --nproc-per-node=K -m enkg_dist.cli train-prior ...)."""
    from enkg_dist.data import training_splits
    from enkg_dist.priors import training

    try:
        base = training.stored_config(out) if resume else None
        cfg = training.load_train_config(config, [*set_, *([f"steps={steps}"] if steps else [])], base)
        train_x, val_x, attrs = training_splits(data)
        summary = training.train_prior(train_x, val_x, attrs, str(data), out, cfg, resume=resume, progress=progress)
    except ValueError as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    if summary["rank"] == 0:
        typer.echo(json.dumps(summary))


@app.command("slurm")
def slurm_cmd(
    job: Path = typer.Argument(..., help="job YAML"),
    set_: list[str] = typer.Option([], "--set", help="override a key for the run: --set enkg.ensemble_size=1024"),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="run directory on shared storage "
                                           "(default: output_dir/NAME)"),
    nodes: int = typer.Option(1, min=1), cpus_per_task: int = typer.Option(4, "--cpus-per-task", min=1),
    gpus_per_node: int = typer.Option(0, "--gpus-per-node", min=0), time: str = typer.Option("04:00:00"),
    partition: Optional[str] = typer.Option(None), account: Optional[str] = typer.Option(None),
    job_name: Optional[str] = typer.Option(None, "--job-name"),
    output: Optional[str] = typer.Option(None, help="Slurm log file (default enkg-%j.out)"),
    warning: int = typer.Option(120, min=30, help="seconds before the walltime at which the run stops cleanly"),
    env: Optional[str] = typer.Option(None, help="venv, conda or none (default: the environment running this)"),
    env_path: Optional[str] = typer.Option(None, "--env-path", help="the venv directory or conda env"),
    modules: str = typer.Option("", help="environment modules to load before activation"),
    site_setup: str = typer.Option("", "--site-setup", help="shell commands after activation (exports, ...)"),
    ray_port: int = typer.Option(6379, "--ray-port"),
    ray_start_args: str = typer.Option("", "--ray-start-args", help="extra `ray start` options for every node"),
    sim_slots_gpu_node: Optional[int] = typer.Option(None, "--sim-slots-gpu-node", min=0,
                                                     help="simulator slots on GPU nodes (default CPUs - GPUs)"),
    template: Optional[Path] = typer.Option(None, help="the batch template (default cluster/slurm/enkg.sbatch)"),
):
    """Print a Slurm batch script for a job: `enkg-dist slurm JOB.yaml --nodes 4 > job.sbatch; sbatch job.sbatch`."""
    from enkg_dist.launch import slurm

    spec = slurm.SlurmJob(job, set_, run_dir, nodes=nodes, cpus_per_task=cpus_per_task, gpus_per_node=gpus_per_node,
                          time=time, partition=partition, account=account, job_name=job_name, output=output,
                          warning=warning, env_kind=env, env_path=env_path, modules=modules, site_setup=site_setup,
                          ray_port=ray_port, ray_start_args=ray_start_args, sim_slots_gpu_node=sim_slots_gpu_node)
    try:
        typer.echo(slurm.job_script(spec, template or slurm.TEMPLATE), nl=False)
    except (cfgmod.ConfigError, ValueError) as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


def _warning_line(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main() -> None:
    import warnings

    warnings.formatwarning = _warning_line  # a warning is one line, without the source line that raised it
    app(sys.argv[1:])


if __name__ == "__main__":
    main()
