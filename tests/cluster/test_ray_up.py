"""cluster/ray-up: `ray up` (local node provider over loopback SSH) → `ray submit` a small enkg-dist job → `ray down`.

The node side is a throwaway non-root account reached through a throwaway sshd on a free loopback port. Not root on
purpose: `ray up` and `ray down` run `ray stop` on the node, which signals every Ray process its user may signal, so
as root it would also stop the Ray that tests/distributed run in this same pytest process (started as root). As
another user it cannot: the test checks this with a root-owned decoy process named `raylet`, and, when this process
runs an embedded Ray (tests/distributed's session fixture), that its raylet and gcs_server outlive `ray down`.
Prints the timings of up, submit, down and of the same script run locally (`pytest -s` shows them).
"""

import contextlib
import getpass
import hashlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[2]
RAY_UP = REPO / "cluster" / "ray-up"
BIN = Path(sys.executable).parent
SSHD = shutil.which("sshd") or shutil.which("sshd", path="/usr/sbin")
J, STEPS = 8, 10
JOB_SCRIPT = f'''"""A small enkg-dist job on Ray: python enkg_job.py RUN_DIR [--address ADDR] (none: embedded Ray)."""
import sys

from enkg_dist.cli import app

app(["run", "builtin:linear_gaussian_64", "--set", "problem.n=16", "--set", "enkg.ensemble_size={J}",
     "--set", "enkg.num_steps={STEPS}", "--set", "execution.backend=ray", "--no-progress", "--run-dir", *sys.argv[1:]])
'''
# scripts/setup.sh installs from PyPI; the test prepares ~/enkg-dist/.venv itself and only checks it
INSTALLED_CHECK = '~/enkg-dist/.venv/bin/python -c "import enkg_dist, ray"'
STYLE = ["--log-style", "record", "--log-color", "false"]


def test_the_cluster_configs_are_valid_for_the_launcher():
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    for path in sorted(RAY_UP.glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        validate_config(prepare_config(config))
        config["auth"]["ssh_usr"] = "typo"
        with pytest.raises(Exception, match="ssh_usr"):
            validate_config(prepare_config(config))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, timeout: float, **kw) -> tuple[subprocess.CompletedProcess, float]:
    """Run a command (text output captured); returns it with its wall time in seconds."""
    t0 = time.monotonic()
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    return r, time.monotonic() - t0


def _as_user(user: str, cmd, timeout: float = 60) -> subprocess.CompletedProcess:
    return _run(["runuser", "-u", user, "--", *cmd], timeout, cwd="/")[0]


def _tail(r: subprocess.CompletedProcess) -> str:
    return (r.stdout[-3000:] + "\n" + r.stderr[-3000:]).strip()


def _status(pid: int) -> dict:
    """Name, State and Uid lines of /proc/PID/status ({} when the process is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def _alive(pid: int) -> bool:
    return _status(pid).get("State", "Z")[0] not in "ZX"


def _processes(uid: int, names=None) -> list[int]:
    """PIDs of a user's live processes, optionally only those named one of `names` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        s = _status(int(entry.name)) if entry.name.isdigit() else {}
        if (s and int(s["Uid"].split()[0]) == uid and s["State"][0] not in "ZX"
                and (names is None or s["Name"] in names)):
            found.append(int(entry.name))
    return found


def _processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
    return found


def _kill(pids: list[int]) -> None:
    """SIGKILL these processes and wait (10 s at most) until they are gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)


def _require_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: it adds a throwaway account and starts an sshd")
    tools = {"sshd": SSHD, **{t: shutil.which(t) for t in ("ssh", "ssh-keygen", "rsync", "nc", "useradd", "userdel",
                                                           "runuser")}}
    missing = [tool for tool, path in tools.items() if not path]
    if missing:
        pytest.skip(f"ray up test needs {', '.join(missing)} (install with scripts/system_deps.sh)")


def _node_venv(user: str, dest: Path) -> None:
    """The project's environment at `dest` as `user` can run it: this venv itself when the user may execute it,
    else a venv of the system Python of the same version that loads this venv's packages (here the venv's Python
    lives under /root, mode 0700)."""
    if _as_user(user, [sys.executable, "-c", "import ray, enkg_dist"]).returncode == 0:
        dest.symlink_to(sys.prefix)
        return
    minor = f"3.{sys.version_info.minor}"
    base = Path(f"/usr/bin/python{minor}")
    if not base.exists():
        pytest.skip(f"the node account cannot run {sys.executable} and there is no {base} to build a view of it")
    r = _as_user(user, [base, "-m", "venv", "--without-pip", dest])
    assert r.returncode == 0, _tail(r)
    site = dest / "lib" / f"python{minor}" / "site-packages"
    (site / "enkg_view.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    for name, module in (("ray", "ray.scripts.scripts"), ("enkg-dist", "enkg_dist.cli")):
        script = dest / "bin" / name
        script.write_text(f"#!{dest}/bin/python\nimport sys\nfrom {module} import main\nsys.exit(main())\n")
        script.chmod(0o755)
    r = _as_user(user, [dest / "bin" / "python", "-c", "import ray, enkg_dist"])
    if r.returncode != 0:
        pytest.skip(f"{base} cannot load this venv's packages: {_tail(r)[-300:]}")


def _add_user(base: Path) -> SimpleNamespace:
    """A throwaway account (password "*": no password login, yet not locked for sshd)."""
    name = f"enkgup{secrets.token_hex(3)}"
    r, _ = _run(["useradd", "--create-home", "--shell", "/bin/bash", "--password", "*", name], 30)
    assert r.returncode == 0, _tail(r)
    pw = pwd.getpwnam(name)
    return SimpleNamespace(user=name, uid=pw.pw_uid, gid=pw.pw_gid, home=Path(pw.pw_dir), base=base,
                           key=base / "id_ed25519", cluster=f"enkg-test-{name}", sshd=None, made_run_sshd=False)


def _prepare(node: SimpleNamespace) -> None:
    """The account's project environment, authorized key and own Ray temp directory."""
    ray_tmp = node.base / "n"
    ray_tmp.mkdir()
    os.chown(ray_tmp, node.uid, node.gid)
    # this test only: the account's Ray gets its own temp directory, apart from root's /tmp/ray (the launcher sources
    # ~/.bashrc before every command; local.yaml's setup command prepends the environment's PATH to it)
    (node.home / ".bashrc").write_text(f"export RAY_TMPDIR={ray_tmp}\n")
    (node.home / "enkg-dist").mkdir()
    r, _ = _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", node.user, "-f", node.key], 30)
    assert r.returncode == 0, _tail(r)
    (node.home / ".ssh").mkdir(mode=0o700)
    keys = node.home / ".ssh" / "authorized_keys"
    keys.write_text(Path(f"{node.key}.pub").read_text())
    keys.chmod(0o600)
    _run(["chown", "-R", f"{node.uid}:{node.gid}", node.home], 30)
    _node_venv(node.user, node.home / "enkg-dist" / ".venv")


def _start_sshd(node: SimpleNamespace) -> None:
    """An sshd for the account only, on a free loopback port, with a throwaway host key; waits for its banner."""
    base, user, port = node.base, node.user, _free_port()
    node.made_run_sshd = not Path("/run/sshd").exists()  # sshd's privilege-separation directory
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    r, _ = _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", base / "host_key"], 30)
    assert r.returncode == 0, _tail(r)
    conf = base / "sshd_config"
    conf.write_text(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {base / 'host_key'}\n"
                    f"PidFile {base / 'sshd.pid'}\nAllowUsers {user}\nPermitRootLogin no\n"
                    "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
                    "UsePAM no\nAuthorizedKeysFile .ssh/authorized_keys\n")
    r, _ = _run([SSHD, "-t", "-f", conf], 30)
    assert r.returncode == 0, _tail(r)
    with open(base / "sshd.log", "w") as log:
        node.sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", conf], stdout=log, stderr=log, start_new_session=True)
    node.port = port
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                if s.recv(64).startswith(b"SSH-"):
                    return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"sshd did not answer on port {port}: {(base / 'sshd.log').read_text()[-1000:]}")


def _ssh_control_dir(cluster_name: str) -> Path:
    """Where the launcher keeps its SSH control sockets for this cluster (as ray's SSHCommandRunner names it)."""
    from ray.autoscaler._private.command_runner import HASH_MAX_LENGTH

    user, cluster = (hashlib.sha256(s.encode()).hexdigest()[:HASH_MAX_LENGTH]
                     for s in (getpass.getuser(), cluster_name))
    return Path(f"/tmp/ray_ssh_{user}/{cluster}")


def _cleanup(node: SimpleNamespace) -> None:
    """Stop everything this test started (by process, never by name) and remove the account and its files."""
    control = _ssh_control_dir(node.cluster)
    _kill(_processes(node.uid))  # Ray of a failed run, ssh sessions
    for text in (str(node.key), str(control)):  # the launcher's ssh/rsync clients; ssh's "CONTROL_PATH [mux]" masters
        _kill(_processes_mentioning(text))
    if node.sshd is not None:
        os.killpg(node.sshd.pid, signal.SIGKILL)
        node.sshd.wait(timeout=10)
    _kill(_processes(node.uid))
    _run(["userdel", "--remove", node.user], 30)  # and its home: ~/ray_bootstrap_config.yaml, ~/ray_bootstrap_key.pem
    shutil.rmtree(node.home, ignore_errors=True)
    shutil.rmtree(control, ignore_errors=True)
    with contextlib.suppress(OSError):
        control.parent.rmdir()  # only when no other cluster uses it
    if node.made_run_sshd:
        shutil.rmtree("/run/sshd", ignore_errors=True)


@pytest.fixture
def node():
    """A throwaway node account behind a throwaway sshd; everything removed afterwards."""
    _require_tools()
    base = Path(f"/tmp/eu-{secrets.token_hex(3)}")  # short: Ray's socket paths have a length limit
    base.mkdir()
    base.chmod(0o755)  # the account reaches its Ray temp directory inside
    try:
        node = _add_user(base)
        try:
            _prepare(node)
            _start_sshd(node)
            yield node
        finally:
            _cleanup(node)
        assert not node.home.exists()
    finally:
        shutil.rmtree(base, ignore_errors=True)  # keys, sshd files, Ray temp dirs, the launcher's lock and state


def _cluster_yaml(node: SimpleNamespace) -> Path:
    """cluster/ray-up/local.yaml with this test's account, key, sshd port, a fresh token and free Ray ports."""
    config = yaml.safe_load((RAY_UP / "local.yaml").read_text())
    config["cluster_name"] = node.cluster
    config["auth"] = {"ssh_user": node.user, "ssh_private_key": str(node.key),
                      "ssh_proxy_command": f"nc 127.0.0.1 {node.port}"}
    token = node.base / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    config["file_mounts"]["~/.ray/auth_token"] = str(token)
    install = [c for c in config["setup_commands"] if "scripts/setup.sh" in c]
    assert len(install) == 1, config["setup_commands"]
    config["setup_commands"] = [INSTALLED_CHECK if c in install else c for c in config["setup_commands"]]
    for flag, default in (("--port", 6379), ("--dashboard-port", 8265)):
        old, new = f"{flag}={default}", f"{flag}={_free_port()}"
        assert any(old in c for c in config["head_start_ray_commands"]), old
        config["head_start_ray_commands"] = [c.replace(old, new) for c in config["head_start_ray_commands"]]
    path = node.base / "cluster.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _launcher(base: Path):
    """`ray(*args, timeout=...)`: runs this venv's ray CLI from the repository root with its own HOME and temp
    directory (the launcher's lock, state and config-cache files land there); asserts success, returns seconds."""
    client = base / "c"
    client.mkdir()
    env = {"PATH": f"{BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(client),
           "RAY_TMPDIR": str(client), "TMPDIR": str(client), "RAY_USAGE_STATS_ENABLED": "0", "LANG": "C.UTF-8"}

    def ray(*args, timeout: float) -> float:
        r, seconds = _run([BIN / "ray", *args], timeout, env=env, cwd=REPO)
        assert r.returncode == 0, _tail(r)
        return seconds
    return ray


def _root_ray_decoy(base: Path) -> subprocess.Popen:
    """A root-owned process named `raylet` (a copy of sleep): what a `ray stop` as root would kill."""
    decoy = base / "decoy" / "raylet"
    decoy.parent.mkdir()
    shutil.copy2(shutil.which("sleep"), decoy)
    return subprocess.Popen([decoy, "600"])


def _check_result(run_dir: Path) -> float:
    """Checks the job's metrics (a Ray run, every forward evaluation done); returns the run's own wall seconds."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["backend"] == "ray" and metrics["forward_evaluations"] == J * 2 * (STEPS - 1), metrics
    return metrics["wall_seconds"]


def _run_locally(script: Path, base: Path) -> tuple[float, float]:
    """The same script on an embedded Ray in a fresh process; returns its wall time and the run's own."""
    env = {"PATH": os.environ["PATH"], "HOME": str(base), "RAY_TMPDIR": str(base / "l"), "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0"}
    r, seconds = _run([sys.executable, script, base / "local-run"], 120, env=env, cwd=base)
    assert r.returncode == 0, _tail(r)
    return seconds, _check_result(base / "local-run")


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_ray_up_submit_down(node):
    cluster_yaml, script, run_dir = _cluster_yaml(node), node.base / "enkg_job.py", node.home / "run"
    script.write_text(JOB_SCRIPT)
    ray = _launcher(node.base)
    decoy = _root_ray_decoy(node.base)
    own_rays = [pid for pid in _processes(0, {"raylet", "gcs_server"}) if _status(pid)["PPid"] == str(os.getpid())]
    try:
        t_up = ray("up", "-y", "--no-config-cache", "--disable-usage-stats", *STYLE, cluster_yaml, timeout=120)
        assert _processes(node.uid, {"raylet"}) and _processes(node.uid, {"gcs_server"}), "no Ray on the node"
        t_submit = ray("submit", *STYLE, cluster_yaml, script, "--", run_dir, "--address", "auto", timeout=120)
        job = _check_result(run_dir)
        t_down = ray("down", "-y", *STYLE, cluster_yaml, timeout=90)
        left = _processes(node.uid, {"raylet", "gcs_server"})
        assert not left, f"ray down left {[(pid, _status(pid).get('Name')) for pid in left]}"
        assert decoy.poll() is None, "the node account's `ray stop` killed a root process"
        assert all(_alive(pid) for pid in own_rays), "the node account's `ray stop` stopped this process's Ray"
    finally:
        decoy.kill()
        decoy.wait()
    t_local, job_local = _run_locally(script, node.base)
    print(f"\nray up path, enkg-dist job (n=16, J={J}, {STEPS} steps, Ray): up {t_up:.1f} s, submit {t_submit:.1f} s "
          f"(the run itself {job:.1f} s), down {t_down:.1f} s; the same script locally on an embedded Ray "
          f"{t_local:.1f} s (the run itself {job_local:.1f} s); up -> result {t_up + t_submit:.1f} s, "
          f"{t_up + t_submit - t_local:+.1f} s against the local run")
