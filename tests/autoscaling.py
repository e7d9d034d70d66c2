"""Ray's own autoscaler on this machine: a head started with Ray's fake multi-node provider, whose autoscaler starts
worker raylets as local processes when there is demand, inside a network namespace that has only `lo` (every
address 127.0.0.1, no traffic leaves it). Used by the tests of autoscaler-aware placement and `pathsearch cluster
check`; needs root for `ip netns`.

Not `ray.cluster_utils.AutoscalingCluster`: its start and shutdown run `ray stop --force`, which kills every Ray on
the machine (the other test worker's included). This one stops exactly the processes in its own namespace.

    python tests/autoscaling.py   # starts one, prints its addresses, waits for Enter, stops it (to try it by hand)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
RAY = str(Path(PY).parent / "ray")


def can_run() -> str | None:
    """Why this machine cannot run one (None: it can)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "an autoscaling cluster on loopback needs a network namespace (`ip netns`, root)"
    return None


class FakeAutoscalingCluster:
    """A head with `head_resources` (no CPU: it only runs drivers) and worker types {name: {resources, max}} the
    autoscaler may start, `min_workers: 0` each; `v2` runs Ray's autoscaler v2 instead of v1."""

    def __init__(
        self,
        workers: dict[str, dict[str, Any]],
        head_resources: dict[str, float] | None = None,
        v2: bool = False,
        idle_timeout_minutes: float = 5.0,
    ) -> None:
        self.workers, self.v2 = workers, v2
        self.head_resources = head_resources or {"CPU": 0}
        self.idle_timeout_minutes = idle_timeout_minutes
        self.name = f"psauto{os.getpid()}{'v2' if v2 else ''}"
        self.folder = Path(tempfile.mkdtemp(prefix="psautoscale-", dir="/tmp"))
        self.port, self.dashboard_port = 6390, 8290  # inside the namespace: no clash with anything outside it
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        token = self.folder / "auth_token"
        token.write_text(os.urandom(32).hex())
        token.chmod(0o600)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AUTOSCALER_"))}
        self.env.update(RAY_AUTH_TOKEN_PATH=str(token), RAY_AUTH_MODE="token", PYTHONPATH=str(ROOT / "tests"))
        # the head's `python` (a Ray job's entrypoint) is the one with Ray, as on a cluster node
        self.env["PATH"] = f"{Path(PY).parent}{os.pathsep}{self.env.get('PATH', '')}"
        self.env["PATHSEARCH_WORK_DIR"] = str(self.folder / "work")
        self.started = 0.0

    def config(self) -> dict[str, Any]:
        types: dict[str, Any] = {
            "ray.head.default": {"resources": self.head_resources, "node_config": {}, "max_workers": 0}
        }
        for name, kind in self.workers.items():
            types[name] = {
                "resources": kind["resources"],
                "node_config": {},
                "min_workers": 0,
                "max_workers": kind["max"],
            }
        return {
            "cluster_name": self.name,
            "max_workers": sum(kind["max"] for kind in self.workers.values()),
            "idle_timeout_minutes": self.idle_timeout_minutes,
            "upscaling_speed": 1.0,
            # as Ray's own fake_multi_node example: no SSH updaters, no launch-config check (local processes)
            "provider": {
                "type": "fake_multinode",
                "gcs_address": self.address,
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
            },
            "auth": {"ssh_user": "ray"},
            "head_node_type": "ray.head.default",
            "available_node_types": types,
            "file_mounts": {},
            "cluster_synced_files": [],
            "file_mounts_sync_continuously": False,
            "rsync_exclude": [],
            "rsync_filter": [],
            "initialization_commands": [],
            "setup_commands": [],
            "head_setup_commands": [],
            "worker_setup_commands": [],
            "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
        }

    def start(self) -> FakeAutoscalingCluster:
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True)
        cfg = self.folder / "autoscaling.json"
        cfg.write_text(json.dumps(self.config()))
        env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        if self.v2:
            env["RAY_enable_autoscaler_v2"] = "1"
        head = [
            RAY,
            "start",
            "--head",
            f"--port={self.port}",
            "--num-cpus=0",
            f"--temp-dir={self.folder / 'ray'}",
            "--node-ip-address=127.0.0.1",
            f"--autoscaling-config={cfg}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            "--disable-usage-stats",
        ]
        self.run(head, env=env, timeout=120, check=True)
        self.started = time.monotonic()
        return self

    def run(self, args: list[str], env: dict[str, str] | None = None, timeout: float = 300, check: bool = False):
        proc = subprocess.run(
            ["ip", "netns", "exec", self.name, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**self.env, **(env or {})},
            cwd=ROOT,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def probe(self, what: str, *args: str) -> Any:
        """What a driver sees of the cluster (tests/cluster_state.py WHAT ARGS), as parsed JSON."""
        proc = self.run([PY, str(ROOT / "tests/cluster_state.py"), self.address, what, *args], timeout=120, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def popen(self, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        return subprocess.Popen(
            ["ip", "netns", "exec", self.name, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**self.env, **(env or {})},
            cwd=ROOT,
        )

    def stop(self) -> None:
        """Stops every process in the namespace (the head, its autoscaler, the workers it started, drivers), then
        removes the namespace and the folder."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.pids()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 3  # then SIGKILL
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.3)
        subprocess.run(["ip", "netns", "delete", self.name], check=False)
        shutil.rmtree(self.folder, ignore_errors=True)

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]


if __name__ == "__main__":
    cluster = FakeAutoscalingCluster({"cpu2": {"resources": {"CPU": 2}, "max": 2}}).start()
    print(
        json.dumps(
            {
                "namespace": cluster.name,
                "address": cluster.address,
                "dashboard": cluster.dashboard,
                "env": {k: cluster.env[k] for k in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")},
            }
        )
    )
    try:
        input("Enter stops it ")
    finally:
        cluster.stop()
