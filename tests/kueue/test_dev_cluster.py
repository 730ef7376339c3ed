"""`kubetune dev cluster up --kueue`: a development cluster whose Kueue admits a
Job applied with kubectl, and which `down` stops entirely."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kubetune.devcluster import processes

pytestmark = pytest.mark.cluster

MANIFESTS = """
apiVersion: kueue.x-k8s.io/v1beta2
kind: ResourceFlavor
metadata: {name: default}
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: ClusterQueue
metadata: {name: gpus}
spec:
  namespaceSelector: {}
  resourceGroups:
  - coveredResources: [cpu, memory, nvidia.com/gpu]
    flavors:
    - name: default
      resources:
      - {name: cpu, nominalQuota: 64}
      - {name: memory, nominalQuota: 256Gi}
      - {name: nvidia.com/gpu, nominalQuota: 8}
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: LocalQueue
metadata: {name: team, namespace: default}
spec: {clusterQueue: gpus}
---
apiVersion: batch/v1
kind: Job
metadata:
  name: hello
  labels: {kueue.x-k8s.io/queue-name: team}
spec:
  suspend: true
  template:
    spec:
      restartPolicy: Never
      tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
      containers:
      - name: main
        image: kubetune/trainer:test
        resources: {limits: {nvidia.com/gpu: 2}}
"""


def _kubetune(*args: str, env: dict) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("kubetune")
    return subprocess.run([str(script), *args], env=env, capture_output=True, text=True, timeout=240)


def test_dev_cluster_up_with_kueue_admits_a_queued_job_and_down_stops_kueue(cluster, kueue, tmp_path):
    # `kueue` guarantees the binary is built; the CLI starts its own cluster and Kueue.
    env = {**os.environ, "KUBETUNE_RUN_ROOT": str(tmp_path / "run")}
    up = _kubetune("dev", "cluster", "up", "--kueue", env=env)
    state_file = tmp_path / "run" / "dev" / "state.json"
    try:
        assert up.returncode == 0, up.stderr
        kubeconfig = tmp_path / "run" / "dev" / "admin.kubeconfig"

        def kubectl(*args: str, input: str | None = None) -> str:
            argv = [str(cluster.kubectl_binary), f"--kubeconfig={kubeconfig}", *args]
            return subprocess.run(argv, input=input, capture_output=True, text=True, check=True).stdout

        kubectl("apply", "-f", "-", input=MANIFESTS)
        deadline = time.monotonic() + 60
        while kubectl("get", "job", "hello", "-o", "jsonpath={.status.succeeded}") != "1":
            assert time.monotonic() < deadline, kubectl("get", "workloads", "-o", "yaml")
            time.sleep(0.5)
        (workload,) = json.loads(kubectl("get", "workloads", "-o", "json"))["items"]
        conditions = {c["type"]: c["status"] for c in workload["status"]["conditions"]}
        assert conditions["Admitted"] == "True" and conditions["Finished"] == "True"
        assert workload["status"]["admission"]["clusterQueue"] == "gpus"
        pids = json.loads(state_file.read_text())["pids"]
        assert "kueue" in pids
    finally:
        down = _kubetune("dev", "cluster", "down", env=env)
    assert down.returncode == 0 and down.stdout.startswith("stopped: kueue, kwok"), down.stdout + down.stderr
    assert not any(processes.is_alive(pid) for pid in pids.values())
