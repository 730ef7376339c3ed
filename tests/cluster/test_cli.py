"""`kubetune dev cluster up|env|down` starts a cluster that outlives the command and stops it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune.devcluster import processes

pytestmark = pytest.mark.cluster


def _kubetune(*args: str, env: dict) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("kubetune")
    return subprocess.run([str(script), *args], env=env, capture_output=True, text=True, timeout=180)


def test_dev_cluster_up_env_down(cluster, tmp_path):
    # `cluster` guarantees the binaries are built; the CLI gets its own run root.
    env = {**os.environ, "KUBETUNE_RUN_ROOT": str(tmp_path / "run")}
    up = _kubetune("dev", "cluster", "up", "--gpu-nodes", "2", env=env)
    try:
        assert up.returncode == 0, up.stderr
        kubeconfig = tmp_path / "run" / "dev" / "admin.kubeconfig"
        assert f"export KUBECONFIG={kubeconfig}" in up.stdout

        # The command has exited; the control plane still serves.
        nodes = json.loads(subprocess.run(
            [str(cluster.kubectl_binary), f"--kubeconfig={kubeconfig}", "get", "nodes", "-o", "json"],
            capture_output=True, text=True, check=True,
        ).stdout)["items"]
        by_name = {n["metadata"]["name"]: n for n in nodes}
        assert sorted(by_name) == ["cpu-node-0", "gpu-node-0", "gpu-node-1"]
        # Beside the tainted GPU nodes, one untainted CPU node: pods without a GPU
        # toleration (validate, merge) have somewhere to run.
        cpu = by_name["cpu-node-0"]
        assert not cpu["spec"].get("taints") and "nvidia.com/gpu" not in cpu["status"]["allocatable"]
        assert all(by_name[g]["spec"]["taints"][0]["key"] == "nvidia.com/gpu" for g in ("gpu-node-0", "gpu-node-1"))
        assert all(
            c["status"] == "True" for n in nodes for c in n["status"]["conditions"] if c["type"] == "Ready"
        )
        assert _kubetune("dev", "cluster", "env", env=env).stdout.strip() == f"export KUBECONFIG={kubeconfig}"
        pids = json.loads((tmp_path / "run" / "dev" / "state.json").read_text())["pids"].values()
    finally:
        down = _kubetune("dev", "cluster", "down", env=env)
    assert down.returncode == 0 and "stopped: kwok" in down.stdout, down.stdout + down.stderr
    assert not any(processes.is_alive(pid) for pid in pids)
    assert not (tmp_path / "run" / "dev").exists()
    after = _kubetune("dev", "cluster", "env", env=env)
    assert after.returncode == 1 and "no development cluster is running" in after.stderr
