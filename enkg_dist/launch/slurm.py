"""Fill the Slurm batch template (cluster/slurm/enkg.sbatch) for a job: plain text templating, no Ray, no Slurm.

The template has `#SBATCH --option=value` lines (a `##SBATCH` line is switched off) and a settings block of
`NAME=value` lines between `# >>> settings` and `# <<< settings`; `render` rewrites both.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from enkg_dist import config as cfgmod

TEMPLATE = Path(__file__).resolve().parents[2] / "cluster" / "slurm" / "enkg.sbatch"
_SBATCH = re.compile(r"^#{1,2}SBATCH --([a-z-]+)(=.*)?$")
_SETTING = re.compile(r"^([A-Z_]+)=")


@dataclass
class SlurmJob:
    """A job file and how to run it on Slurm: the allocation, the environment, Ray's options."""

    job_file: Path
    overrides: list[str] = field(default_factory=list)
    run_dir: Path | None = None  # default: output_dir/name of the job
    nodes: int = 1
    cpus_per_task: int = 4
    gpus_per_node: int = 0
    time: str = "04:00:00"
    partition: str | None = None
    account: str | None = None
    job_name: str | None = None  # default: the job's name
    output: str | None = None  # Slurm's log file (default: enkg-%j.out in the submit directory)
    warning: int = 120  # seconds before the walltime at which Slurm sends SIGTERM
    env_kind: str | None = None  # venv, conda or none; default: the environment running this command
    env_path: str | None = None
    modules: str = ""  # `module load` these first
    site_setup: str = ""  # shell commands after activation
    ray_port: int = 6379
    ray_start_args: str = ""
    sim_slots_gpu_node: int | None = None


def current_env() -> tuple[str, str]:
    """(kind, path) of the environment running this command: a venv, a conda env, or none."""
    if sys.prefix != sys.base_prefix:
        return "venv", sys.prefix
    if os.environ.get("CONDA_PREFIX"):
        return "conda", os.environ["CONDA_PREFIX"]
    return "none", ""


def run_args(cfg: cfgmod.RunConfig, overrides: list[str]) -> str:
    """`enkg-dist run` options: the overrides, and `sim` placement for simulator workers unless the job sets it."""
    sets = list(overrides)
    if "sim" not in cfg.execution.worker_resources:
        sets.append("execution.worker_resources.sim=1")
    return shlex.join(word for s in sets for word in ("--set", s))


def sbatch_options(job: SlurmJob, name: str) -> dict[str, str | None]:
    """#SBATCH option -> value (None: switched off)."""
    return {"job-name": job.job_name or name, "nodes": str(job.nodes), "cpus-per-task": str(job.cpus_per_task),
            "gpus-per-node": str(job.gpus_per_node) if job.gpus_per_node > 0 else None, "time": job.time,
            "partition": job.partition, "account": job.account, "signal": f"B:TERM@{job.warning}",
            **({"output": job.output} if job.output else {})}


def settings(job: SlurmJob, cfg: cfgmod.RunConfig) -> dict[str, str]:
    """The template's settings for a job."""
    kind, path = (job.env_kind, job.env_path or "") if job.env_kind else current_env()
    if kind not in ("venv", "conda", "none"):
        raise ValueError(f"--env: {kind!r} is not one of venv, conda, none")
    run_dir = job.run_dir or Path(cfg.output_dir) / cfg.name
    return {"JOB_FILE": str(Path(job.job_file).resolve()), "RUN_ARGS": run_args(cfg, job.overrides),
            "RUN_DIR": str(Path(run_dir).resolve()), "ENV_KIND": kind, "ENV_PATH": path, "MODULES": job.modules,
            "SITE_SETUP": job.site_setup, "RAY_PORT": str(job.ray_port), "RAY_START_ARGS": job.ray_start_args,
            "SIM_SLOTS_GPU_NODE": "" if job.sim_slots_gpu_node is None else str(job.sim_slots_gpu_node),
            "STOP_GRACE": str(max(job.warning - 20, 10))}


def render(template: str, sbatch: dict[str, str | None], values: dict[str, str]) -> str:
    """The template with its #SBATCH options and settings replaced (an option it lacks is added)."""
    lines, seen = template.splitlines(), set()
    for i, line in enumerate(lines):
        m = _SBATCH.match(line)
        if m and m.group(1) in sbatch:
            lines[i] = _sbatch_line(m.group(1), sbatch[m.group(1)], m.group(2) or "")
            seen.add(m.group(1))
    last = max(i for i, line in enumerate(lines) if _SBATCH.match(line))
    extra = [f"#SBATCH --{k}={v}" for k, v in sbatch.items() if k not in seen and v is not None]
    lines[last + 1 : last + 1] = extra
    return "\n".join(_set_values(lines, values)) + "\n"


def _sbatch_line(option: str, value: str | None, old: str) -> str:
    """`#SBATCH --option=value`, or the old line switched off (`##SBATCH`) when value is None."""
    return f"##SBATCH --{option}{old}" if value is None else f"#SBATCH --{option}={value}"


def _set_values(lines: list[str], values: dict[str, str]) -> list[str]:
    """Rewrite NAME=value lines of the settings block; every name must be one of the template's."""
    start = next(i for i, line in enumerate(lines) if line.startswith("# >>> settings"))
    end = lines.index("# <<< settings")
    names = {}
    for i in range(start + 1, end):
        m = _SETTING.match(lines[i])
        if m:
            names[m.group(1)] = i
    unknown = set(values) - set(names)
    if unknown:
        raise ValueError(f"the Slurm template has no setting {', '.join(sorted(unknown))}")
    for name, value in values.items():
        lines[names[name]] = f"{name}={shlex.quote(value)}"
    return lines


def job_script(job: SlurmJob, template: Path = TEMPLATE) -> str:
    """The filled batch script for a job (validated like `enkg-dist run --dry-run`)."""
    if not template.is_file():
        raise ValueError(f"Slurm template {template} not found (pass --template cluster/slurm/enkg.sbatch)")
    cfg = cfgmod.load_config(job.job_file, job.overrides)
    return render(template.read_text(), sbatch_options(job, cfg.name), settings(job, cfg))
