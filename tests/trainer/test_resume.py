"""Kill `kubetune train` mid-run (SIGTERM, and separately SIGKILL), start it again: it resumes from the
newest complete checkpoint, the step count and loss curve continue, and the final adapter equals the
one of an uninterrupted run with the same seed. Real subprocesses against the S3 server.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from kubetune.trainer import artifacts

pytestmark = pytest.mark.trainer

STEPS = 12
STEP_LINE = re.compile(r"^step (\d+)/(\d+)")


@pytest.fixture(scope="module")
def setup(s3, tiny_model, support_rows, tmp_path_factory):
    """(env, write_config(name) -> path, baseline adapter tensors, store factory)."""
    from kubetune.devcluster.s3server import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY

    tmp = tmp_path_factory.mktemp("resume")
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    s3.client.create_bucket(Bucket=bucket)
    for f in tiny_model.iterdir():
        s3.client.upload_file(str(f), bucket, f"models/tiny/{f.name}")
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in support_rows[:64]))
    s3.client.upload_file(str(data), bucket, "data/train.jsonl")
    env = {**os.environ, "AWS_ENDPOINT_URL": s3.endpoint_url, "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
           "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY, "AWS_REGION": REGION, "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "KUBETUNE_TERMINATION_LOG": str(tmp / "termination-log"),
           "PYTHONUNBUFFERED": "1"}

    def write_config(name: str, **sections) -> Path:
        cfg = {
            "baseModel": {"uri": f"s3://{bucket}/models/tiny/", "name": "tiny-llama"},
            "dataset": {"uri": f"s3://{bucket}/data/train.jsonl", "validationSplit": 0.1, "maxLength": 128},
            # Dropout on: the RNG state must be restored too for the resumed run to match.
            "method": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.1},
            "training": {"maxSteps": STEPS, "learningRate": 0.01, "batchSize": 4, "checkpointEvery": 4,
                         "warmupRatio": 0.1, "seed": 11, "evalEvery": 100},
            "output": {"uri": f"s3://{bucket}/{name}/"},
            "storage": {"cacheDir": str(tmp / "cache")},
        }
        for key, val in sections.items():
            cfg[key] = {**cfg[key], **val}
        path = tmp / f"{name}-{len(list(tmp.glob(f'{name}*.json')))}.json"
        path.write_text(json.dumps(cfg))
        return path

    def store(name: str):
        from kubetune.trainer.storage import S3Store

        return S3Store(f"s3://{bucket}/{name}", s3.new_client())

    baseline = _train(write_config("baseline"), env)
    assert baseline.returncode == 0, baseline.stdout[-3000:]
    return env, write_config, _adapter(store("baseline"), tmp / "baseline"), store, tmp


def _train(config: Path, env: dict, stop_after: int | None = None, sig: int | None = None,
           ready=lambda: True, argv: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run `kubetune train`; with `sig`, send it once a step >= stop_after was logged and ready() holds."""
    argv = argv or [sys.executable, "-m", "kubetune", "train", "--config", str(config)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            m = STEP_LINE.match(line)
            if sig is not None and m and int(m.group(1)) >= stop_after and ready():
                proc.send_signal(sig)
                sig = None
        proc.wait(timeout=300)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(lines))


def _adapter(store, into: Path) -> dict:
    from safetensors.torch import load_file

    artifacts.fetch_dir(store, artifacts.ADAPTER, into)
    return load_file(str(into / "adapter_model.safetensors"))


def _train_steps(store, into: Path) -> list[int]:
    artifacts.fetch_dir(store, artifacts.ADAPTER, into)
    return [r["step"] for r in map(json.loads, (into / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _assert_same_adapter(got: dict, want: dict) -> None:
    import torch

    assert got.keys() == want.keys() and got
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_sigterm_checkpoints_and_resumes(setup):
    env, write_config, baseline, store, tmp = setup
    config = write_config("sigterm")
    first = _train(config, env, stop_after=6, sig=signal.SIGTERM)
    # The step in flight finishes, a checkpoint of exactly that step is uploaded, the exit code says SIGTERM.
    assert first.returncode == 143, first.stdout[-3000:]
    stopped = int(re.search(r"stopped on SIGTERM after step (\d+)", first.stdout).group(1))
    assert 6 <= stopped < STEPS
    assert artifacts.latest_checkpoint(store("sigterm")) == stopped
    assert artifacts.read_manifest(store("sigterm"), artifacts.ADAPTER) is None  # not finished: no adapter
    msg = json.loads((tmp / "termination-log").read_text())
    assert msg["stage"] == "train" and msg["reason"] == "Preempted" and msg["step"] == stopped
    _operator_restarts_without_counting((tmp / "termination-log").read_text())

    second = _train(config, env)
    assert second.returncode == 0, second.stdout[-3000:]
    assert f"step-{stopped:08d}" in second.stdout  # "resuming from .../checkpoints/step-0000000N/"
    steps = [int(m.group(1)) for m in map(STEP_LINE.match, second.stdout.splitlines()) if m]
    assert steps[0] == stopped + 1  # the step count continues
    assert _train_steps(store("sigterm"), tmp / "sigterm-adapter") == list(range(1, STEPS + 1))  # one curve
    _assert_same_adapter(_adapter(store("sigterm"), tmp / "sigterm-adapter"), baseline)


def _operator_restarts_without_counting(termination_message: str) -> None:
    """What the operator makes of that pod (preempted: Kueue evicted it, a node was drained): the
    same termination message through its observers and decision gives a restart of the gang that
    does not count toward spec.resources.maxRestarts; the run above then resumes from the checkpoint."""
    from kubetune.operator.api import FineTuneJob
    from kubetune.operator.lifecycle import decide, restart_kind
    from kubetune.operator.outcomes import StageOutcome, job_outcome

    job = {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]},
           "metadata": {"labels": {}}, "spec": {}}
    pod = {"metadata": {"name": "ftj-train-r-0-x", "annotations": {"batch.kubernetes.io/job-completion-index": "0"},
                        "creationTimestamp": "2026-01-01T00:00:00Z"},
           "status": {"phase": "Failed", "containerStatuses": [{"state": {"terminated": {
               "exitCode": 143, "reason": "Error", "message": termination_message}}}]}}
    outcome = job_outcome(job, [pod])
    assert outcome.state == "failed" and outcome.reason == "Preempted" and restart_kind(outcome) == "preempted"
    ftj = FineTuneJob.from_body({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
                                 "metadata": {"name": "ftj", "namespace": "ns", "uid": "u"},
                                 "spec": {"baseModel": {"uri": "s3://models/x/"}, "dataset": {"uri": "s3://data/x.jsonl"},
                                          "output": {"uri": "s3://out/x/"}, "resources": {"maxRestarts": 0}}})
    done = StageOutcome("succeeded", "Completed", "", {"ok": True})
    decision = decide(ftj, {"validate": done, "train": outcome}, restarts=0)
    assert decision.restart == "train" and decision.restart_counts is False


def test_sigkill_resumes_from_last_complete_checkpoint(setup):
    env, write_config, baseline, store, tmp = setup
    config = write_config("sigkill")
    first = _train(config, env, stop_after=6, sig=signal.SIGKILL,
                   ready=lambda: artifacts.latest_checkpoint(store("sigkill")) == 4)
    assert first.returncode == -signal.SIGKILL, first.stdout[-3000:]
    assert artifacts.latest_checkpoint(store("sigkill")) == 4

    second = _train(config, env)
    assert second.returncode == 0, second.stdout[-3000:]
    assert "step-00000004" in second.stdout
    steps = [int(m.group(1)) for m in map(STEP_LINE.match, second.stdout.splitlines()) if m]
    assert steps[0] == 5  # steps 5.. after the kill are redone from the checkpoint, not skipped
    assert _train_steps(store("sigkill"), tmp / "sigkill-adapter") == list(range(1, STEPS + 1))
    _assert_same_adapter(_adapter(store("sigkill"), tmp / "sigkill-adapter"), baseline)


def _torchrun(config: Path, env: dict, **kwargs) -> subprocess.CompletedProcess:
    """2 CPU processes (gloo) under torchrun: what `accelerate launch --multi_gpu` starts on GPUs."""
    args = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), "-m", "kubetune", "train", "--config", str(config)]
    return _train(config, env, argv=[sys.executable, *args], **kwargs)


def test_two_process_ddp_run_stops_on_sigterm_and_resumes(setup):
    """SIGTERM to the launcher reaches every rank; the ranks agree on the step to stop at, rank 0 uploads a
    checkpoint holding every rank's RNG state, and the resumed run ends where an uninterrupted one does."""
    env, write_config, _, store, tmp = setup
    whole = _torchrun(write_config("ddp-whole"), env)
    assert whole.returncode == 0, whole.stdout[-3000:]
    assert whole.stdout.count("step 1/12 |") == 1  # only rank 0 reports
    ckpt = artifacts.read_manifest(store("ddp-whole"), artifacts.checkpoint_prefix(4))
    assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt", "adapter_model.safetensors"} <= set(ckpt["files"])

    config = write_config("ddp")
    first = _torchrun(config, env, stop_after=6, sig=signal.SIGTERM)
    assert first.returncode != 0  # the launcher reports the signal; the workers saved first:
    stopped = int(re.search(r"stopped on SIGTERM after step (\d+)", first.stdout).group(1))
    assert 6 <= stopped < STEPS and artifacts.latest_checkpoint(store("ddp")) == stopped
    second = _torchrun(config, env)
    assert second.returncode == 0, second.stdout[-3000:]
    assert f"step-{stopped:08d}" in second.stdout
    assert _train_steps(store("ddp"), tmp / "ddp-adapter") == list(range(1, STEPS + 1))
    _assert_same_adapter(_adapter(store("ddp"), tmp / "ddp-adapter"), _adapter(store("ddp-whole"), tmp / "ddp-whole"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_resume_under_another_config_fails_naming_the_changed_fields(setup):
    """The same output.uri with method.r 8 -> 4 (and a new learning rate): the checkpoints belong to another run.
    The stage fails in one line naming both fields (no PEFT size-mismatch traceback), and leaves the old run's
    checkpoints alone; a change of what is only logging or bookkeeping still resumes."""
    env, write_config, _, store, tmp = setup
    before = artifacts.complete_checkpoints(store("baseline"))
    assert before  # the fixture's finished run left checkpoints behind
    changed = _train(write_config("baseline", method={"r": 4}, training={"learningRate": 0.02}), env)
    assert changed.returncode == 1, changed.stdout[-3000:]
    assert "Traceback" not in changed.stdout
    lines = [l for l in changed.stdout.splitlines() if l.startswith("train failed:")]
    assert len(lines) == 1
    assert "/checkpoints/step-00000012/ was trained under another config (method.r: 8 -> 4; " \
           "training.learningRate: 0.01 -> 0.02); resuming from it would mix two runs." in lines[0]
    assert lines[0].endswith("Put the changed run under another output.uri, or delete "
                             f"{store('baseline').uri.rstrip('/')}/checkpoints/ to start it over here")
    msg = json.loads((tmp / "termination-log").read_text())
    assert msg["stage"] == "train" and msg["ok"] is False and msg["reason"] == "CheckpointOfAnotherRun"
    assert "method.r: 8 -> 4" in msg["message"]
    assert artifacts.complete_checkpoints(store("baseline")) == before

    same_run = _train(write_config("baseline", training={"logEvery": 2, "keepCheckpoints": 5, "evalEvery": 50}), env)
    assert same_run.returncode == 0, same_run.stdout[-3000:]
    assert f"step-{before[-1]:08d}" in same_run.stdout  # resumed from the newest checkpoint
