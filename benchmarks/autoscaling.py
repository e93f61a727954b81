#!/usr/bin/env python
"""Generate on a cluster that autoscales GPU nodes from zero: nodes, live actors and images over time.

Ray's own autoscaler (v1, fake nodes: ``realfake_ray._internal.fake_autoscaler``) with a head without CPUs
and a ``{"CPU": 1, "GPU": 1}`` worker type from 0 to 3 nodes; the tiny job's generate stage runs on it with
``generate.actors.gpus_per_actor=1`` (the actors run on CPU: the fake nodes only advertise a GPU). The
stage's timeline (sampled every 2 s by the stage itself, ``_summary.json["timeline"]``) becomes a table and
the PNG the run report shows; then the time until the idle nodes are gone is measured.

    python benchmarks/autoscaling.py --write BENCHMARKS.md      # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import machine, write_section  # first: puts the repository on sys.path

SECTION = "## Autoscaling (CPU, tiny preset): generate on GPU nodes that join from zero"
REPO = Path(__file__).resolve().parents[1]


def _bank(out: Path) -> None:
    """The embedded digits' latent bank (encoded on a local cluster that is shut down afterwards)."""
    if (out / "latents" / "_meta.json").exists():
        return
    subprocess.run([sys.executable, "jobs/scale_in1k.py", "--only", "encode", "--preset", "tiny", "--out", str(out)],
                   cwd=REPO, check=True, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})


def _nodes_alive(cluster, env: dict) -> int:
    code = "import ray; ray.init(logging_level='ERROR'); print('ALIVE', sum(n['Alive'] for n in ray.nodes()))"
    done = subprocess.run([sys.executable, "-c", code], env={**env, "RAY_ADDRESS": cluster.address},
                          capture_output=True, text=True, timeout=120)
    return int(next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("ALIVE")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/autoscaling")
    parser.add_argument("--write", metavar="BENCHMARKS.md")
    args = parser.parse_args()

    from realfake_ray import storage
    from realfake_ray._internal.fake_autoscaler import FakeAutoscalingCluster
    from realfake_ray.layout import RunLayout

    out = Path(args.out).resolve()
    _bank(out)
    shutil.rmtree(RunLayout(str(out)).synthetic_dir(), ignore_errors=True)  # every run measures a fresh stage
    cluster = FakeAutoscalingCluster({"gpu_worker": {"resources": {"CPU": 1, "GPU": 1}, "min_workers": 0,
                                                     "max_workers": 3}})
    cluster.start()
    try:
        env = {**os.environ, **cluster.env, "RAY_ADDRESS": cluster.address}
        started = time.time()
        subprocess.run([sys.executable, "jobs/scale_in1k.py", "--only", "generate", "--preset", "tiny", "--out", str(out),
                        "--mult", "1", "--set", "generate.use_lora=false", "--set", "generate.actors.gpus_per_actor=1",
                        "--set", "generate.actors.cpus_per_actor=0.5", "--set", "generate.actors.min_size=1",
                        "--set", "generate.actors.max_size=3"], cwd=REPO, env=env, check=True)
        stage_s = time.time() - started
        idle_since, alive = time.time(), _nodes_alive(cluster, env)
        while alive > 1 and time.time() - idle_since < 300:
            time.sleep(5)
            alive = _nodes_alive(cluster, env)
        scale_down_s = time.time() - idle_since
    finally:
        cluster.shutdown()
    summary = storage.read_json(RunLayout(str(out)).synthetic_dir("_summary.json"))
    timeline = summary["timeline"]
    png = REPO / "benchmarks" / "autoscaling_timeline.png"
    shutil.copy(out / "synthesis_timeline.png", png)
    rows = ["| t (s) | nodes | live actors | pending actors | images |", "| ---: | ---: | ---: | ---: | ---: |"]
    step = max(1, len(timeline) // 15)
    for point in timeline[::step] + ([timeline[-1]] if (len(timeline) - 1) % step else []):
        rows.append(f"| {point['t']:.0f} | {point['nodes']} | {point['actors']} | {point['actors_pending']} | "
                    f"{point['images']} |")
    text = (f"{SECTION}\n\nMachine: {machine()}; `python benchmarks/autoscaling.py`: Ray's autoscaler with fake "
            f"nodes, a head without CPUs and 0–3 `{{CPU: 1, GPU: 1}}` workers; the tiny job's generate stage "
            f"(1,437 images, `gpus_per_actor: 1`, actors 1–3). Stage wall time {stage_s:.0f} s (job start, nodes "
            f"launching, model loads included); {summary['count']} images; the idle GPU nodes were gone "
            f"{scale_down_s:.0f} s after the stage ended (`idle_timeout_minutes: 0.1`; {alive} node left).\n\n"
            + "\n".join(rows) + f"\n\n![autoscaling timeline](benchmarks/{png.name})\n")
    print(text)
    if args.write:
        write_section(args.write, SECTION, text)


if __name__ == "__main__":
    main()
