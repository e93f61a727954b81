"""An autoscaling Ray cluster on one machine, for tests and benchmarks: a head with no CPU and worker node
types that Ray's own autoscaler (v1: the 2.60 wheel lacks the provider defaults file v2 reads) launches and terminates as local raylets (its ``fake_multinode``
provider), with the resources each type declares — ``{"GPU": 1}`` on a machine without a GPU included.

Ray ships this as ``ray.cluster_utils.AutoscalingCluster``, but that class starts with ``ray stop --force``
(killing every Ray process of the user, a test session's own cluster included) and reads a config file the
2.60 wheel does not contain. This one starts its head in a session of its own and kills only that.

Example:
    >>> cluster = FakeAutoscalingCluster({"gpu_worker": {"resources": {"CPU": 1, "GPU": 1},
    ...                                                   "min_workers": 0, "max_workers": 3}})  # doctest: +SKIP
    >>> cluster.start()  # doctest: +SKIP
    >>> subprocess.run([...], env={**os.environ, **cluster.env, "RAY_ADDRESS": cluster.address})  # doctest: +SKIP
    >>> cluster.shutdown()  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from realfake_ray._internal.addresses import free_port

__all__ = ["FakeAutoscalingCluster"]


class FakeAutoscalingCluster:
    """``worker_types``: autoscaler node types (``resources``, ``min_workers``, ``max_workers``)."""

    def __init__(self, worker_types: dict, *, idle_timeout_minutes: float = 0.1, head_cpus: int = 0) -> None:
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.dir = tempfile.mkdtemp(prefix="rfa-")  # short: Ray's socket paths live below it
        self.env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}
        types = {name: {"node_config": {}, **spec} for name, spec in worker_types.items()}
        types["ray.head.default"] = {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0}
        self.config = {
            "cluster_name": "fake", "max_workers": sum(t.get("max_workers", 0) for t in types.values()),
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": self.address},
            "available_node_types": types, "head_node_type": "ray.head.default", "auth": {},
            "upscaling_speed": 1.0, "idle_timeout_minutes": idle_timeout_minutes, "docker": {},
            **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                                   "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                                   "cluster_synced_files", "rsync_exclude", "rsync_filter")},
            "file_mounts": {}, "file_mounts_sync_continuously": False,
        }
        self.head_cpus = head_cpus
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120) -> None:
        """Start the head (and its autoscaler); return once its job API answers."""
        config_path = os.path.join(self.dir, "autoscaling.json")
        with open(config_path, "w") as f:
            json.dump(self.config, f)
        bin_dir = os.path.dirname(sys.executable)
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
        env.update(self.env, PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", RAY_FAKE_CLUSTER="1",
                   AUTOSCALER_UPDATE_INTERVAL_S="1")
        cmd = [os.path.join(bin_dir, "ray"), "start", "--head", "--block", f"--autoscaling-config={config_path}",
               f"--num-cpus={self.head_cpus}", "--num-gpus=0", f"--port={self.port}", "--node-ip-address=127.0.0.1",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
               f"--temp-dir={os.path.join(self.dir, 'ray')}", "--disable-usage-stats"]
        self.log = open(os.path.join(self.dir, "head.log"), "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout_s
        probe = [os.path.join(bin_dir, "ray"), "job", "list", "--address", self.dashboard_url]
        while subprocess.run(probe, env={**env, **self.env}, capture_output=True).returncode != 0:
            if self.proc.poll() is not None or time.time() > deadline:
                self.shutdown()
                raise RuntimeError(f"the fake autoscaling head did not come up; its log: {self.log.name}")
            time.sleep(1)

    def shutdown(self) -> None:
        """Kill the head, its autoscaler and every node it launched (one process session), then clean up."""
        if self.proc is not None:
            for pid in _session_members(self.proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait()
            self.proc = None
            self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _session_members(sid: int) -> list[int]:
    """Processes of session ``sid`` (they stay in it when re-parented, unlike in a process tree)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:  # after "pid (comm)": state, ppid, pgrp, session
                members.append(int(entry))
    return members
