"""In-cluster progress: a training run patches its own FineTuneJob's status.progress on a real API server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.trainer  # and `cluster`, through the fixture

REPO = Path(__file__).resolve().parents[2]


def test_training_reports_progress_to_its_finetunejob(cluster, namespace, train_config, monkeypatch):
    from kubetune.trainer.train import run_train

    cluster.kubectl("apply", "-f", str(REPO / "crds" / "finetunejob.yaml"))
    cluster.kubectl("wait", "--for=condition=Established", "crd/finetunejobs.kubetune.io", "--timeout=60s")
    job = yaml.safe_load((REPO / "examples" / "finetunejob.yaml").read_text())
    job["metadata"]["namespace"] = namespace
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(job))

    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    monkeypatch.setenv("KUBETUNE_JOB_NAME", job["metadata"]["name"])
    monkeypatch.setenv("KUBETUNE_JOB_NAMESPACE", namespace)
    cfg = train_config(rows=48, training={"maxSteps": 6, "checkpointEvery": 3})
    result = run_train(cfg)
    assert result.exit_code == 0

    obj = json.loads(cluster.kubectl("get", "finetunejobs.kubetune.io", job["metadata"]["name"], "-n", namespace,
                                     "-o", "json").stdout)
    progress = obj["status"]["progress"]
    assert progress["step"] == 6 and progress["totalSteps"] == 6
    assert progress["evalLoss"] > 0 and progress["loss"] > 0 and "learningRate" in progress and "updatedAt" in progress
    assert progress["lastCheckpoint"]["step"] == 6
    assert progress["lastCheckpoint"]["uri"] == f"{cfg.output.uri.rstrip('/')}/checkpoints/step-00000006/"
    assert obj["spec"]["baseModel"]["name"] == "tiny-llama"  # a status patch leaves the spec alone
