"""Run by test_node_loss.py in its own process: a 3-node Ray (ray.cluster_utils.Cluster) loses a node mid-run."""

import json
import sys
import threading
import time

import ray
import torch
from ray.cluster_utils import Cluster

from enkg_dist import config as cfgmod
from enkg_dist import runner
from enkg_dist.store import committed_step_of

out = sys.argv[1]
overrides = ["problem.n=16", "enkg.ensemble_size=12", "enkg.num_steps=12", "chaos={fail_rate: 0.0, delay: 0.1}"]
local_dir, _ = runner.run(cfgmod.load_config("builtin:linear_gaussian_64", overrides), f"{out}/local", progress=False)

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
nodes = [cluster.add_node(num_cpus=2, resources={"sim": 1}) for _ in range(2)]
ray.init(address=cluster.address, logging_level="warning")
cluster.wait_for_nodes()
events = {}


def remove_a_node():
    # after step 3 is committed, so both workers have started and the run has steps left (a fixed delay lost the
    # node during a slow CI machine's worker start-up, where there is nothing in flight to re-dispatch)
    deadline = time.monotonic() + 300
    while committed_step_of(f"{out}/ray/store.zarr") < 3:
        if time.monotonic() > deadline:
            return
        time.sleep(0.02)
    events["removed_at"], events["removed_after_step"] = time.monotonic(), committed_step_of(f"{out}/ray/store.zarr")
    cluster.remove_node(nodes[1])
    cluster.add_node(num_cpus=2, resources={"sim": 1})  # room for the replacement worker


threading.Thread(target=remove_a_node, daemon=True).start()
t0 = time.monotonic()
cfg = cfgmod.load_config("builtin:linear_gaussian_64", overrides + ["execution.backend=ray", "execution.num_workers=2",
                                            "execution.worker_resources={sim: 1}"])
ray_dir, metrics = runner.run(cfg, f"{out}/ray", progress=False, address=cluster.address)
done = time.monotonic()
same = torch.equal(torch.load(local_dir / "ensemble.pt")["particles"],
                   torch.load(ray_dir / "ensemble.pt")["particles"])
print(json.dumps({"same": same, "removed_during_run": t0 < events.get("removed_at", 1e18) < done,
                  "removed_after_step": events.get("removed_after_step"),
                  "workers_replaced": metrics["workers_replaced"], "redispatched": metrics["redispatched"]}))
ray.shutdown()
cluster.shutdown()
