"""cluster/slurm for real: a single-node Slurm started here runs the filled template (`ray symmetric-run`, token auth,
the driver with --address), end to end and through a walltime-style SIGTERM that requeues and resumes the run.

This machine is shared with other test sessions, so the job finds a test-only `ray` first on PATH (put there through
the template's SITE_SETUP): symmetric-run ends with `ray stop`, which stops every Ray process on the node, and refuses
to start where any Ray runs. The stand-in is Ray's own command line with two changes: `ray stop` sees only the
processes of this job's Ray temp dir, and symmetric-run's "already started" check is skipped. The template itself is
unchanged: on a cluster node (`--exclusive`) the real `ray stop` is what ends the job's Ray.
Prints the launch overhead (sbatch submit → first forward evaluation) against the same job run locally (`-s`).
"""

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from enkg_dist import config as cfgmod
from enkg_dist.launch import slurm as slurm_launch

BIN = Path(sys.executable).parent
VENV = BIN.parent
COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue", "sinfo")
JOB = ("name: slurm-test\nseed: 2\nproblem: {{n: 16, k: 2}}\nenkg: {{ensemble_size: 8, num_steps: 12}}\n"
       "execution: {{num_workers: 2, batch_size: 1}}\nchaos: {{fail_rate: 0.0, delay: 0.05, log: {log}}}\n")
RAY_STAND_IN = '''#!{python}
"""`ray` for tests on a shared machine: symmetric-run starts beside other Rays, and Ray's own `ray stop` sees only
the processes of this job's Ray temp dir."""
import os
import sys

from ray.scripts import symmetric_run
from ray.scripts.scripts import main

import psutil  # Ray's vendored copy, importable once ray is

TEMP = os.environ["ENKG_RAY_TMP"]
every_process = psutil.process_iter


def this_jobs_processes(*args, **kwargs):
    for p in every_process(*args, **kwargs):
        try:
            if any(TEMP in a for a in p.cmdline()):
                yield p
        except psutil.Error:
            pass


psutil.process_iter = this_jobs_processes
symmetric_run.check_ray_already_started = lambda: False
sys.exit(main())
'''


def _which(name: str) -> str | None:
    """A command on PATH or in /usr/sbin."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _free_port() -> int:
    """A TCP port free right now, below the kernel's ephemeral range (so no outgoing connection takes it before the
    job binds it) and above Ray's worker ports (10002-19999)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        port = 20000 + secrets.randbelow(max(low - 20000, 1000))
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port


def _slurm_conf(root: Path, cluster: str, ports: tuple[int, int]) -> str:
    """A one-node Slurm: root daemons, munge on a private socket, fast requeue (cred_expire) and scheduling."""
    mem = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal")))
    return f"""ClusterName={cluster}
SlurmctldHost={socket.gethostname().split(".")[0]}
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/socket,cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=1,bf_interval=1
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
MinJobAge=6
ReturnToService=2
NodeName={socket.gethostname().split(".")[0]} CPUs=2 RealMemory={mem // 1024 * 8 // 10} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _start_daemons(root: Path, conf: Path, env: dict, procs: list[subprocess.Popen]) -> None:
    """munged, slurmctld and slurmd in the foreground, as children of this process (appended to procs)."""
    munge = root / "munge"
    munge.mkdir(mode=0o700)
    (munge / "munge.key").write_bytes(secrets.token_bytes(1024))
    (munge / "munge.key").chmod(0o400)
    for d in ("state", "spool"):
        (root / d).mkdir()
    cmds = [[_which("munged"), "-F", "--force", f"--socket={munge}/socket", f"--key-file={munge}/munge.key",
             f"--pid-file={munge}/pid", f"--log-file={munge}/log", f"--seed-file={munge}/seed"],
            [_which("slurmctld"), "-D", "-i", "-f", str(conf)],
            [_which("slurmd"), "-D", "-f", str(conf)]]
    for cmd in cmds:
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        if cmd is cmds[0]:
            _wait_for(lambda: (munge / "socket").exists(), 10, "munged did not create its socket")


def _wait_for(ready, timeout: float, what: str) -> None:
    """Poll ready() until it is true; fail the test with `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            pytest.fail(what)
        time.sleep(0.2)


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM the daemons in reverse start order; SIGKILL any that outlive 20 s."""
    for p in reversed(procs):
        p.terminate()
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running single-node Slurm (2 CPUs) in a scratch directory; its environment for the client commands."""
    missing = [c for c in COMMANDS if not _which(c)]
    if missing:
        pytest.skip(f"Slurm/munge not installed ({', '.join(missing)} not found; scripts/system_deps.sh installs "
                    "slurm-wlm and munge)")
    if os.geteuid() != 0:
        pytest.skip("starting slurmd needs root")
    pytest.importorskip("ray")
    root = tmp_path_factory.mktemp("slurm")
    cluster = f"enkg{secrets.token_hex(3)}"
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, cluster, (_free_port(), _free_port())))
    env, procs = {**os.environ, "SLURM_CONF": str(conf)}, []
    try:
        _start_daemons(root, conf, env, procs)
        _wait_for(lambda: subprocess.run([_which("sinfo"), "-h", "-o", "%T"], env=env, capture_output=True,
                                         text=True, timeout=10).stdout.strip() == "idle", 60,
                  f"the Slurm node did not become idle in 60 s (logs in {root})")
        yield {"env": env, "cluster": cluster, "root": root}
    finally:
        try:
            if len(procs) == 3:
                subprocess.run([_which("scancel"), "--full", "--user", "root"], env=env, timeout=30)
                _wait_for(lambda: not _has_jobs(env), 60, "Slurm jobs still running at teardown")
        finally:
            _stop(procs)
            shutil.rmtree(root, ignore_errors=True)


def _has_jobs(env: dict) -> bool:
    """Whether this Slurm has jobs queued or running."""
    r = subprocess.run([_which("squeue"), "-h", "-o", "%i"], env=env, capture_output=True, text=True, timeout=10)
    return bool(r.stdout.strip())


def _committed(run_dir: Path) -> int:
    """The run store's commit marker (-1 before the first commit)."""
    try:
        return json.loads((run_dir / "store.zarr" / "zarr.json").read_text())["attributes"]["committed_step"]
    except (OSError, ValueError, KeyError):
        return -1


class Watch:
    """Times, from a start, of a job's start (its Slurm log appears), its first forward evaluation (the chaos log)
    and its first committed step."""

    def __init__(self, log: Path, run_dir: Path, slurm_logs: Path | None = None):
        self.log, self.run_dir, self.slurm_logs, self.t0 = log, run_dir, slurm_logs, time.monotonic()
        self.started = self.first_eval = self.first_commit = None

    def poll(self) -> None:
        now = time.monotonic() - self.t0
        if self.started is None and self.slurm_logs and any(self.slurm_logs.glob("slurm-*.out")):
            self.started = now
        if self.first_eval is None and self.log.exists() and self.log.stat().st_size > 0:
            self.first_eval = now
        if self.first_commit is None and _committed(self.run_dir) >= 0:
            self.first_commit = now

    def until(self, proc: subprocess.Popen, timeout: float, done=lambda: False) -> float:
        """Poll until proc ends (or done()); returns seconds since the start."""
        deadline = time.monotonic() + timeout
        while proc.poll() is None and not done():
            self.poll()
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"timed out after {timeout} s")
            time.sleep(0.05)
        self.poll()
        return time.monotonic() - self.t0


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of the job with the local backend (`enkg-dist run`): particles and timings."""
    d = tmp_path_factory.mktemp("reference")
    job, log, run_dir = d / "job.yaml", d / "evals.log", d / "run"
    job.write_text(JOB.format(log=log))
    w = Watch(log, run_dir)
    p = subprocess.Popen([BIN / "enkg-dist", "run", job, "--run-dir", run_dir, "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    total = w.until(p, 300)
    assert p.returncode == 0, p.stderr.read()
    return torch.load(run_dir / "ensemble.pt")["particles"], w, total


def _job_script(d: Path) -> tuple[Path, Path, Path]:
    """Fill the template for this machine with `enkg-dist slurm`: (script, run directory, evaluation log)."""
    shim = d / "shim"
    shim.mkdir()
    (shim / "ray").write_text(RAY_STAND_IN.format(python=sys.executable))
    (shim / "ray").chmod(0o755)
    job, log, run_dir = d / "job.yaml", d / "evals.log", d / "run"
    job.write_text(JOB.format(log=log))
    ports = " ".join(f"--{k}={_free_port()}" for k in ("dashboard-port", "ray-client-server-port",
                                                         "dashboard-agent-listen-port", "metrics-export-port",
                                                         "runtime-env-agent-port"))
    r = subprocess.run([BIN / "enkg-dist", "slurm", job, "--nodes", "1", "--cpus-per-task", "2", "--time", "00:15:00",
                        "--run-dir", run_dir, "--env", "venv", "--env-path", VENV, "--output", d / "slurm-%j.out",
                        "--site-setup", f"export PATH={shim}:$PATH", "--ray-port", str(_free_port()),
                        "--ray-start-args", f"--include-dashboard=false {ports}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    script = d / "job.sbatch"
    script.write_text(r.stdout)
    return script, run_dir, log


def _submit(slurm: dict, script: Path) -> tuple[subprocess.Popen, str]:
    """`sbatch --wait` in the background; returns it and the job id."""
    p = subprocess.Popen([_which("sbatch"), "--wait", "--parsable", script], env=slurm["env"], cwd=script.parent,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return p, p.stdout.readline().strip().split(";")[0]


def _slurm_log(d: Path, job_id: str) -> str:
    """The job's Slurm log (all its starts)."""
    return (d / f"slurm-{job_id}.out").read_text()


def _assert_nothing_left(slurm: dict, job_id: str) -> None:
    """No Ray process of the job, no Ray temp dir, no job in the queue."""
    temp = f"/tmp/ray-{slurm['cluster']}-{job_id}"
    left = [p.name for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline_has(p, temp)]
    assert not left, f"Ray processes of the job left: {left}"
    assert not Path(temp).exists()
    _wait_for(lambda: not _has_jobs(slurm["env"]), 30, "the job is still in the queue")


def _cmdline_has(proc: Path, text: str) -> bool:
    """Whether /proc/PID's command line contains text."""
    try:
        return text.encode() in (proc / "cmdline").read_bytes()
    except OSError:
        return False


@pytest.mark.cluster
def test_sbatch_runs_the_template_end_to_end(slurm, reference, tmp_path):
    ref, local, local_total = reference
    script, run_dir, log = _job_script(tmp_path)
    w = Watch(log, run_dir, tmp_path)
    p, job_id = _submit(slurm, script)
    total = w.until(p, 300)
    out = _slurm_log(tmp_path, job_id)
    assert p.returncode == 0, out[-3000:] + p.stderr.read()
    assert "finished" in out and "Ray head" in out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["backend"] == "ray" and metrics["forward_evaluations"] == 8 * 2 * 11
    assert torch.equal(torch.load(run_dir / "ensemble.pt")["particles"], ref)  # Ray gives the local answer
    assert not list(run_dir.glob(".slurm-*"))  # the job's private files (token, driver pid) are removed
    _assert_nothing_left(slurm, job_id)
    print(f"\nlaunch overhead, Slurm (sbatch → symmetric-run → driver on Ray) against local `enkg-dist run`:\n"
          f"  the job started {w.started:.1f} s after sbatch; first forward evaluation {w.first_eval:.1f} s vs "
          f"{local.first_eval:.1f} s (overhead {w.first_eval - local.first_eval:.1f} s); first committed step "
          f"{w.first_commit:.1f} s vs {local.first_commit:.1f} s; whole job {total:.1f} s vs {local_total:.1f} s")


@pytest.mark.cluster
def test_a_job_whose_ray_cannot_start_fails_instead_of_reporting_finished(slurm, tmp_path):
    script, run_dir, _ = _job_script(tmp_path)
    port = int(re.search(r"^RAY_PORT=(\d+)", script.read_text(), re.M).group(1))
    with socket.socket() as held:  # Ray's head port taken: `ray start` fails and symmetric-run still exits 0
        held.bind(("0.0.0.0", port))
        held.listen()
        p, job_id = _submit(slurm, script)
        p.wait(timeout=300)
    out = _slurm_log(tmp_path, job_id)
    assert p.returncode != 0, out[-3000:]
    assert "the driver never ran" in out and "finished" not in out, out[-3000:]
    assert not (run_dir / "metrics.json").exists()
    _assert_nothing_left(slurm, job_id)


@pytest.mark.cluster
def test_sigterm_mid_run_requeues_and_resumes_to_the_uninterrupted_ensemble(slurm, reference, tmp_path):
    ref = reference[0]
    script, run_dir, log = _job_script(tmp_path)
    w = Watch(log, run_dir)
    p, job_id = _submit(slurm, script)
    w.until(p, 300, done=lambda: _committed(run_dir) >= 1)
    assert p.poll() is None, "the job ended before the signal"
    subprocess.run([_which("scancel"), "--signal=TERM", "--batch", job_id], env=slurm["env"], check=True, timeout=30)
    total = w.until(p, 400)
    out = _slurm_log(tmp_path, job_id)
    assert p.returncode == 0, out[-3000:] + p.stderr.read()
    m = re.search(r"interrupted by SIGTERM at step (\d+); resume with: enkg-dist resume (\S+)", out)
    assert m and m.group(2) == str(run_dir), out[-3000:]
    step = int(m.group(1))
    assert "requeueing job" in out and "start 2: resume" in out, out[-3000:]
    assert f"resumed from step {step - 1})" in out, out[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["resumed_from_step"] == step - 1
    assert torch.equal(torch.load(run_dir / "ensemble.pt")["particles"], ref)
    _assert_nothing_left(slurm, job_id)
    print(f"\nSIGTERM at step {step}, requeued and resumed: whole job {total:.1f} s")


def test_the_filler_sets_sbatch_options_and_settings(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(JOB.format(log=tmp_path / "log"))
    spec = slurm_launch.SlurmJob(job, ["enkg.ensemble_size=16"], tmp_path / "run", nodes=3, cpus_per_task=16,
                                 gpus_per_node=2, partition="gpu", warning=300, env_kind="conda", env_path="enkg-dist")
    text = slurm_launch.job_script(spec)
    lines = text.splitlines()
    for line in ("#SBATCH --job-name=slurm-test", "#SBATCH --nodes=3", "#SBATCH --cpus-per-task=16",
                 "#SBATCH --gpus-per-node=2", "#SBATCH --partition=gpu", "#SBATCH --signal=B:TERM@300",
                 "#SBATCH --requeue", f"RUN_DIR={tmp_path / 'run'}", "ENV_KIND=conda", "ENV_PATH=enkg-dist",
                 "RUN_ARGS='--set enkg.ensemble_size=16 --set execution.worker_resources.sim=1'", "STOP_GRACE=280"):
        assert line in lines, line
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    cpu_only = slurm_launch.job_script(slurm_launch.SlurmJob(job, env_kind="none"))
    assert "##SBATCH --gpus-per-node=1" in cpu_only.splitlines() and "--partition" not in cpu_only


def test_the_filler_refuses_bad_input(tmp_path):
    with pytest.raises(cfgmod.ConfigError, match="not found"):
        slurm_launch.job_script(slurm_launch.SlurmJob(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError, match="no setting NOPE"):
        slurm_launch.render(slurm_launch.TEMPLATE.read_text(), {}, {"NOPE": "1"})
