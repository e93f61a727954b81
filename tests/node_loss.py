"""Run one stage on a three-node cluster and remove the worker node that hosts one of its actors mid-run.

``ray.cluster_utils.Cluster``: a head with no CPU (so every actor and task lands on a worker) and
``workers`` 1-CPU worker nodes. Once the stage reaches the given point, a watcher thread removes (kills) the
worker node hosting the stage's actor; the stage must still complete. Prints one ``RESULT {json}`` line.

    python tests/node_loss.py generate OUT '["generate.mult=4", ...]' 3 2   # after 3 shards, 2 workers
    REALFAKE_FAULT=finetune.checkpoint_hold:4 python tests/node_loss.py finetune OUT '[...]' 4 3
    REALFAKE_FAULT=train.checkpoint_hold:1 python tests/node_loss.py train OUT '[...]' 1 3

A Ray Train stage needs three: one for its training worker, one for its data tasks, one to move to.

For finetune and train the worker holds right after checkpoint ``n`` (``_internal.faults``), so the node is
removed while the run is known to be there, never by racing a timer.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from realfake_ray import storage
from realfake_ray._internal.addresses import free_port
from realfake_ray._internal.checkpoints import checkpoint_number, newest_complete
from realfake_ray.data.synthetic import list_shards
from realfake_ray.config import load_config
from realfake_ray.layout import RunLayout


def _newest_checkpoint(run_dir: str, prefix: str, state_file: str) -> int:
    """The number of the newest complete checkpoint below ``run_dir``; -1 before the first."""
    newest = newest_complete(run_dir, prefix, (state_file,))
    return checkpoint_number(newest, prefix) if newest else -1


def generate(cfg):
    from realfake_ray.stages.generate.driver import run_generate

    def progress() -> int:
        return len(list_shards(RunLayout(cfg.out).shards_dir()).urls)

    def run() -> dict:
        summary = run_generate(cfg)
        return {key: summary[key] for key in ("count", "failed", "complete")}

    return "SynthesisActor", progress, run


def finetune(cfg):
    from realfake_ray.stages.finetune.driver import CHECKPOINT_PREFIX, RUN_NAME, checkpoint_steps, run_finetune

    run_dir = storage.join(RunLayout(cfg.out).finetune_dir(), RUN_NAME)

    def progress() -> int:
        return _newest_checkpoint(run_dir, CHECKPOINT_PREFIX, "state.pt")

    def run() -> dict:
        done = run_finetune(cfg)
        return {key: done[key] for key in ("step", "resumed_from", "restarts")} | {"checkpoints": checkpoint_steps(cfg.out)}

    return "RayTrainWorker", progress, run


def train(cfg):
    from realfake_ray.data.labelled import output_dir
    from realfake_ray.stages.train.driver import EPOCH_PREFIX, STATE_FILE, read_metrics, run_train
    from realfake_ray.stages.train.plan import plan_training

    run_dir = storage.join(output_dir(cfg), plan_training(cfg).run_name)

    def progress() -> int:
        return _newest_checkpoint(run_dir, EPOCH_PREFIX, STATE_FILE)

    def run() -> dict:
        summary = run_train(cfg)
        epochs = [row["epoch"] for row in read_metrics(output_dir(cfg))]
        return {"epochs": summary["epochs"], "restarts": summary["restarts"], "metric_epochs": epochs,
                "top1": summary["evaluation"]["sets"]["val"]["top1"]}

    return "RayTrainWorker", progress, run


def main() -> None:
    stage, out, overrides, n, count = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    store = 200 * 1024 * 1024
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": store,
                                                            "include_dashboard": True, "dashboard_port": free_port()})
    workers = [cluster.add_node(num_cpus=1, object_store_memory=store) for _ in range(count)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    stages = {"generate": generate, "finetune": finetune, "train": train}
    actor_class, progress, run = stages[stage](load_config(preset="tiny", out=out, overrides=overrides))
    removed: dict = {}

    def remove_an_actor_node() -> None:
        while progress() < n:
            time.sleep(0.1)
        alive = list_actors(filters=[("state", "=", "ALIVE")], detail=True, raise_on_missing_output=False,
                            address="http://" + cluster.webui_url)
        for actor in alive:
            node = next((w for w in workers if w.node_id == actor.node_id), None)
            if actor_class in (actor.class_name or "") and node is not None:
                removed.update(node=node.node_id, at=progress())
                cluster.remove_node(node, allow_graceful=False)
                return

    threading.Thread(target=remove_an_actor_node, daemon=True).start()
    result = run()
    print("RESULT", json.dumps({"removed": removed, "alive": sum(n["Alive"] for n in ray.nodes()), **result}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
