import json
import pathlib
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_losing_a_node_mid_run_gives_the_fault_free_ensemble(tmp_path):
    """A multi-node Ray on one machine (ray.cluster_utils.Cluster) loses a worker node during a run."""
    script = pathlib.Path(__file__).with_name("node_loss_job.py")
    r = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["removed_during_run"], result
    assert result["same"] and result["workers_replaced"] >= 1 and result["redispatched"] >= 1, result
