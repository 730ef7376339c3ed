"""Pure parts of the train stage: Trainer arguments, precision, DeepSpeed, what CPU machines refuse."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.trainer.config import parse_config
from kubetune.trainer.train import (CPU_BATCH_SIZE, GPU_BATCH_SIZE, TrainingError, check_method_supported,
                                    deepspeed_config, resolve_precision, run_dir_for, sft_arguments)

BASE = {"baseModel": {"uri": "/m"}, "dataset": {"uri": "/d.jsonl", "maxLength": 512}, "output": {"uri": "s3://b/o/"}}


def cfg(**sections):
    return parse_config({**BASE, **sections})


def test_cpu_arguments():
    kw = sft_arguments(cfg(training={"checkpointEvery": 50, "maxSteps": 7}), Path("/w"), cuda=False,
                       precision="fp32", has_eval=True)
    assert kw["per_device_train_batch_size"] == CPU_BATCH_SIZE and kw["use_cpu"] and not kw["auto_find_batch_size"]
    assert kw["max_steps"] == 7 and kw["save_steps"] == 50 and kw["eval_steps"] == 50 and kw["eval_strategy"] == "steps"
    assert kw["packing"] and kw["packing_strategy"] == "bfd" and kw["max_length"] == 512
    assert not kw["bf16"] and "deepspeed" not in kw and kw["report_to"] == "none"
    assert sft_arguments(cfg(), Path("/w"), cuda=False, precision="fp32", has_eval=False)["eval_strategy"] == "no"
    assert sft_arguments(cfg(), Path("/w"), cuda=False, precision="fp32", has_eval=False)["max_steps"] == -1


def test_gpu_arguments_and_deepspeed(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    c = cfg(launch={"strategy": "deepspeed-zero3"}, training={"batchSize": "auto"})
    kw = sft_arguments(c, Path("/w"), cuda=True, precision="bf16", has_eval=False)
    assert kw["per_device_train_batch_size"] == GPU_BATCH_SIZE and kw["auto_find_batch_size"] and kw["bf16"]
    # batches pinned and copied without the host waiting for the GPU
    assert kw["dataloader_pin_memory"] and kw["accelerator_config"] == {"non_blocking": True}
    zero = kw["deepspeed"]["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert deepspeed_config(cfg(launch={"strategy": "deepspeed-zero2"}))["zero_optimization"]["stage"] == 2
    assert deepspeed_config(cfg()) is None
    # Launched by `accelerate launch --use_deepspeed --deepspeed_config_file ...`: the launcher's config wins.
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert "deepspeed" not in sft_arguments(c, Path("/w"), cuda=True, precision="bf16", has_eval=False)


def test_precision_and_cpu_refusals():
    assert resolve_precision(cfg(), cuda=False, bf16_supported=False) == "fp32"
    assert resolve_precision(cfg(), cuda=True, bf16_supported=True) == "bf16"
    assert resolve_precision(cfg(), cuda=True, bf16_supported=False) == "fp32"
    with pytest.raises(TrainingError, match="training.precision=bf16 needs a CUDA GPU"):
        resolve_precision(cfg(training={"precision": "bf16"}), cuda=False, bf16_supported=False)
    with pytest.raises(TrainingError, match="method.type=qlora needs a CUDA GPU"):
        check_method_supported(cfg(method={"type": "qlora"}), cuda=False)
    with pytest.raises(TrainingError, match="resources.strategy=deepspeed-zero2 needs CUDA"):
        check_method_supported(cfg(method={"type": "lora"}, launch={"strategy": "deepspeed-zero2"}), cuda=False)
    check_method_supported(cfg(method={"type": "qlora"}), cuda=True)  # fine on a GPU


def test_run_dir_is_per_output(tmp_path):
    a = cfg(storage={"cacheDir": str(tmp_path)})
    b = cfg(storage={"cacheDir": str(tmp_path)}, output={"uri": "s3://b/other/"})
    assert run_dir_for(a) != run_dir_for(b) and run_dir_for(a).parent == tmp_path / "runs"


def test_check_adapter_complete_rejects_empty_tensors(tmp_path):
    import torch
    from safetensors.torch import save_file

    from kubetune.trainer.train import check_adapter_complete

    save_file({"a.lora_A.weight": torch.zeros(4, 8), "a.lora_B.weight": torch.zeros(8, 4)},
              str(tmp_path / "adapter_model.safetensors"))
    check_adapter_complete(tmp_path)
    save_file({"a.lora_A.weight": torch.zeros(0), "a.lora_B.weight": torch.zeros(8, 4)},
              str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(RuntimeError, match="1 empty tensors"):
        check_adapter_complete(tmp_path)


def test_zero3_is_seen_from_the_config_or_the_launcher(monkeypatch):
    from kubetune.trainer.deepspeed import zero3_enabled

    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", raising=False)
    assert zero3_enabled("deepspeed-zero3")
    assert not zero3_enabled("deepspeed-zero2") and not zero3_enabled("ddp")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert zero3_enabled("ddp")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert not zero3_enabled("ddp")


@pytest.mark.parametrize("method, strategy, cuda, device_map, storage", [
    ("qlora", "ddp", True, {"": 1}, "uint8"),
    ("qlora", "deepspeed-zero2", True, {"": 1}, "uint8"),
    # ZeRO-3 partitions the packed 4-bit weights only when they are stored in the compute dtype.
    ("qlora", "deepspeed-zero3", True, {"": 1}, "bfloat16"),
    # bf16 LoRA goes straight onto its GPU (fast paths and the micro-batch planner need it there) ...
    ("lora", "ddp", True, {"": 1}, None),
    # ... except under ZeRO-3, where DeepSpeed places and partitions the weights; and never on a CPU.
    ("lora", "deepspeed-zero3", True, None, None),
    ("lora", "ddp", False, None, None),
])
def test_model_load_arguments(monkeypatch, method, strategy, cuda, device_map, storage):
    import torch

    from kubetune.trainer.train import model_load_kwargs

    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", raising=False)
    c = cfg(method={"type": method}, launch={"strategy": strategy})
    kw = model_load_kwargs(c, cuda=cuda, precision="bf16" if cuda else "fp32", local_rank=1, attn="sdpa")
    assert kw.get("device_map") == device_map
    assert kw["dtype"] == (torch.bfloat16 if cuda else torch.float32) and kw["attn_implementation"] == "sdpa"
    q = kw.get("quantization_config")
    if storage is None:
        assert q is None
    else:
        assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
        assert q.bnb_4bit_compute_dtype == torch.bfloat16 and q.bnb_4bit_quant_storage == getattr(torch, storage)
