"""The kernel warm-up children (trainer/kernel_warmup.py): what they build from a config, when they
start, how the trainer waits for them, and their layer and LM head run for real (on the CPU: the
routing and shapes of the GPU run, through the same nodes; the GPU compile itself is measured
by bench/run.py, variant @nowarm against the default)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from kubetune.trainer import kernel_warmup as kw
from kubetune.trainer.config import parse_config

LLAMA_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5,
            "hidden_act": "silu"}


def config(tmp_path, method=None, **model_uri):
    return parse_config({"baseModel": {"uri": str(model_uri.get("uri", tmp_path))}, "dataset": {"uri": "d.jsonl"},
                         "output": {"uri": str(tmp_path / "out")}, "method": method or {"type": "qlora"}})


def test_geometry_of_a_llama_8b_qlora_run(tmp_path):
    geo = kw.geometry(config(tmp_path), LLAMA_8B)
    assert (geo.hidden, geo.intermediate, geo.heads, geo.kv_heads, geo.head_dim, geo.vocab) == (4096, 14336, 32, 8, 128, 128256)
    assert geo.quantized and geo.double_quant and geo.fusable
    assert geo.adapted == frozenset(kw.PROJECTIONS)  # the default target, all-linear
    assert (geo.rank, geo.scaling, geo.dropout, geo.eps) == (16, 2.0, 0.05, 1e-5)
    assert geo.shape("k_proj") == (4096, 1024) and geo.shape("o_proj") == (4096, 4096)
    assert geo.shape("down_proj") == (14336, 4096)


def test_geometry_follows_the_method(tmp_path):
    method = {"type": "lora", "r": 64, "alpha": 16, "useRslora": True, "targetModules": ["q_proj", "v_proj"],
              "dropout": 0.0}
    geo = kw.geometry(config(tmp_path, method), {**LLAMA_8B, "head_dim": 64})
    assert not geo.quantized and geo.adapted == frozenset({"q_proj", "v_proj"})
    assert geo.scaling == pytest.approx(16 / 8) and geo.head_dim == 64 and geo.dropout == 0.0
    assert not kw.geometry(config(tmp_path, {"type": "lora", "useDora": True}), LLAMA_8B).fusable


def test_geometry_reads_a_nested_text_config_and_declines_unknown_layers(tmp_path):
    cfg = config(tmp_path)
    assert kw.geometry(cfg, {"model_type": "llava", "text_config": LLAMA_8B}).hidden == 4096
    assert kw.geometry(cfg, {**LLAMA_8B, "model_type": "gemma2"}) is None
    assert kw.geometry(cfg, {**LLAMA_8B, "hidden_act": "gelu"}) is None


def test_wanted_only_on_a_gpu_pods_first_process(tmp_path):
    cfg = config(tmp_path)
    gpu = tmp_path / "nvidiactl"
    gpu.write_text("")
    assert kw.wanted(cfg, env={}, gpu_device=str(gpu))
    assert not kw.wanted(cfg, env={}, gpu_device=str(tmp_path / "absent"))
    assert not kw.wanted(cfg, env={"KUBETUNE_KERNEL_WARMUP": "0"}, gpu_device=str(gpu))
    assert not kw.wanted(cfg, env={"LOCAL_RANK": "1"}, gpu_device=str(gpu))
    assert not kw.wanted(cfg, env={"CUDA_VISIBLE_DEVICES": ""}, gpu_device=str(gpu))
    assert kw.wanted(cfg, env={"LOCAL_RANK": "0", "KUBETUNE_KERNEL_WARMUP": "1"}, gpu_device=str(gpu))


def _child(*codes: str) -> kw.Warmup:
    return kw.Warmup([subprocess.Popen([sys.executable, "-c", c]) for c in codes], time.time())


def test_settle_waits_for_the_children_and_stops_slow_ones():
    assert "done" in _child("pass", "pass").settle(timeout=30)
    assert "exited 3" in _child("pass", "raise SystemExit(3)").settle(timeout=30)
    slow = _child("pass", "import time; time.sleep(60)")
    t0 = time.time()
    note = slow.settle(timeout=0.5)
    assert "stopped after" in note and all(p.poll() is not None for p in slow.processes) and time.time() - t0 < 10


def test_settle_and_cancel_without_a_child_are_no_ops(monkeypatch):
    monkeypatch.setattr(kw, "_running", None)
    assert kw.settle() is None and kw.cancel() is False
    monkeypatch.setattr(kw, "_running", _child("import time; time.sleep(60)"))
    child = kw._running
    assert kw.cancel() is True and child.processes[0].poll() is not None and kw._running is None


def test_start_launches_the_child_with_the_config(tmp_path, monkeypatch):
    gpu = tmp_path / "nvidiactl"
    gpu.write_text("")
    seen = {}

    class FakePopen:
        def __init__(self, argv, **kwargs):
            seen.setdefault("argv", []).append(argv)

    monkeypatch.setattr(kw.subprocess, "Popen", FakePopen)
    monkeypatch.setattr(kw, "_running", None)
    handle = kw.start(tmp_path / "trainer.yaml", config(tmp_path), env={}, gpu_device=str(gpu))
    assert handle is kw._running and len(handle.processes) == 2
    assert [argv[1:] for argv in seen["argv"]] == [
        ["-m", "kubetune.trainer.kernel_warmup", "--config", str(tmp_path / "trainer.yaml"), "--part", part]
        for part in ("layer", "libraries")]
    monkeypatch.setattr(kw, "_running", None)
    assert kw.start(tmp_path / "trainer.yaml", config(tmp_path), env={}, gpu_device=str(tmp_path / "no")) is None


def _perf(**on):
    from kubetune.trainer.performance import Resolved

    base = dict(attention="sdpa", liger=False, fused_lora=True, fp8=False, compile=False,
                selective_checkpointing=False, memory_budget_gib=None)
    return Resolved(**{**base, **on})


def test_the_layer_runs_forward_and_backward_through_the_trainers_nodes(tmp_path):
    torch = pytest.importorskip("torch")
    tiny = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 96}
    geo = kw.geometry(config(tmp_path, {"type": "lora", "targetModules": ["q_proj", "v_proj", "down_proj"]}), tiny)
    layer = kw.Layer(geo, _perf(), torch.device("cpu"))
    for n in (5, 8):
        layer.step(n)
    assert set(layer.lora) == {"q_proj", "v_proj", "down_proj"}
    assert all(layer.route[n].fused for n in layer.lora)  # fused LoRA on, no DoRA: the trainer's own node
    for name, (a, b) in layer.lora.items():
        # b starts at zero (as PEFT's), so its gradient is the one that reaches back through the head
        assert b.grad is not None and b.grad.abs().sum() > 0, name
        assert a.grad is not None
    assert not any(r.fp8 for r in layer.route.values()) and layer.share == {}


def test_the_libraries_part_runs_the_lm_head_forward_and_backward(tmp_path):
    torch = pytest.importorskip("torch")
    tiny = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
            "num_attention_heads": 4, "vocab_size": 96}
    geo = kw.geometry(config(tmp_path), tiny)
    seen = []
    from kubetune.trainer import lm_head

    real = lm_head.one_pass_function()

    class Spy:
        @staticmethod
        def apply(hidden, *args):
            out = real.apply(hidden, *args)
            seen.append((hidden, args[4], args[-1], out[0]))
            return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lm_head, "one_pass_function", lambda: Spy)
        kw.libraries_step(geo, _perf(), torch.device("cpu"), 7)  # Liger off: the head only
    (hidden, chunk, outputs, logprobs), = seen
    assert hidden.shape == (6, kw.HEAD_WIDTH) and outputs == kw.LM_HEAD_OUTPUTS and chunk == 4096
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0 and logprobs.shape == (6,)


def test_routes_follow_the_trainers_fast_paths(tmp_path):
    from kubetune.trainer import fp8

    geo = kw.geometry(config(tmp_path, {"type": "qlora", "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"]}),
                      LLAMA_8B)
    r = kw.routes(geo, _perf(fp8=True, fp8_swiglu=True), fp8.pays)
    assert all(r[n] == kw.Route(True, True, True) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert all(r[n] == kw.Route(False, False, True) for n in ("gate_proj", "up_proj", "down_proj"))
    assert kw.shares(r) == {"q_proj": fp8.OPEN, "k_proj": fp8.USE, "v_proj": fp8.CLOSE,
                            "gate_proj": fp8.OPEN, "up_proj": fp8.CLOSE}
    assert kw.swiglu_in_fp8(r, _perf(fp8=True, fp8_swiglu=True))
    assert not kw.swiglu_in_fp8(r, _perf(fp8=True, fp8_swiglu=False))  # Liger's SwiGLU then
    # No fused LoRA (or DoRA): PEFT's forward, whose base product stays in bf16.
    r = kw.routes(geo, _perf(fp8=True, fused_lora=False), fp8.pays)
    assert r["q_proj"] == kw.Route(True, False, False) and r["gate_proj"].fp8
    assert kw.shares(r) == {"gate_proj": fp8.OPEN, "up_proj": fp8.CLOSE}
    # An adapted down_proj keeps the SwiGLU product in bf16.
    geo = kw.geometry(config(tmp_path, {"type": "qlora"}), LLAMA_8B)
    assert not kw.swiglu_in_fp8(kw.routes(geo, _perf(fp8=True, fp8_swiglu=True), fp8.pays),
                                _perf(fp8=True, fp8_swiglu=True))


def test_the_child_reads_the_model_config_and_skips_without_a_gpu(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_8B))
    cfg_file = tmp_path / "trainer.json"
    cfg_file.write_text(json.dumps({"baseModel": {"uri": str(model)}, "dataset": {"uri": "d.jsonl"},
                                    "output": {"uri": str(tmp_path / "out")}}))
    proc = subprocess.run([sys.executable, "-m", "kubetune.trainer.kernel_warmup", "--config", str(cfg_file)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr
    assert "kernel warm-up: layer: skipped: no CUDA GPU" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "kubetune.trainer.kernel_warmup", "--config", str(cfg_file),
                           "--part", "libraries"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0 and "kernel warm-up: libraries: skipped: no CUDA GPU" in proc.stderr
    (model / "config.json").write_text(json.dumps({**LLAMA_8B, "model_type": "gemma2"}))
    proc = subprocess.run([sys.executable, "-m", "kubetune.trainer.kernel_warmup", "--config", str(cfg_file)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "skipped: not a Llama-style decoder" in proc.stderr
    (model / "config.json").unlink()
    proc = subprocess.run([sys.executable, "-m", "kubetune.trainer.kernel_warmup", "--config", str(cfg_file)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "skipped: FileNotFoundError" in proc.stderr


def test_the_child_reads_a_model_config_from_s3(tmp_path, bucket, upload):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_8B))
    uri = upload(model, f"s3://{bucket}/models/m")
    cfg = config(tmp_path, uri=uri)
    assert kw.read_model_config(cfg)["hidden_size"] == 4096


def test_the_lm_head_outputs_are_the_ones_trl_asks_for():
    # They are constexpr flags of the head's kernels: other flags would warm other variants.
    import importlib.util

    spec = importlib.util.find_spec("trl.trainer.sft_trainer")
    source = open(spec.origin).read()
    assert "outputs=(" + ", ".join(f'"{o}"' for o in kw.LM_HEAD_OUTPUTS) + ")" in source
