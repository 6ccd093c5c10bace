"""`ray job submit -- enkg-dist run ...` against a `ray start --head` cluster that this test starts, with token auth."""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head(tmp_path):
    if not (BIN / "ray").exists():
        pytest.skip("the ray command line is not installed in this environment")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    port, dash = _free_port(), _free_port()
    temp = Path("/tmp") / f"ray-submit-{secrets.token_hex(3)}"  # short: Ray's socket paths have a length limit
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--node-ip-address=127.0.0.1", "--num-cpus=2", f"--temp-dir={temp}",
         "--disable-usage-stats"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("ray start --head did not bring up its dashboard in 90 s")
    yield env, url, port
    os.killpg(proc.pid, signal.SIGTERM)  # --block: the head takes its Ray processes down with it
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(temp, ignore_errors=True)
    current = Path("/tmp/ray/ray_current_cluster")  # `ray start` records the head here; only `ray stop` removes it
    if current.is_file() and current.read_text().strip().endswith(f":{port}"):
        current.unlink()


@pytest.mark.cluster
def test_ray_job_submit_runs_a_job_with_token_auth(head, tmp_path):
    env, url, port = head
    out = tmp_path / "job"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", url, "--", str(BIN / "enkg-dist"),
           "run", "builtin:linear_gaussian_64", "--set", "problem.n=16", "--set", "enkg.ensemble_size=8",
           "--set", "enkg.num_steps=10", "--no-progress", "--address", "auto", "--run-dir", str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "succeeded" in r.stdout + r.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["backend"] == "ray" and metrics["forward_evaluations"] == 8 * 2 * 9
    # a client with the wrong token is refused (Ray retries forever, so bound it)
    bad = {**env, "RAY_AUTH_TOKEN": "0" * 32}
    try:
        r = subprocess.run([str(BIN / "ray"), "job", "list", "--address", url], env=bad, capture_output=True,
                           text=True, timeout=30)
        assert r.returncode != 0
    except subprocess.TimeoutExpired:
        pass  # refused and retrying: not let in either way
