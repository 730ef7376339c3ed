"""The operator's own `accelerate launch` line, run for real: 2 machines x 1 process on CPU (gloo).

Each "node" is one launcher process with its own cache folder, as two pods of
the Indexed train Job would be; they meet at the rank-0 address the operator
renders (here loopback instead of the headless Service's DNS name).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.trainer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_line(rank: int, port: int, config: Path) -> list[str]:
    """The train container's args, from the operator's builder, made runnable on this machine."""
    from kubetune.operator import names, revisions, training
    from kubetune.operator.api import FineTuneJob
    from kubetune.operator.settings import OperatorSettings

    job = FineTuneJob.from_body({
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "launch", "namespace": "tenant-a", "generation": 1, "uid": "u-1"},
        "spec": {"baseModel": {"uri": "s3://models/tiny/"}, "dataset": {"uri": "s3://data/d.jsonl"},
                 "output": {"uri": "s3://out/launch/"}, "method": {"type": "lora"},
                 "resources": {"nodes": 2, "gpusPerNode": 1, "strategy": "ddp"}},
    })
    settings = OperatorSettings(trainer_image="registry.local/kubetune:test")
    args = training.accelerate_args(job, settings)
    assert args[:2] == ["accelerate", "launch"]
    host = names.train_pod_host("launch", revisions.of(job), 0, "tenant-a")
    swap = {
        "accelerate": str(Path(sys.executable).with_name("accelerate")),
        f"$({training.COMPLETION_INDEX_ENV})": str(rank),  # what the kubelet expands in the pod
        host: "127.0.0.1",
        str(settings.main_process_port): str(port),
        training.CONFIG_PATH: str(config),
    }
    return [swap.get(a, a) for a in args]


def test_operator_launch_line_trains_on_two_machines(tiny_model, support_rows, tmp_path):
    data = tmp_path / "data.jsonl"
    import json

    data.write_text("".join(json.dumps(r) + "\n" for r in support_rows[:64]), encoding="utf-8")
    config = tmp_path / "trainer.yaml"
    config.write_text(yaml.safe_dump({
        "baseModel": {"uri": str(tiny_model), "name": "tiny-llama"},
        "dataset": {"uri": str(data), "validationSplit": 0.15, "maxLength": 128},
        "method": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "training": {"maxSteps": 4, "learningRate": 0.01, "batchSize": 4, "checkpointEvery": 2, "seed": 7},
        "output": {"uri": str(tmp_path / "out")},
    }))
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "KUBETUNE_CACHE_DIR": str(tmp_path / f"node{rank}"), "HF_HUB_OFFLINE": "1",
               "KUBETUNE_TERMINATION_LOG": str(tmp_path / f"termination-{rank}"), "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen(_launch_line(rank, port, config), cwd=tmp_path, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {rank}:\n{out[-3000:]}"
    assert "--multi_gpu" in _launch_line(0, port, config) and "--num_machines" in _launch_line(0, port, config)
    steps = [int(m.group(1)) for m in re.finditer(r"^step (\d+)/4 \|", outs[0], re.M)]
    assert sorted(set(steps)) == [1, 2, 3, 4]
    assert not re.search(r"^step \d+/4 \|", outs[1], re.M)  # only the global rank 0 reports

    from kubetune.trainer import artifacts
    from kubetune.trainer.storage import open_store

    store = open_store(str(tmp_path / "out"))
    manifest = artifacts.read_manifest(store, artifacts.ADAPTER)
    assert "adapter_model.safetensors" in manifest["files"]
    ckpt = artifacts.read_manifest(store, artifacts.checkpoint_prefix(4))
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(ckpt["files"])
