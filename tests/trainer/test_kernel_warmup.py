"""The first step's kernel warm-up (trainer/warmup.py, issue 16 item 5) on a CPU: the child
runs the trainer's own load_model and a forward + backward on a one-layer copy of the
model's shape; it is only started where an NVIDIA device exists; a failing or missing child
never stops the run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.trainer


def _cfg(model_dir: Path, tmp_path: Path) -> dict:
    return {"baseModel": {"uri": str(model_dir)}, "dataset": {"uri": str(tmp_path / "d.jsonl"), "maxLength": 128},
            "method": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.1}, "output": {"uri": str(tmp_path / "out")},
            "training": {"gradientCheckpointing": True}}


def test_one_layer_config_keeps_every_per_layer_shape(tiny_model):
    from transformers import AutoConfig

    from kubetune.trainer.warmup import one_layer_config

    full = AutoConfig.from_pretrained(tiny_model)
    small = one_layer_config(full)
    assert small.num_hidden_layers == 1 and small.vocab_size == 512 and full.num_hidden_layers == 2
    for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "rope_parameters"):
        assert getattr(small, name) == getattr(full, name)


def test_packed_batch_restarts_positions():
    import torch

    from kubetune.trainer.warmup import WARMUP_TOKENS, packed_batch

    assert any(t % 16 == 0 for t in WARMUP_TOKENS) and any(t % 16 for t in WARMUP_TOKENS)
    b = packed_batch(1021, 64, torch.device("cpu"))
    assert b["input_ids"].shape == (1, 1021) and int(b["input_ids"].max()) < 64
    pos = b["position_ids"][0].tolist()
    assert pos[:3] == [0, 1, 2] and pos[510] == 0 and pos[-1] == 1021 - 510 - 1
    assert torch.equal(b["labels"], b["input_ids"])


def test_run_goes_through_load_model_forward_and_backward(tiny_model, tmp_path, monkeypatch):
    from kubetune.trainer import train, warmup

    seen = {}
    real = train.load_model

    def spy(cfg, model_dir, **kw):
        model = real(cfg, model_dir, **kw)
        seen["layers"] = len([m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")])
        seen["lora"] = [n for n, p in model.named_parameters() if p.requires_grad]
        seen["model"] = model
        return model

    monkeypatch.setattr(train, "load_model", spy)
    assert warmup.run(_cfg(tiny_model, tmp_path), str(tiny_model)) == 0 and not seen  # no CUDA: nothing
    assert warmup.run(_cfg(tiny_model, tmp_path), str(tiny_model), allow_cpu=True) == 0
    assert seen["layers"] == 1 and seen["lora"]
    # the backward ran: every adapter weight got a gradient
    assert all(p.grad is not None for n, p in seen["model"].named_parameters() if p.requires_grad)


def test_started_only_where_it_pays(monkeypatch):
    from kubetune.trainer import warmup

    monkeypatch.setattr(warmup.os.path, "exists", lambda p: p == "/dev/nvidiactl")
    assert warmup.wanted({})
    assert not warmup.wanted({"LOCAL_RANK": "1"})  # one per node
    assert not warmup.wanted({"KUBETUNE_KERNEL_WARMUP": "0"})
    monkeypatch.setattr(warmup.os.path, "exists", lambda p: False)
    assert not warmup.wanted({})  # no NVIDIA device
    handle = warmup.KernelWarmup.start({"x": 1})  # not wanted here: no child, every call a no-op
    assert handle.proc is None
    handle.model_ready("/m")
    assert handle.finish() is None


def test_child_process_reads_config_then_model_folder(tiny_model, tmp_path):
    from kubetune.trainer import warmup

    handle = warmup.KernelWarmup.start(_cfg(tiny_model, tmp_path), enabled=True)
    assert handle.proc is not None and handle.proc.args[1:] == ["-m", "kubetune.trainer.warmup"]
    handle.model_ready(tiny_model)
    assert handle.finish(wait_s=300) == 0  # on a CPU it imports, reads both lines and stops
    assert handle.proc is None and handle.finish() is None


def test_a_child_that_fails_or_hangs_never_stops_the_run(tmp_path, monkeypatch):
    import subprocess

    from kubetune.trainer import warmup

    bad = warmup.KernelWarmup(subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"],
                                               stdin=subprocess.PIPE, text=True))
    assert bad.finish(wait_s=30) == 3
    slow = warmup.KernelWarmup(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                                stdin=subprocess.PIPE, text=True))
    proc = slow.proc
    assert slow.finish(wait_s=0.5) is None and proc.poll() is not None  # stopped, not waited for


def test_run_train_starts_the_warmup_first_and_waits_before_the_first_step(train_config, monkeypatch):
    from kubetune.trainer import train, warmup

    calls = []

    class Spy(warmup.KernelWarmup):
        @classmethod
        def start(cls, config, enabled=None):
            calls.append(("start", json.dumps(config)[:1]))
            return cls(None)

        def model_ready(self, model_dir):
            calls.append(("model_ready", Path(model_dir).is_dir()))

        def finish(self, wait_s=warmup.WAIT_S):
            calls.append(("finish", wait_s))
            return None

    monkeypatch.setattr(warmup, "KernelWarmup", Spy)
    result = train.run_train(train_config(training={"maxSteps": 2, "checkpointEvery": 100}))
    assert result.exit_code == 0
    assert [c[0] for c in calls] == ["start", "model_ready", "finish", "finish"]
    assert calls[1] == ("model_ready", True) and calls[2] == ("finish", warmup.WAIT_S) and calls[3] == ("finish", 0)
